//! Scenarios 1 and 5: the cost of a scrape at N/10, N/4, N/2 and N TIME_WAIT
//! sockets, against the `ss` pipeline and node_exporter's sockstat.

#[allow(clippy::wildcard_imports)]
use super::*;

// ------------------------------------------------------------------ scenarios

/// Runs the `ss` pipeline inside `ns`: (milliseconds, lines of output).
pub(super) fn ss_pipeline(ns: &Netns) -> Result<(f64, usize)> {
    let t = Instant::now();
    let out = ns.command("sh").args(["-c", SS_PIPELINE]).stdin(Stdio::null()).stderr(Stdio::inherit()).output()?;
    let ms = t.elapsed().as_secs_f64() * 1e3;
    if !out.status.success() {
        bail!("the ss pipeline failed ({})", out.status);
    }
    Ok((ms, out.stdout.iter().filter(|b| **b == b'\n').count()))
}

pub(super) fn node_exporter_bin() -> Option<PathBuf> {
    ["/usr/bin/prometheus-node-exporter", "/usr/local/bin/node_exporter", "/usr/bin/node_exporter"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

/// Debian's prometheus-node-exporter, installed when missing.
pub(super) fn ensure_node_exporter() -> Result<PathBuf> {
    if let Some(p) = node_exporter_bin() {
        return Ok(p);
    }
    progress("node_exporter is missing: installing Debian's prometheus-node-exporter (apt-get)");
    sh(Command::new("apt-get").args(["update", "-qq"]))?;
    sh(Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends", "prometheus-node-exporter"])
        .env("DEBIAN_FRONTEND", "noninteractive"))?;
    node_exporter_bin().context("prometheus-node-exporter installed but no binary found")
}

pub(super) fn start_node_exporter(ctx: &Ctx, ns: &Netns) -> Result<Proc> {
    let bin = ensure_node_exporter()?;
    let mut cmd = ns.command(bin);
    cmd.args(["--collector.disable-defaults", "--collector.sockstat", &format!("--web.listen-address={NODE_EXPORTER}")]);
    let mut p = Proc::spawn("node_exporter", cmd, ctx.logs.join("node_exporter.log"))?;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        p.check_alive()?;
        if let Ok(mut h) = Http::connect(ns, NODE_EXPORTER)
            && matches!(h.get("/metrics"), Ok((200, _)))
        {
            return Ok(p);
        }
        if Instant::now() > deadline {
            bail!("node_exporter not answering after 20 s (log: {})", p.log.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Scenario 1 (and 5): scrape cost at N/10, N/4, N/2 and N TIME_WAIT sockets.
pub(super) fn scrape_cost(ctx: &Ctx, rep: &mut Report, with_node: bool) -> Result<()> {
    const S: &str = "1 scrape";
    let z = &ctx.sizes;
    progress(format!("scenario 1: scrape cost, up to {} TIME_WAIT from {} remotes", z.sockets, z.remotes));
    let ns = Netns::roomy("scrape", z.sockets)?;
    let (daemon, _) = start_daemon(ctx, &ns, "scrape")?;
    let node = if with_node {
        match start_node_exporter(ctx, &ns) {
            Ok(p) => Some(p),
            Err(e) => {
                rep.note(format!("node_exporter not measured: {e:#}"));
                None
            }
        }
    } else {
        None
    };
    let generator = Generator::new(&ns, 8080)?;
    let sources = Sources::Ephemeral(remotes(1, z.remotes));
    let mut points: Vec<usize> = [z.sockets / 10, z.sockets / 4, z.sockets / 2, z.sockets].into();
    points.dedup();
    let mut made = 0usize;
    let first = Instant::now();
    let mut gen_time = Duration::ZERO;
    let mut topped = 0usize;
    let mut m = Scraper::new(&ns, DAEMON);
    let mut snap = Scraper::new(&ns, DAEMON);
    let mut nx = Scraper::new(&ns, NODE_EXPORTER);
    let mut curve = Vec::new();
    for &point in &points {
        // The generator numbers connections globally so the remotes stay balanced.
        let present = ns.tw_count()? as usize;
        let g = generator_range(&generator, &sources, made, made + point.saturating_sub(present), z.threads)?;
        gen_time += g.elapsed;
        progress(format!(
            "  {} TIME_WAIT sockets created in {:.1} s ({:.0}/s)",
            thousands(point as u64),
            g.elapsed.as_secs_f64(),
            g.rate()
        ));
        made += g.made as usize;
        if point == z.sockets {
            rep.row(S, format!("generator: {} TIME_WAIT from {} remotes", thousands(point as u64), z.remotes), format!("{:.1} s ({:.0} conn/s)", gen_time.as_secs_f64(), made as f64 / gen_time.as_secs_f64()), "", None);
        }
        let tw0 = ns.tw_count()?;
        let rounds = if point == z.sockets { z.scrapes } else { (z.scrapes / 4).max(4) };
        let (mut tm, mut ts, mut tss, mut tn) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let (mut body_len, mut snap_len, mut daemon_sum, mut ss_lines) = (0, 0, 0.0, 0);
        let t_round = Instant::now();
        let mut tw_min = tw0;
        for r in 0..rounds {
            // TIME_WAIT lasts 60 s: top the population up (outside the timed
            // requests) so that every round sees at least 98 % of it.
            let tw = ns.tw_count()?;
            tw_min = tw_min.min(tw);
            if tw < (point as u64) * 98 / 100 {
                let need = point - tw as usize;
                let g = generator_range(&generator, &sources, made, made + need, z.threads)?;
                made += g.made as usize;
                topped += g.made as usize;
            }
            // Interleaved, and the order rotates so that none always follows `ss`.
            for k in 0..4 {
                match (r + k) % 4 {
                    0 => {
                        let (t, b) = m.get("/metrics")?;
                        tm.push(t);
                        body_len = b.len();
                        daemon_sum = metric_sum(&b, "timewait_sockets", "");
                    }
                    1 => {
                        let (t, b) = snap.get("/api/v1/snapshot")?;
                        ts.push(t);
                        snap_len = b.len();
                    }
                    2 => {
                        let (t, lines) = ss_pipeline(&ns)?;
                        tss.push(t);
                        ss_lines = lines;
                    }
                    _ => {
                        if node.is_some() {
                            tn.push(nx.get("/metrics")?.0);
                        }
                    }
                }
            }
        }
        let tw1 = ns.tw_count()?;
        progress(format!(
            "  at {}: {rounds} rounds in {:.1} s, tw {tw0} -> {tw1} (lowest {tw_min}, {topped} topped up so far), daemon sums {daemon_sum}, ss {ss_lines} remotes; /metrics {}, ss {}, age of the oldest socket {:.0} s",
            thousands(point as u64),
            t_round.elapsed().as_secs_f64(),
            p50_p99(&tm),
            p50_p99(&tss),
            first.elapsed().as_secs_f64()
        ));
        if tw_min < (point as u64) * 95 / 100 || tw1 < (point as u64) * 95 / 100 {
            rep.note(format!(
                "at {point} sockets the kernel count was as low as {} before a top-up (TIME_WAIT timers expire in batches after 60 s); every round's requests ran after topping up to >= 98 %",
                tw_min.min(tw1)
            ));
        }
        curve.push((point, tw_min, tw1, tm.clone(), ts.clone(), tss.clone(), tn.clone(), body_len, daemon_sum));
        if point == z.sockets {
            let m99 = pct(&tm, 99.0);
            rep.row(S, format!("GET /metrics, {} rounds ({} B)", rounds, thousands(body_len as u64)), p50_p99(&tm), "p99 < 5 ms", Some(m99 < 5.0));
            rep.row(S, format!("GET /api/v1/snapshot ({} B)", thousands(snap_len as u64)), p50_p99(&ts), "", None);
            rep.row(S, format!("`ss` pipeline ({ss_lines} remotes)"), p50_p99(&tss), "", None);
            let ratio = pct(&tss, 50.0) / pct(&tm, 50.0);
            rep.row(S, "ss pipeline / GET /metrics (p50 / p50)", format!("{ratio:.0}x"), ">= 25x", Some(ratio >= 25.0));
            let ratio99 = pct(&tss, 99.0) / pct(&tm, 99.0);
            rep.row(S, "ss pipeline / GET /metrics (p99 / p99)", format!("{ratio99:.0}x"), "", None);
            if node.is_some() {
                rep.row("5 node_exporter", "GET /metrics, sockstat collector only", p50_p99(&tn), "", None);
            }
            rep.row(S, "daemon's timewait_sockets sum / kernel tw count", format!("{daemon_sum} / {tw0}..{tw1}"), "", None);
        }
    }
    // Flatness: /metrics p50 at the largest size against the smallest.
    let mut curve_text = String::from("| TIME_WAIT sockets (kernel count: lowest, at the end) | /metrics p50 | /metrics p99 | snapshot p50 | `ss` pipeline p50 | `ss` p99 | node_exporter p50 |\n| --- | --- | --- | --- | --- | --- | --- |\n");
    for (point, tw0, tw1, tm, ts, tss, tn, _, _) in &curve {
        let _ = writeln!(
            curve_text,
            "| {} ({}, {}) | {} | {} | {} | {} | {} | {} |",
            thousands(*point as u64),
            tw0,
            tw1,
            ms(pct(tm, 50.0)),
            ms(pct(tm, 99.0)),
            ms(pct(ts, 50.0)),
            ms(pct(tss, 50.0)),
            ms(pct(tss, 99.0)),
            if tn.is_empty() { "-".into() } else { ms(pct(tn, 50.0)) }
        );
    }
    if let (Some(lo), Some(hi)) = (curve.first(), curve.last()) {
        let growth = pct(&hi.3, 50.0) / pct(&lo.3, 50.0);
        let ss_growth = pct(&hi.5, 50.0) / pct(&lo.5, 50.0);
        rep.row(
            S,
            format!("flatness: /metrics p50 at {} / at {} sockets", thousands(hi.0 as u64), thousands(lo.0 as u64)),
            format!("{growth:.2}x (ss: {ss_growth:.1}x)"),
            "flat (< 1.5x)",
            Some(growth < 1.5),
        );
    }
    eprintln!("{curve_text}");
    if topped > 0 {
        curve_text.push_str(&format!(
            "\n{} connections were made during the measurement, outside the timed requests, to replace TIME_WAIT sockets that reached their 60 s.\n",
            thousands(topped as u64)
        ));
    }
    rep.notes.push(format!("Scrape cost curve (scenario 1):\n\n{curve_text}"));
    drop(daemon);
    drop(node);
    Ok(())
}

/// Connections number `from..to` (global numbering, so remotes stay balanced).
pub(super) fn generator_range(g: &Generator<'_>, sources: &Sources, from: usize, to: usize, threads: usize) -> Result<GenStats> {
    let shifted = match sources {
        Sources::Ephemeral(v) => {
            let n = v.len();
            Sources::Ephemeral((0..n).map(|i| v[(i + from) % n]).collect())
        }
        Sources::Fixed(v) => {
            let n = v.len();
            Sources::Fixed((0..n).map(|i| v[(i + from) % n]).collect())
        }
    };
    g.run(&shifted, to - from, threads, None, None)
}

