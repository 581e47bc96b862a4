//! Scenario 2: the kernel-side cost, as a loopback churn's throughput with
//! and without the daemon, and each program's run time.

#[allow(clippy::wildcard_imports)]
use super::*;

/// One churn run in a fresh namespace: conn/s, and the programs' stats when asked.
pub(super) fn churn_run(ctx: &Ctx, with_daemon: bool, tag: &str, stats: bool) -> Result<(f64, ProgStats)> {
    let z = &ctx.sizes;
    let ns = Netns::roomy(tag, z.churn_conns)?;
    let daemon = if with_daemon { Some(start_daemon(ctx, &ns, tag)?.0) } else { None };
    let g = Generator::new(&ns, 8080)?;
    let sources = Sources::Ephemeral(remotes(101, 10));
    // Let the namespace and the daemon settle.
    std::thread::sleep(Duration::from_millis(300));
    let st = g.run(&sources, z.churn_conns, z.threads, None, None)?;
    let progs = match (&daemon, stats) {
        (Some(d), true) => prog_stats(d.pid())?,
        _ => Vec::new(),
    };
    drop(daemon);
    drop(g);
    drop(ns);
    // Namespace teardown (freeing the TIME_WAITs) runs in a kernel worker: let it finish.
    std::thread::sleep(Duration::from_millis(1500));
    Ok((st.rate(), progs))
}

/// Scenario 2: throughput of a loopback churn with and without the daemon.
pub(super) fn overhead(ctx: &Ctx, rep: &mut Report) -> Result<()> {
    const S: &str = "2 kernel overhead";
    let z = &ctx.sizes;
    progress(format!(
        "scenario 2: {} pairs of {} connections (server closes first), without/with the daemon, interleaved",
        z.pairs, z.churn_conns
    ));
    let (mut without, mut with) = (Vec::new(), Vec::new());
    let mut ratios = Vec::new();
    for p in 0..z.pairs {
        let order = if p % 2 == 0 { [false, true] } else { [true, false] };
        let mut pair = [0.0; 2];
        for w in order {
            let (rate, _) = churn_run(ctx, w, &format!("churn{p}{}", if w { "d" } else { "n" }), false)?;
            progress(format!("  pair {p}: {} daemon: {rate:.0} conn/s", if w { "with" } else { "without" }));
            pair[usize::from(w)] = rate;
        }
        without.push(pair[0]);
        with.push(pair[1]);
        ratios.push(pair[1] / pair[0]);
    }
    let foreign = foreign_daemons();
    if !foreign.is_empty() {
        rep.note(format!(
            "scenario 2: {} timewaitd process(es) not started by the bench were running during the runs (other test runs on this host); \
             their programs fire on both sides (they filter on their own namespace), so \"without daemon\" means without the bench's daemon",
            foreign.len()
        ));
    }
    let ratio = pct(&with, 50.0) / pct(&without, 50.0);
    let fmt = |v: &[f64]| v.iter().map(|r| format!("{r:.0}")).collect::<Vec<_>>().join(", ");
    rep.row(S, "churn without daemon (conn/s per run)", fmt(&without), "", None);
    rep.row(S, "churn with daemon (conn/s per run)", fmt(&with), "", None);
    rep.row(
        S,
        "throughput ratio with/without (median of runs)",
        format!("{ratio:.3} (per pair: {})", ratios.iter().map(|r| format!("{r:.3}")).collect::<Vec<_>>().join(", ")),
        ">= 0.97",
        Some(ratio >= 0.97),
    );
    // Per-program run time: a separate run, since the statistics cost time themselves.
    let guard = BpfStats::enable()?;
    let (rate, progs) = churn_run(ctx, true, "stats", true)?;
    drop(guard);
    progress(format!("  with bpf_stats_enabled: {rate:.0} conn/s"));
    if progs.is_empty() {
        bail!("bpftool shows no program held by the daemon");
    }
    for (name, ns, cnt) in progs {
        if cnt == 0 {
            rep.row(S, format!("program {name}"), "not run", "", None);
            continue;
        }
        let avg = ns as f64 / cnt as f64;
        // The iterators run once at start-up over every socket: not per event.
        let per_event = !name.starts_with("iter");
        rep.row(
            S,
            format!("program {name} (run_time_ns / run_cnt)"),
            format!("{avg:.0} ns x {}", thousands(cnt)),
            if per_event { "< 150 ns" } else { "" },
            per_event.then_some(avg < 150.0),
        );
    }
    Ok(())
}

