//! Scenario 3: the daemon's CPU and memory at steady state.

#[allow(clippy::wildcard_imports)]
use super::*;

/// Scenario 3: N TIME_WAIT, a churn of R/s that keeps the population
/// constant (each SYN reuses a TIME_WAIT the previous pass left), a scrape
/// of /metrics every second; the daemon's CPU and memory.
pub(super) fn steady(ctx: &Ctx, rep: &mut Report) -> Result<()> {
    const S: &str = "3 steady state";
    let z = &ctx.sizes;
    progress(format!(
        "scenario 3: {} TIME_WAIT, churn {}/s for {} s, /metrics every 1 s",
        z.sockets,
        z.churn_rate,
        z.steady.as_secs()
    ));
    let ns = Netns::roomy("steady", z.sockets + z.churn_rate as usize)?;
    let (daemon, _) = start_daemon(ctx, &ns, "steady")?;
    let pid = daemon.pid();
    let base = Generator::new(&ns, 8080)?;
    let g = base.run(&Sources::Ephemeral(remotes(1, z.remotes)), z.sockets, z.threads, None, None)?;
    progress(format!("  {} created in {:.1} s", g.made, g.elapsed.as_secs_f64()));
    // The churn: R tuples (10 addresses x R/10 ports), one pass per second.
    let per_addr = (z.churn_rate as usize).div_ceil(10);
    let tuples: Vec<SocketAddrV4> = (0..10)
        .flat_map(|a| (0..per_addr).map(move |p| SocketAddrV4::new(Ipv4Addr::new(127, 0, 240, a as u8 + 1), 20_000 + p as u16)))
        .collect();
    let churn = Generator::new(&ns, 8081)?;
    let mut scraper = Scraper::new(&ns, DAEMON);
    // Warm up: one pass creates the churn's own TIME_WAITs, so that the
    // measured window only sees reuse (kill + create) at a constant population.
    churn.run(&Sources::Fixed(tuples.clone()), tuples.len(), 2, None, None)?;
    let (_, before) = scraper.get("/metrics")?;
    let tw0 = ns.tw_count()?;
    let cpu0 = cpu_seconds(pid)?;
    let t0 = Instant::now();
    let until = t0 + z.steady;
    let mut scrape_ms = Vec::new();
    let mut body = Vec::new();
    let st = std::thread::scope(|s| -> Result<GenStats> {
        let h = s.spawn(|| churn.run(&Sources::Fixed(tuples.clone()), usize::MAX, 2, Some(z.churn_rate as f64), Some(until)));
        let mut next = t0;
        while Instant::now() < until {
            let (t, b) = scraper.get("/metrics")?;
            scrape_ms.push(t);
            body = b;
            next += Duration::from_secs(1);
            let now = Instant::now();
            if next > now {
                std::thread::sleep((next - now).min(until.saturating_duration_since(now)));
            }
        }
        h.join().map_err(|_| anyhow::anyhow!("churn thread panicked"))?
    })?;
    let wall = t0.elapsed().as_secs_f64();
    let cpu = cpu_seconds(pid)? - cpu0;
    let tw1 = ns.tw_count()?;
    let (rss, hwm) = rss_kb(pid)?;
    let created = metric_sum(&body, "timewait_created_total", "") - metric_sum(&before, "timewait_created_total", "");
    let reused = metric_sum(&body, "timewait_closed_total", "reused_by_syn") - metric_sum(&before, "timewait_closed_total", "reused_by_syn");
    let cpu_pct = cpu / wall * 100.0;
    rep.row(
        S,
        format!("load: {} TIME_WAIT (kernel {tw0} -> {tw1}), churn", thousands(z.sockets as u64)),
        format!(
            "{:.0} conn/s for {:.0} s ({} created, {} reused by SYN per the daemon; {} errors)",
            st.rate(),
            wall,
            created,
            reused,
            st.errors
        ),
        "",
        None,
    );
    rep.row(S, format!("daemon CPU (utime+stime / wall, {} scrapes of /metrics)", scrape_ms.len()), format!("{cpu_pct:.2} % of one core ({cpu:.2} s)"), "< 2 %", Some(cpu_pct < 2.0));
    rep.row(
        S,
        "daemon memory (VmRSS / VmHWM)",
        format!("{:.1} MB / {:.1} MB", rss as f64 / 1024.0, hwm as f64 / 1024.0),
        "< 50 MB",
        Some((hwm as f64 / 1024.0) < 50.0),
    );
    rep.row(S, "GET /metrics during the churn", p50_p99(&scrape_ms), "", None);
    drop(daemon);
    Ok(())
}

