//! Scenarios 9 and 10: the NAT side (issue 27).
//!
//! 9. The start-up dump and memory: a namespace of its own with N conntrack
//!    entries (`ctfill.rs`: the namespace's own TCP connections from an
//!    address on a veth interface, 1/4 ESTABLISHED and 3/4 TIME_WAIT,
//!    toward 1,000 destinations; then N toward N destinations, the memory
//!    worst case), the daemon started there with `--nat on`: exec to
//!    `/readyz` 200 (the first dump happens before ready), memory, the
//!    dump's time and CPU, `/metrics` p50/p99, and the counts against the
//!    fill (exact). The same start in an empty namespace is the baseline.
//! 10. New NAT connections per second: client -> router (iptables
//!     MASQUERADE) -> server, each in its namespace, short connections the
//!     server closes first, for a fixed time per run, without the daemon,
//!     with it (`--nat on`) and with it and `--nat off` (its eBPF side
//!     alone), in rotating order; then the daemon's CPU at a fixed rate.

#[allow(clippy::wildcard_imports)]
use super::*;

use super::ctfill::{self, Ct, CtLimit, TCP_ESTABLISHED, TCP_TIME_WAIT};

/// The fill's address (on a veth interface of the fill's namespace).
const LOCAL: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 1);
/// Destinations: FIRST_REMOTE + d.
const FIRST_REMOTE: u32 = u32::from_be_bytes([10, 64, 0, 1]);
/// Destinations of the regular fills.
const DESTINATIONS: usize = 1_000;

/// Scenario 10's addresses: client -> router (inside, outside) -> server.
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 210, 1, 2);
const ROUTER_IN: Ipv4Addr = Ipv4Addr::new(10, 210, 1, 1);
const ROUTER_OUT: Ipv4Addr = Ipv4Addr::new(10, 210, 2, 1);
const SERVER: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 210, 2, 2), 8080);
/// conntrack timeouts set in the router (seconds), so that its table and the
/// NAT ports toward the one server do not fill at 10,000 connections/s (the
/// default TIME_WAIT, 120 s, would hold 1.2M entries and exhaust the 64,512
/// ports toward the server after ~6 s).
const ROUTER_TIMEOUTS: &[(&str, &str)] = &[
    ("net.netfilter.nf_conntrack_tcp_timeout_time_wait", "1"),
    ("net.netfilter.nf_conntrack_tcp_timeout_close", "1"),
    ("net.netfilter.nf_conntrack_tcp_timeout_fin_wait", "2"),
    ("net.netfilter.nf_conntrack_tcp_timeout_close_wait", "2"),
    ("net.netfilter.nf_conntrack_tcp_timeout_last_ack", "2"),
];

fn ip(ns: &Netns, args: &[&str]) -> Result<()> {
    quiet(Command::new("ip").arg("-n").arg(&ns.name).args(args))
}

/// What one start of the daemon over a filled table showed.
struct Start {
    entries: u64,
    kernel: u64,
    fill: Duration,
    ready: Duration,
    /// utime+stime of the daemon when /readyz first said 200.
    cpu_ready: f64,
    /// The daemon's own CPU for the dump (`dump_cpu_seconds` of the snapshot API).
    dump_cpu: Option<f64>,
    dump_secs: f64,
    dump_entries: f64,
    in_use: f64,
    time_wait: f64,
    want_time_wait: u64,
    over_limit: f64,
    /// (VmRSS, VmHWM) in kB after the scrapes.
    rss: (u64, u64),
    scrapes: Vec<f64>,
    body_len: usize,
}

/// A value anywhere in a JSON document, by key.
fn find_key<'a>(v: &'a serde_json::Value, key: &str) -> Option<&'a serde_json::Value> {
    match v {
        serde_json::Value::Object(m) => m.get(key).or_else(|| m.values().find_map(|x| find_key(x, key))),
        serde_json::Value::Array(a) => a.iter().find_map(|x| find_key(x, key)),
        _ => None,
    }
}

/// Fills a fresh namespace with `n` entries toward `dests` destinations,
/// starts the daemon there and measures.
fn start_over(ctx: &Ctx, tag: &str, n: usize, dests: usize, extra: &[&str]) -> Result<Start> {
    let z = &ctx.sizes;
    // Dropped last: after the namespace (and its entries) went.
    let _limit = CtLimit::at_least(&ctx.logs, n + 10_000)?;
    let ns = Netns::new(tag)?;
    // A veth pair inside the namespace (this kernel has no dummy driver).
    ip(&ns, &["link", "add", "d0", "type", "veth", "peer", "name", "d1"])?;
    ip(&ns, &["addr", "add", &format!("{LOCAL}/32"), "dev", "d0"])?;
    ip(&ns, &["link", "set", "d0", "up"])?;
    let dests = dests.max(1);
    let per_dest = n.div_ceil(dests);
    if per_dest > 64_000 {
        bail!("{n} entries toward {dests} destinations: more source ports than one address has");
    }
    let want_time_wait = (0..n).filter(|i| i % 4 != 0).count() as u64;
    let t = Instant::now();
    let made = if n == 0 {
        0
    } else {
        ctfill::fill(
            &ns,
            (0..n).map(move |i| Ct {
                local: LOCAL,
                sport: 1024 + (i / dests) as u16,
                remote: Ipv4Addr::from(FIRST_REMOTE + (i % dests) as u32),
                dport: 80,
                state: if i % 4 == 0 { TCP_ESTABLISHED } else { TCP_TIME_WAIT },
            }),
        )?
    };
    let fill = t.elapsed();
    let kernel = ctfill::count(&ns)?;
    progress(format!(
        "  {tag}: {} entries toward {} destinations made in {:.1} s (nf_conntrack_count {kernel})",
        thousands(made),
        thousands(dests.min(n) as u64),
        fill.as_secs_f64()
    ));
    let mut args = vec!["--nat", "on"];
    args.extend_from_slice(extra);
    let (d, ready) = start_daemon_with(ctx, &ns, tag, &args)?;
    let cpu_ready = cpu_seconds(d.pid())?;
    let mut sc = Scraper::new(&ns, DAEMON);
    let mut scrapes = Vec::with_capacity(z.scrapes);
    let mut body = Vec::new();
    for _ in 0..z.scrapes {
        let (ms, b) = sc.get("/metrics")?;
        scrapes.push(ms);
        body = b;
    }
    let (_, snap) = sc.get("/api/v1/snapshot")?;
    let dump_cpu = serde_json::from_slice::<serde_json::Value>(&snap)
        .ok()
        .and_then(|v| find_key(&v, "dump_cpu_seconds").and_then(serde_json::Value::as_f64));
    let rss = rss_kb(d.pid())?;
    let local = format!("nat_address=\"{LOCAL}\"");
    let s = Start {
        entries: made,
        kernel,
        fill,
        ready,
        cpu_ready,
        dump_cpu,
        dump_secs: metric_sum(&body, "timewait_nat_dump_duration_seconds", ""),
        dump_entries: metric_sum(&body, "timewait_nat_dump_entries", ""),
        in_use: metric_sum(&body, "timewait_nat_ports_in_use", &local),
        time_wait: metric_sum(&body, "timewait_nat_ports_time_wait", &local),
        want_time_wait,
        over_limit: metric_sum(&body, "timewait_nat_entries_over_limit", ""),
        rss,
        scrapes,
        body_len: body.len(),
    };
    progress(format!(
        "  {tag}: ready in {}, dump {:.2} s wall, CPU at ready {:.2} s (dump thread {}), VmHWM {:.1} MB; ports_in_use sum {} (time_wait {}), over limit {}",
        ms(s.ready.as_secs_f64() * 1e3),
        s.dump_secs,
        s.cpu_ready,
        s.dump_cpu.map_or("?".into(), |c| format!("{c:.2} s")),
        s.rss.1 as f64 / 1024.0,
        s.in_use + 0.0,
        s.time_wait + 0.0,
        s.over_limit + 0.0
    ));
    drop(sc);
    drop(d);
    drop(ns);
    Ok(s)
}

fn mb(kb: u64) -> String {
    format!("{:.1} MB", kb as f64 / 1024.0)
}

/// Scenario 9: the start-up dump and memory at N conntrack entries.
pub(super) fn startup(ctx: &Ctx, rep: &mut Report) -> Result<()> {
    const S: &str = "9 NAT start-up";
    let z = &ctx.sizes;
    ctfill::restore_stale_limit(&ctx.logs);
    progress(format!(
        "scenario 9: start-up with {:?} conntrack entries (own connections, 1/4 ESTABLISHED, 3/4 TIME_WAIT, {DESTINATIONS} destinations) and {} toward as many destinations",
        z.nat_entries, z.nat_wide
    ));
    // The baseline: starts in an empty namespace (the median of three; one in smoke runs).
    let mut bases = Vec::new();
    for i in 0..if z.smoke { 1 } else { 3 } {
        bases.push(start_over(ctx, &format!("nat0{i}"), 0, 1, &[])?);
    }
    bases.sort_by_key(|b| b.ready);
    let readies = bases.iter().map(|b| ms(b.ready.as_secs_f64() * 1e3)).collect::<Vec<_>>().join(", ");
    let mut cpus: Vec<f64> = bases.iter().map(|b| b.cpu_ready).collect();
    cpus.sort_by(f64::total_cmp);
    let cpu_base = cpus[cpus.len() / 2];
    let base = bases.swap_remove(bases.len() / 2);
    rep.row(
        S,
        format!("baseline: empty namespace, `--nat on` ({} starts): exec -> /readyz 200, CPU at ready (median), VmRSS / VmHWM", cpus.len()),
        format!("{readies}; {cpu_base:.2} s; {} / {}", mb(base.rss.0), mb(base.rss.1)),
        "",
        None,
    );
    let mut runs: Vec<(String, usize, Start, bool)> = Vec::new();
    for (i, &n) in z.nat_entries.iter().enumerate() {
        let s = start_over(ctx, &format!("nat{}", i + 1), n, DESTINATIONS, &[])?;
        runs.push((format!("{} entries, {} destinations", thousands(n as u64), thousands(DESTINATIONS.min(n) as u64)), n, s, false));
    }
    let cap = z.nat_wide_cap.map(|c| c.to_string());
    let mut extra = Vec::new();
    if let Some(c) = &cap {
        extra.extend(["--nat-max-destinations", c.as_str()]);
    }
    let wide = start_over(ctx, "natw", z.nat_wide, z.nat_wide, &extra)?;
    runs.push((
        format!(
            "{} entries, {} destinations (`--nat-max-destinations` {})",
            thousands(z.nat_wide as u64),
            thousands(z.nat_wide as u64),
            cap.as_deref().unwrap_or("65536, the default")
        ),
        z.nat_wide,
        wide,
        true,
    ));
    for (label, n, s, wide) in &runs {
        let n = *n as u64;
        rep.row(
            S,
            format!("{label}: fill over ctnetlink (nf_conntrack_count)"),
            format!("{} in {:.1} s ({})", thousands(s.entries), s.fill.as_secs_f64(), thousands(s.kernel)),
            "",
            None,
        );
        rep.row(
            S,
            format!("{label}: exec -> /readyz 200 (first dump before ready)"),
            format!(
                "{} ({:.1}x the empty start's {})",
                ms(s.ready.as_secs_f64() * 1e3),
                s.ready.as_secs_f64() / base.ready.as_secs_f64(),
                ms(base.ready.as_secs_f64() * 1e3)
            ),
            "",
            None,
        );
        rep.row(
            S,
            format!("{label}: dump (timewait_nat_dump_duration_seconds; CPU: the dump thread's own / utime+stime at ready minus the empty start's)"),
            format!(
                "{:.2} s wall; CPU {} / {:.2} s ({:.1} us per entry)",
                s.dump_secs,
                s.dump_cpu.map_or("?".into(), |c| format!("{c:.2} s")),
                s.cpu_ready - cpu_base,
                s.dump_cpu.unwrap_or(s.cpu_ready - cpu_base) * 1e6 / n.max(1) as f64
            ),
            "",
            None,
        );
        rep.row(
            S,
            format!("{label}: daemon memory after the dump and the scrapes (VmRSS / VmHWM; empty start {} / {})", mb(base.rss.0), mb(base.rss.1)),
            format!("{} / {}", mb(s.rss.0), mb(s.rss.1)),
            "",
            None,
        );
        rep.row(
            S,
            format!("{label}: GET /metrics, {} scrapes ({} B)", s.scrapes.len(), thousands(s.body_len as u64)),
            p50_p99(&s.scrapes),
            "",
            None,
        );
        let exact = s.in_use == n as f64 && s.dump_entries == n as f64 && s.time_wait == s.want_time_wait as f64 && s.kernel == n;
        rep.row(
            S,
            format!("{label}: sum(timewait_nat_ports_in_use{{nat_address=\"{LOCAL}\"}}) / time_wait / dump entries, against the fill"),
            format!(
                "{} / {} / {} (fill {} / {}){}",
                thousands(s.in_use as u64),
                thousands(s.time_wait as u64),
                thousands(s.dump_entries as u64),
                thousands(n),
                thousands(s.want_time_wait),
                if *wide { format!("; timewait_nat_entries_over_limit {}", thousands(s.over_limit as u64)) } else { String::new() }
            ),
            "exact",
            Some(exact),
        );
    }
    Ok(())
}

/// Scenario 10's three namespaces, deleted on drop.
struct Lab {
    client: Netns,
    router: Netns,
    server: Netns,
}

impl Lab {
    fn new(tag: &str) -> Result<Self> {
        let client = Netns::roomy(&format!("{tag}c"), 0)?;
        let router = Netns::new(&format!("{tag}r"))?;
        let server = Netns::new(&format!("{tag}s"))?;
        // The server keeps no TIME_WAIT: neither the load nor the teardown of
        // the namespaces between runs (purging hundreds of thousands of
        // minisockets) then depends on a population that grows during a run.
        // The router's conntrack entries still go through TIME_WAIT.
        server.sysctl("net.ipv4.tcp_max_tw_buckets", "0")?;
        ip(&client, &["link", "add", "c0", "type", "veth", "peer", "name", "r0", "netns", &router.name])?;
        ip(&router, &["link", "add", "r1", "type", "veth", "peer", "name", "s0", "netns", &server.name])?;
        ip(&client, &["addr", "add", &format!("{CLIENT}/24"), "dev", "c0"])?;
        ip(&router, &["addr", "add", &format!("{ROUTER_IN}/24"), "dev", "r0"])?;
        ip(&router, &["addr", "add", &format!("{ROUTER_OUT}/24"), "dev", "r1"])?;
        ip(&server, &["addr", "add", &format!("{}/24", SERVER.ip()), "dev", "s0"])?;
        ip(&client, &["link", "set", "c0", "up"])?;
        ip(&router, &["link", "set", "r0", "up"])?;
        ip(&router, &["link", "set", "r1", "up"])?;
        ip(&server, &["link", "set", "s0", "up"])?;
        ip(&client, &["route", "add", "default", "via", &ROUTER_IN.to_string()])?;
        router.sysctl("net.ipv4.ip_forward", "1")?;
        quiet(router.command("iptables").args(["-t", "nat", "-A", "POSTROUTING", "-o", "r1", "-j", "MASQUERADE"]))
            .context("iptables MASQUERADE in the router")?;
        for (k, v) in ROUTER_TIMEOUTS {
            router.sysctl(k, v)?;
        }
        Ok(Lab { client, router, server })
    }

    /// Client threads in the client namespace, the listener in the server's.
    fn generator(&self) -> Result<Generator<'_>> {
        let listener = self.server.within(|| TcpListener::bind(SERVER))?;
        let tv = libc::timeval { tv_sec: 5, tv_usec: 0 };
        // SAFETY: valid fd, correctly sized timeval.
        unsafe {
            libc::setsockopt(
                listener.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&raw const tv).cast(),
                size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        Ok(Generator { ns: &self.client, listener, server: SERVER })
    }

    /// (insert_failed, drop) of the router's conntrack, summed over CPUs.
    fn router_failures(&self) -> Result<(u64, u64)> {
        let text = self.router.within(|| std::fs::read_to_string("/proc/thread-self/net/stat/nf_conntrack"))?;
        let mut lines = text.lines();
        let head: Vec<&str> = lines.next().unwrap_or("").split_whitespace().collect();
        let col = |name: &str| head.iter().position(|h| *h == name);
        let (fi, di) = (col("insert_failed"), col("drop"));
        let (mut f, mut d) = (0, 0);
        for l in lines {
            let v: Vec<u64> = l.split_whitespace().map(|x| u64::from_str_radix(x, 16).unwrap_or(0)).collect();
            f += fi.and_then(|i| v.get(i)).copied().unwrap_or(0);
            d += di.and_then(|i| v.get(i)).copied().unwrap_or(0);
        }
        Ok((f, d))
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Variant {
    Without,
    NatOn,
    NatOff,
}

impl Variant {
    fn args(self) -> Option<&'static [&'static str]> {
        match self {
            Variant::Without => None,
            Variant::NatOn => Some(&["--nat", "on"]),
            Variant::NatOff => Some(&["--nat", "off"]),
        }
    }
    fn label(self) -> &'static str {
        match self {
            Variant::Without => "without daemon",
            Variant::NatOn => "with daemon (--nat on)",
            Variant::NatOff => "with daemon, --nat off",
        }
    }
}

/// One load run through a fresh router.
struct LoadRun {
    rate: f64,
    made: u64,
    /// Daemon CPU seconds over the load, and the load's wall time.
    cpu: Option<f64>,
    wall: f64,
    /// The router's conntrack: (insert_failed, drop) added during the load, entries at the end.
    failures: (u64, u64),
    entries: u64,
    dump: Option<(f64, f64)>,
}

fn load_run(ctx: &Ctx, v: Variant, tag: &str, secs: Duration, rate: Option<f64>) -> Result<LoadRun> {
    let z = &ctx.sizes;
    let lab = Lab::new(tag)?;
    let made = Instant::now();
    let daemon = match v.args() {
        Some(a) => Some(start_daemon_with(ctx, &lab.router, tag, a)?.0),
        None => None,
    };
    let g = lab.generator()?;
    // Every variant starts its load the same time after its namespaces were
    // made (the daemon's start included), so that what is left of the
    // previous run's teardown weighs on each alike.
    let settle = Duration::from_millis(if z.smoke { 300 } else { 2000 });
    std::thread::sleep(settle.saturating_sub(made.elapsed()).max(Duration::from_millis(300)));
    let f0 = lab.router_failures()?;
    let cpu0 = daemon.as_ref().map(|d| cpu_seconds(d.pid())).transpose()?;
    let st = g.run(&Sources::Ephemeral(vec![CLIENT]), usize::MAX, z.threads, rate, Some(Instant::now() + secs))?;
    let cpu = match (&daemon, cpu0) {
        (Some(d), Some(c0)) => Some(cpu_seconds(d.pid())? - c0),
        _ => None,
    };
    let f1 = lab.router_failures()?;
    let entries = ctfill::count(&lab.router)?;
    let dump = match (&daemon, v) {
        (Some(_), Variant::NatOn) => {
            let (_, body) = Scraper::new(&lab.router, DAEMON).get("/metrics")?;
            Some((metric_sum(&body, "timewait_nat_dump_duration_seconds", ""), metric_sum(&body, "timewait_nat_dump_entries", "")))
        }
        _ => None,
    };
    drop(daemon);
    drop(g);
    drop(lab);
    // Namespace teardown runs in a kernel worker: let it finish.
    std::thread::sleep(Duration::from_millis(if z.smoke { 500 } else { 2000 }));
    Ok(LoadRun {
        rate: st.rate(),
        made: st.made,
        cpu,
        wall: st.elapsed.as_secs_f64(),
        failures: (f1.0 - f0.0, f1.1 - f0.1),
        entries,
        dump,
    })
}

/// Scenario 10: new NAT connections per second through a router.
pub(super) fn rate(ctx: &Ctx, rep: &mut Report) -> Result<()> {
    const S: &str = "10 NAT conn/s";
    let z = &ctx.sizes;
    let variants = [Variant::Without, Variant::NatOn, Variant::NatOff];
    progress(format!(
        "scenario 10: client -> router (MASQUERADE) -> server, {} rounds of {} s per variant ({:?}), {} client threads, server closes first",
        z.nat_rounds,
        z.nat_run.as_secs(),
        variants,
        z.threads
    ));
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); variants.len()];
    let mut fails = (0u64, 0u64);
    let mut peak_entries = 0u64;
    for r in 0..z.nat_rounds {
        for k in 0..variants.len() {
            let i = (r + k) % variants.len();
            let v = variants[i];
            let run = load_run(ctx, v, &format!("nr{r}{i}"), z.nat_run, None)?;
            progress(format!(
                "  round {r}: {}: {:.0} conn/s ({} made; router: {} entries at the end, insert_failed +{}, drop +{})",
                v.label(),
                run.rate,
                run.made,
                run.entries,
                run.failures.0,
                run.failures.1
            ));
            rates[i].push(run.rate);
            fails.0 += run.failures.0;
            fails.1 += run.failures.1;
            peak_entries = peak_entries.max(run.entries);
        }
    }
    let foreign = foreign_daemons();
    if !foreign.is_empty() {
        rep.note(format!(
            "scenario 10: {} timewaitd process(es) not started by the bench were running at the end of the runs (other test runs on this host); \
             their programs fire in every variant, so \"without daemon\" means without the bench's daemon",
            foreign.len()
        ));
    }
    let fmt = |v: &[f64]| v.iter().map(|r| format!("{r:.0}")).collect::<Vec<_>>().join(", ");
    for (i, v) in variants.iter().enumerate() {
        rep.row(S, format!("new NAT connections/s {} (per run)", v.label()), fmt(&rates[i]), "", None);
    }
    let per_round = |a: usize, b: usize| -> String {
        rates[a].iter().zip(&rates[b]).map(|(x, y)| format!("{:.3}", x / y)).collect::<Vec<_>>().join(", ")
    };
    let med = |i: usize| pct(&rates[i], 50.0);
    let ratio = med(1) / med(0);
    rep.row(
        S,
        "ratio with (--nat on) / without (median of runs)",
        format!("{ratio:.3} (per round: {})", per_round(1, 0)),
        ">= 0.97",
        Some(ratio >= 0.97),
    );
    rep.row(
        S,
        "ratio with --nat off / without: the eBPF side alone (median of runs)",
        format!("{:.3} (per round: {})", med(2) / med(0), per_round(2, 0)),
        "",
        None,
    );
    rep.row(
        S,
        "ratio --nat on / --nat off: the conntrack reader alone (median of runs)",
        format!("{:.3} (per round: {})", med(1) / med(2), per_round(1, 2)),
        "",
        None,
    );
    rep.row(
        S,
        "router conntrack during the runs: insert_failed / drop added (all runs), entries at the end of a run (max)",
        format!("{} / {}, {}", fails.0, fails.1, thousands(peak_entries)),
        "",
        None,
    );
    // The daemon's CPU at a fixed rate: a window of two dumps or more at the
    // default --nat-interval (10 s), with and without the NAT reader. (The
    // load runs above last longer than one interval, so that every run with
    // the reader has a dump of the loaded table in it.)
    let window = if z.smoke { z.nat_run } else { z.nat_run * 2 };
    let target = z.nat_rate as f64;
    progress(format!("  daemon CPU at {} new NAT connections/s for {} s, --nat on then --nat off", z.nat_rate, window.as_secs()));
    let mut cpu = Vec::new();
    for (i, v) in [Variant::NatOn, Variant::NatOff].into_iter().enumerate() {
        let run = load_run(ctx, v, &format!("ncpu{i}"), window, Some(target))?;
        let share = run.cpu.unwrap_or(0.0) / run.wall;
        progress(format!("  {}: {:.0} conn/s reached, daemon CPU {:.2} s over {:.1} s", v.label(), run.rate, run.cpu.unwrap_or(0.0), run.wall));
        cpu.push((v, run, share));
    }
    for (v, run, share) in &cpu {
        rep.row(
            S,
            format!("daemon CPU at a target of {} new NAT connections/s, {} (rate reached)", thousands(z.nat_rate), v.label()),
            format!(
                "{:.2} % of one core ({:.0} conn/s reached{})",
                share * 100.0,
                run.rate,
                run.dump.map_or(String::new(), |(s, e)| format!("; last dump {:.3} s wall over {} entries", s, thousands(e as u64)))
            ),
            "",
            None,
        );
    }
    if cpu.len() == 2 {
        rep.row(
            S,
            "of which the conntrack reader (--nat on minus --nat off)",
            format!("{:.2} % of one core", (cpu[0].2 - cpu[1].2) * 100.0),
            "",
            None,
        );
    }
    Ok(())
}
