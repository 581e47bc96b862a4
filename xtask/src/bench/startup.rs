//! Scenario 4: start-up with N TIME_WAIT already there.

#[allow(clippy::wildcard_imports)]
use super::*;

/// Scenario 4: start-up with N TIME_WAIT already there.
pub(super) fn startup(ctx: &Ctx, rep: &mut Report) -> Result<()> {
    const S: &str = "4 start-up";
    let z = &ctx.sizes;
    progress(format!("scenario 4: start-up with {} TIME_WAIT already present", z.sockets));
    let ns = Netns::roomy("startup", z.sockets)?;
    let generator = Generator::new(&ns, 8080)?;
    let g = generator.run(&Sources::Ephemeral(remotes(1, z.remotes)), z.sockets, z.threads, None, None)?;
    progress(format!("  {} created in {:.1} s", g.made, g.elapsed.as_secs_f64()));
    let mut times = Vec::new();
    let mut loaded = Vec::new();
    for i in 0..3 {
        let tw = ns.tw_count()?;
        let (d, t) = start_daemon(ctx, &ns, &format!("startup{i}"))?;
        let (_, body) = Scraper::new(&ns, DAEMON).get("/metrics")?;
        let snap = metric_sum(&body, "timewait_snapshot_sockets_total", "");
        let sum = metric_sum(&body, "timewait_sockets", "") + metric_sum(&body, "timewait_fin_wait2_orphans", "");
        progress(format!("  start {i}: ready in {} with {tw} minisockets present; snapshot loaded {snap}, gauges sum {sum}", ms(t.as_secs_f64() * 1e3)));
        times.push(t.as_secs_f64() * 1e3);
        loaded.push((tw, snap));
        drop(d);
    }
    let worst = times.iter().copied().fold(0.0, f64::max);
    rep.row(
        S,
        format!("exec -> /readyz 200 with {} TIME_WAIT (3 starts)", thousands(loaded[0].0)),
        format!("median {} / max {}", ms(pct(&times, 50.0)), ms(worst)),
        "< 2 s",
        Some(worst < 2000.0),
    );
    rep.row(
        S,
        "start-up snapshot loaded (timewait_snapshot_sockets_total)",
        loaded.iter().map(|(tw, s)| format!("{s}/{tw}")).collect::<Vec<_>>().join(", "),
        "",
        None,
    );
    Ok(())
}

