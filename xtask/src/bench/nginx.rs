//! Scenario 7: a real server. Debian's nginx (one worker) answers `wrk`
//! (one thread) on loopback in a fresh namespace per run, without and with
//! timewaitd, in interleaved pairs (the order alternates), for two loads:
//! `Connection: close` (nginx closes first: one server-side TIME_WAIT per
//! request) and keep-alive (no TIME_WAIT at all while it runs). The ratio is
//! the median of with/without requests per second.
//!
//! Then one run of each load with `kernel.bpf_stats_enabled`: every program's
//! `run_cnt` before and after the load, and for `Connection: close` again
//! once every TIME_WAIT of the run has expired, so that a minisocket's whole
//! life (creation to expiry) is counted. Divided by the requests: program
//! runs per connection (close) or per request (keep-alive), a count that
//! does not depend on the machine's noise.
//!
//! The same code runs inside Debian's kernels under qemu (`--kernel`): the
//! host runs `xtask bench --in-guest` in each guest, which prints its rows
//! as `BENCHROW` lines that the host adds to its table. Emulated times are
//! not comparable with the host's; the ratio of the same load with and
//! without the daemon in one guest is.

use std::{
    fs,
    net::{Ipv4Addr, SocketAddrV4},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use super::{
    BpfStats, Ctx, DAEMON, Netns, ProgStats, Proc, Report, Scraper, cpu_seconds, pct, progress, prog_stats, start_daemon, thousands,
};

/// Where nginx listens in each namespace.
const NGINX: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 8080);
/// The marker of a row printed by `--in-guest`, read back by the host.
pub(super) const ROW_MARKER: &str = "BENCHROW\t";
/// Longest wait for a run's TIME_WAIT to expire (they live 60 s).
const EXPIRY_WAIT: Duration = Duration::from_secs(90);

/// One load of the scenario.
#[derive(Debug, Clone, Copy)]
struct Load {
    name: &'static str,
    conns: u32,
    close: bool,
    /// The ratio target of issue 13.
    target: f64,
}

const LOADS: [Load; 2] = [
    Load { name: "Connection: close", conns: 8, close: true, target: 0.97 },
    Load { name: "keep-alive", conns: 32, close: false, target: 0.99 },
];

/// What one wrk run said.
#[derive(Debug, Default)]
struct WrkOut {
    requests: u64,
    rps: f64,
    errors: u64,
}

/// What one run measured.
struct RunOut {
    wrk: WrkOut,
    /// The daemon's own CPU over the load (utime + stime / wall), when it ran.
    daemon_cpu: Option<f64>,
    /// The paths the daemon reported (`signal=path, ...`), when it ran.
    paths: Option<String>,
    /// Program stats before the load, after it, and after the TIME_WAIT expired.
    stats: Option<[ProgStats; 3]>,
}

/// Debian's nginx in `ns`, one worker, no access log; config, pid file and
/// logs in the bench's log folder. Returns once `GET /` answers 200.
fn start_nginx(ctx: &Ctx, ns: &Netns, tag: &str) -> Result<Proc> {
    let bin = "/usr/sbin/nginx";
    if !std::path::Path::new(bin).exists() {
        bail!("{bin} is missing: apt-get install nginx-light (cargo xtask setup installs it)");
    }
    let dir = ctx.logs.join(format!("nginx-{tag}"));
    fs::create_dir_all(&dir)?;
    let d = dir.display();
    let conf = format!(
        "worker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\
         events {{ worker_connections 4096; }}\n\
         http {{\n  access_log off;\n  keepalive_requests 1000000;\n\
         \x20 client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n  fastcgi_temp_path {d}/fastcgi;\n\
         \x20 uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
         \x20 server {{\n    listen {NGINX} backlog=4096;\n    location / {{ return 200 \"ok\\n\"; }}\n  }}\n}}\n"
    );
    fs::write(dir.join("nginx.conf"), conf)?;
    let mut cmd = ns.command(bin);
    cmd.args(["-p", &format!("{d}/"), "-e", &format!("{d}/error.log"), "-c", &format!("{d}/nginx.conf"), "-g", "daemon off;"]);
    let mut p = Proc::spawn("nginx", cmd, dir.join("stdout.log"))?;
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut http = Scraper::new(ns, NGINX);
    loop {
        p.check_alive()?;
        if http.get("/").is_ok() {
            return Ok(p);
        }
        if Instant::now() > deadline {
            bail!("nginx not answering on {NGINX} after 30 s (logs in {d})");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `wrk -t1 -cN -dSs [-H 'Connection: close'] http://NGINX/` in `ns`.
fn wrk(ns: &Netns, load: Load, secs: u64) -> Result<WrkOut> {
    let mut cmd = ns.command("wrk");
    cmd.args(["-t1", &format!("-c{}", load.conns), &format!("-d{secs}s")]);
    if load.close {
        cmd.args(["-H", "Connection: close"]);
    }
    cmd.arg(format!("http://{NGINX}/"));
    let out = cmd.stdin(Stdio::null()).output().context("cannot start wrk (apt-get install wrk)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!("wrk failed ({}): {}{}", out.status, text, String::from_utf8_lossy(&out.stderr));
    }
    let mut w = WrkOut::default();
    for line in text.lines().map(str::trim) {
        if let Some((n, _)) = line.split_once(" requests in ") {
            w.requests = n.trim().parse().unwrap_or(0);
        } else if let Some(v) = line.strip_prefix("Requests/sec:") {
            w.rps = v.trim().parse().unwrap_or(0.0);
        } else if let Some(rest) = line.strip_prefix("Socket errors:") {
            w.errors += rest.split(',').filter_map(|f| f.split_whitespace().last()?.parse::<u64>().ok()).sum::<u64>();
        } else if let Some(v) = line.strip_prefix("Non-2xx or 3xx responses:") {
            w.errors += v.trim().parse::<u64>().unwrap_or(0);
        }
    }
    if w.requests == 0 || w.rps <= 0.0 {
        bail!("wrk reported no requests:\n{text}");
    }
    Ok(w)
}

/// The paths the daemon reports, `signal=path` for each signal served.
fn daemon_paths(ns: &Netns) -> Result<String> {
    let (_, body) = Scraper::new(ns, DAEMON).get("/metrics")?;
    let text = String::from_utf8_lossy(&body);
    let mut paths: Vec<String> = text
        .lines()
        .filter(|l| l.starts_with("timewait_probe_path{") && l.ends_with(" 1"))
        .filter_map(|l| {
            let label = |k: &str| l.split(&format!("{k}=\"")).nth(1)?.split('"').next().map(str::to_string);
            Some(format!("{}={}", label("signal")?, label("path")?))
        })
        .collect();
    paths.sort();
    Ok(paths.join(", "))
}

/// One run in a fresh namespace.
fn one_run(ctx: &Ctx, load: Load, with_daemon: bool, tag: &str, stats: bool) -> Result<RunOut> {
    let ns = Netns::roomy(tag, 400_000)?;
    let nginx_proc = start_nginx(ctx, &ns, tag)?;
    let daemon = if with_daemon { Some(start_daemon(ctx, &ns, tag)?.0) } else { None };
    let paths = if with_daemon { Some(daemon_paths(&ns)?) } else { None };
    let snap = |d: &Option<Proc>| d.as_ref().map(|d| prog_stats(d.pid())).transpose();
    let before = if stats { snap(&daemon)? } else { None };
    let cpu0 = daemon.as_ref().map(|d| cpu_seconds(d.pid())).transpose()?;
    let t0 = Instant::now();
    let w = wrk(&ns, load, ctx.sizes.nginx_secs)?;
    let daemon_cpu = match (&daemon, cpu0) {
        (Some(d), Some(c0)) => Some((cpu_seconds(d.pid())? - c0) / t0.elapsed().as_secs_f64()),
        _ => None,
    };
    let mut stats_out = None;
    if let Some(before) = before {
        let after = snap(&daemon)?.unwrap_or_default();
        let mut expired = after.clone();
        if load.close && ctx.sizes.nginx_expiry {
            progress(format!("  waiting for the run's {} TIME_WAIT to expire (60 s)", ns.tw_count()?));
            let deadline = Instant::now() + EXPIRY_WAIT;
            while ns.tw_count()? > 0 {
                if Instant::now() > deadline {
                    bail!("{} TIME_WAIT still there {} s after the run", ns.tw_count()?, EXPIRY_WAIT.as_secs());
                }
                std::thread::sleep(Duration::from_millis(500));
            }
            expired = snap(&daemon)?.unwrap_or_default();
        }
        stats_out = Some([before, after, expired]);
    }
    drop(daemon);
    drop(nginx_proc);
    drop(ns);
    // Namespace teardown (freeing its TIME_WAIT) runs in a kernel worker.
    std::thread::sleep(Duration::from_millis(1500));
    Ok(RunOut { wrk: w, daemon_cpu, paths, stats: stats_out })
}

/// Which end of a loopback connection a program runs for, on the fentry
/// path (bpftool shows the first 15 characters of a program's name): the
/// side that holds the TIME_WAIT (its creation, the segments that meet it,
/// its end), the side that connected (choosing its port), or both (each end
/// releases its port once).
fn side(name: &str) -> Option<&'static str> {
    let n = name;
    if n.starts_with("fentry_put_port") {
        Some("both")
    } else if n.contains("hash_conn") || n.contains("hash6_conn") {
        Some("connecting")
    } else if n.starts_with("fentry_tw") || n.starts_with("fexit_tw") || n.starts_with("kprobe_tw") || n.starts_with("kretprobe_tw") {
        Some("holder")
    } else {
        None
    }
}

/// run_cnt deltas per program between two snapshots.
fn deltas(a: &ProgStats, b: &ProgStats) -> Vec<(String, u64, u64)> {
    b.iter()
        .map(|(name, ns, cnt)| {
            let (ns0, cnt0) = a.iter().find(|(n, ..)| n == name).map_or((0, 0), |(_, t, c)| (*t, *c));
            (name.clone(), ns.saturating_sub(ns0), cnt.saturating_sub(cnt0))
        })
        .filter(|(_, _, c)| *c > 0)
        .collect()
}

pub(super) fn nginx(ctx: &Ctx, rep: &mut Report, label: &str) -> Result<()> {
    let s = format!("7 nginx+wrk ({label})");
    let z = &ctx.sizes;
    let mut paths_seen = None;
    for load in LOADS {
        progress(format!(
            "scenario 7 ({label}): nginx + wrk -c{} {}, {} pairs of {} s without/with the daemon, interleaved",
            load.conns, load.name, z.nginx_pairs, z.nginx_secs
        ));
        let (mut without, mut with, mut ratios, mut cpu) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for p in 0..z.nginx_pairs {
            let order = if p % 2 == 0 { [false, true] } else { [true, false] };
            let mut pair = [0.0; 2];
            for w in order {
                let tag = format!("ng{}{p}{}", u8::from(load.close), if w { "d" } else { "n" });
                let r = one_run(ctx, load, w, &tag, false)?;
                if r.wrk.errors > 0 {
                    rep.note(format!("scenario 7 ({label}), {} pair {p}: wrk counted {} errors", load.name, r.wrk.errors));
                }
                if paths_seen.is_none() {
                    paths_seen = r.paths;
                }
                cpu.extend(r.daemon_cpu);
                progress(format!("  pair {p}: {} daemon: {:.0} requests/s", if w { "with" } else { "without" }, r.wrk.rps));
                pair[usize::from(w)] = r.wrk.rps;
            }
            without.push(pair[0]);
            with.push(pair[1]);
            ratios.push(pair[1] / pair[0]);
        }
        let ratio = pct(&with, 50.0) / pct(&without, 50.0);
        let fmt = |v: &[f64]| v.iter().map(|r| format!("{r:.0}")).collect::<Vec<_>>().join(", ");
        rep.row(&s, format!("{}: requests/s without daemon", load.name), fmt(&without), "", None);
        rep.row(&s, format!("{}: requests/s with daemon", load.name), fmt(&with), "", None);
        rep.row(
            &s,
            format!("{}: throughput ratio with/without (median of runs)", load.name),
            format!("{ratio:.3} (per pair: {})", ratios.iter().map(|r| format!("{r:.3}")).collect::<Vec<_>>().join(", ")),
            &format!(">= {}", load.target),
            Some(ratio >= load.target),
        );
        // What the daemon's own process (drains, walks) takes meanwhile: on
        // 2 CPUs it competes with nginx and wrk for them.
        rep.row(
            &s,
            format!("{}: daemon CPU during the load (utime+stime / wall, median)", load.name),
            format!("{:.1} % of one CPU", 100.0 * pct(&cpu, 50.0)),
            "",
            None,
        );
    }
    if let Some(p) = &paths_seen {
        rep.row(&s, "probe paths the daemon reported", p.clone(), "", None);
    }
    let fentry = paths_seen.as_deref().is_some_and(|p| p.contains("lifecycle=fentry"));
    // Program runs: one more run of each load with the statistics on.
    let guard = BpfStats::enable()?;
    for load in LOADS {
        progress(format!("scenario 7 ({label}): {} with kernel.bpf_stats_enabled", load.name));
        let r = one_run(ctx, load, true, &format!("ngstats{}", u8::from(load.close)), true)?;
        let [before, after, expired] = r.stats.context("no program statistics")?;
        // The iterator's runs are reconciliation walks (one per socket of
        // the namespace per walk), not events: counted apart.
        let (walks, during): (Vec<_>, Vec<_>) = deltas(&before, &after).into_iter().partition(|(n, ..)| n.starts_with("iter"));
        let all: Vec<_> = deltas(&before, &expired).into_iter().filter(|(n, ..)| !n.starts_with("iter")).collect();
        let walked: u64 = walks.iter().map(|(_, _, c)| c).sum();
        if walked > 0 {
            rep.row(&s, format!("{}: sockets visited by reconciliation walks during the load", load.name), thousands(walked), "", None);
        }
        if all.is_empty() && load.close {
            bail!("bpftool shows no program run of the daemon's");
        }
        let n = r.wrk.requests as f64;
        let total: u64 = all.iter().map(|(_, _, c)| c).sum();
        let per = |c: u64| c as f64 / n;
        let list = |v: &[(String, u64, u64)]| {
            v.iter().map(|(name, _, c)| format!("{name} {:.2}", per(*c))).collect::<Vec<_>>().join(", ")
        };
        if load.close {
            rep.row(
                &s,
                format!(
                    "{}: program runs per connection, {} ({} connections)",
                    load.name,
                    if z.nginx_expiry { "creation to expiry" } else { "expiry not included (smoke)" },
                    thousands(r.wrk.requests)
                ),
                format!("{:.2}: {}", per(total), list(&all)),
                if fentry { "<= 6 (loopback: both ends)" } else { "" },
                fentry.then_some(per(total) <= 6.05),
            );
            if fentry {
                let sum = |want: &str| all.iter().filter(|(n, ..)| side(n) == Some(want)).map(|(_, _, c)| *c).sum::<u64>();
                let both = sum("both") as f64 / 2.0;
                let holder = (sum("holder") as f64 + both) / n;
                let other = (sum("connecting") as f64 + both) / n;
                rep.row(&s, format!("{}: runs per TIME_WAIT lifecycle, holding side", load.name), format!("{holder:.2}"), "<= 4", Some(holder <= 4.05));
                rep.row(&s, format!("{}: runs per connection, the other end", load.name), format!("{other:.2}"), "<= 2", Some(other <= 2.05));
            }
            let ns: u64 = all.iter().map(|(_, t, _)| t).sum();
            rep.row(&s, format!("{}: program time per connection (run_time_ns)", load.name), format!("{:.0} ns", ns as f64 / n), "", None);
        } else {
            let during_total: u64 = during.iter().map(|(_, _, c)| c).sum();
            rep.row(
                &s,
                format!("{}: program runs per request ({} requests on {} connections, their opening and closing included)", load.name, thousands(r.wrk.requests), load.conns),
                format!("{:.4} ({} runs){}{}", per(during_total), thousands(during_total), if during.is_empty() { "" } else { ": " }, list(&during)),
                if fentry { "0 per request" } else { "" },
                // The connections' own opening and closing: a few runs each.
                fentry.then_some(during_total <= 8 * u64::from(load.conns)),
            );
        }
    }
    drop(guard);
    Ok(())
}

/// The host's part for the guests: boots each kernel, runs this scenario in
/// it with the same sizes, and adds the rows it printed.
pub(super) fn in_guests(ctx: &Ctx, rep: &mut Report, kernels: &[&'static crate::vm::GuestKernel]) -> Result<()> {
    if kernels.is_empty() {
        return Ok(());
    }
    let kernels = crate::vm::ensure_tools(kernels)?;
    let xtask = std::env::current_exe().context("the xtask executable")?;
    for k in &kernels {
        let cmd = format!(
            "TIMEWAIT_BENCH_LABEL='{} guest' TIMEWAIT_BENCH_DAEMON={} {} bench --in-guest --only 7 --nginx-pairs {} --nginx-secs {}",
            k.guest.name,
            ctx.bin.display(),
            xtask.display(),
            ctx.sizes.nginx_pairs,
            ctx.sizes.nginx_secs
        );
        let limit = Duration::from_secs(1800);
        let started = Instant::now();
        let result = crate::vm::run_in_guest(k, &cmd, limit)?;
        let mut rows = 0;
        for line in &result.console {
            let Some(at) = line.find(ROW_MARKER) else { continue };
            let f: Vec<&str> = line[at + ROW_MARKER.len()..].split('\t').collect();
            if let [scenario, measure, value, target, met] = f[..] {
                let met = match met.trim() {
                    "met" => Some(true),
                    "missed" => Some(false),
                    _ => None,
                };
                rep.row(scenario, measure, value, target, met);
                rows += 1;
            }
        }
        for line in result.console.iter().filter(|l| l.contains("bench: note: ")) {
            rep.note(format!("{} guest: {}", k.guest.name, line.split("bench: note: ").nth(1).unwrap_or("")));
        }
        if !matches!(result.outcome, crate::vm::Outcome::Exited(0)) || rows == 0 {
            bail!("scenario 7 in the {} guest: {} ({rows} rows)", k.guest.name, result.outcome);
        }
        progress(format!("scenario 7 in the {} guest: {rows} rows in {:.0} s", k.guest.name, started.elapsed().as_secs_f64()));
    }
    Ok(())
}

/// Prints the rows for the host to read back (`--in-guest`).
pub(super) fn print_rows(rep: &Report) {
    for r in &rep.rows {
        let met = match r.met {
            Some(true) => "met",
            Some(false) => "missed",
            None => "-",
        };
        println!("{ROW_MARKER}{}\t{}\t{}\t{}\t{met}", r.scenario, r.measure, r.value, r.target);
    }
}

/// The kernel's name for the guest label (`uname -r`).
pub(super) fn kernel_release() -> String {
    Command::new("uname").arg("-r").output().map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string()).unwrap_or_default()
}
