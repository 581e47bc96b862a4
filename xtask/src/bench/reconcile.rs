//! Scenario 6: the cost of a reconciliation walk (two `iter/tcp` walks of
//! the namespace's sockets when something is unseen, one otherwise; see
//! `timewait-daemon/src/collect/reconcile.rs`) and of a scrape, at N and 10 x N
//! TIME_WAIT sockets. The daemon reconciles every second here
//! (`--reconcile-interval 1`); its own `timewait_reconcile_duration_seconds`
//! is read after each of the runs that follow the load, and the cost at the
//! default interval is that duration over the interval.

use std::time::{Duration, Instant};

use anyhow::{Result, bail};

use super::{
    Ctx, DAEMON, Generator, Netns, Report, Scraper, Sources, metric_sum, ms, p50_p99, pct, progress, remotes,
    start_daemon_with, thousands,
};

/// The daemon's default `--reconcile-interval` (timewait-daemon/src/cli/config.rs).
const DEFAULT_INTERVAL_S: f64 = 60.0;

pub(super) fn reconcile(ctx: &Ctx, rep: &mut Report) -> Result<()> {
    const S: &str = "6 reconcile";
    let z = &ctx.sizes;
    for n in [z.sockets, z.sockets * 10] {
        progress(format!("scenario 6: reconciliation walks with {n} TIME_WAIT"));
        let ns = Netns::roomy("reconcile", n)?;
        let (daemon, _) = start_daemon_with(ctx, &ns, &format!("reconcile{n}"), &["--reconcile-interval", "1"])?;
        let generator = Generator::new(&ns, 8080)?;
        let g = generator.run(&Sources::Ephemeral(remotes(1, z.remotes)), n, z.threads, None, None)?;
        progress(format!("  {} created in {:.1} s", g.made, g.elapsed.as_secs_f64()));
        let mut scraper = Scraper::new(&ns, DAEMON);
        let runs = |body: &[u8]| metric_sum(body, "timewait_reconcile_runs_total", "");
        let (_, body) = scraper.get("/metrics")?;
        let mut last = runs(&body);
        let mut walks = Vec::new();
        let mut scrapes = Vec::new();
        let mut shown = 0.0;
        let deadline = Instant::now() + Duration::from_secs(60);
        while walks.len() < 5 {
            if Instant::now() > deadline {
                bail!("fewer than 5 reconciliations in 60 s with {n} sockets (log: {})", daemon.log.display());
            }
            std::thread::sleep(Duration::from_millis(200));
            let (t, body) = scraper.get("/metrics")?;
            scrapes.push(t);
            let r = runs(&body);
            if r > last {
                last = r;
                walks.push(metric_sum(&body, "timewait_reconcile_duration_seconds", "") * 1e3);
                shown = metric_sum(&body, "timewait_sockets", "");
            }
        }
        let tw = ns.tw_count()?;
        let p50 = pct(&walks, 50.0);
        rep.row(
            S,
            format!("reconciliation walk, {} TIME_WAIT (daemon shows {})", thousands(tw), thousands(shown as u64)),
            format!("p50 {} / max {} (5 walks)", ms(p50), ms(walks.iter().copied().fold(0.0, f64::max))),
            "",
            None,
        );
        let share = p50 / 1e3 / DEFAULT_INTERVAL_S * 100.0;
        rep.row(
            S,
            format!("its share of one core every {DEFAULT_INTERVAL_S:.0} s (the default), {} TIME_WAIT", thousands(tw)),
            format!("{share:.2} %"),
            "< 1 %",
            Some(share < 1.0),
        );
        rep.row(S, format!("GET /metrics meanwhile, {} TIME_WAIT", thousands(tw)), p50_p99(&scrapes), "", None);
        drop(daemon);
    }
    Ok(())
}
