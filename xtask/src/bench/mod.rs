//! `cargo xtask bench`: the performance scenarios of issue 6, run on this
//! machine in network namespaces the bench creates (and always deletes).
//!
//! 1. scrape cost with N TIME_WAIT sockets from many remotes, against the
//!    usual `ss | awk | sed | sort | uniq -c` pipeline, interleaved, and the
//!    curve at N/10, N/4, N/2, N;
//! 2. kernel overhead: loopback connect/accept/close churn with and without
//!    the daemon, interleaved pairs, and each program's run time
//!    (`kernel.bpf_stats_enabled`);
//! 3. the daemon's CPU and RSS at steady state (N TIME_WAIT, a churn, a scrape
//!    every second);
//! 4. start-up with N TIME_WAIT already there: exec to `/readyz` 200;
//! 5. node_exporter's sockstat collector, scraped the same way, for reference;
//! 6. what the per-socket reconciliation walk and a scrape cost at N and 10 x N
//!    TIME_WAIT sockets (`reconcile.rs`), from which the default
//!    `--reconcile-interval` is chosen;
//! 7. a real server: nginx + wrk, `Connection: close` and keep-alive, with
//!    and without the daemon, and program runs per connection, on the host
//!    and in Debian's kernels under qemu (`nginx.rs`);
//! 8. system calls with and without the daemon (`syscalls.rs`);
//! 9. NAT (issue 27): the start-up conntrack dump and memory at 100,000 and
//!    1,000,000 entries, and 1,000,000 toward as many destinations
//!    (`nat.rs`, `ctfill.rs`: the entries made over ctnetlink);
//! 10. NAT: new connections per second through a MASQUERADE router with and
//!     without the daemon, and its CPU at 10,000 new NAT connections/s
//!     (`nat.rs`). `--only nat` runs 9 and 10.
//!
//! Each scenario has its file; what they share has one file per concern:
//! `netns.rs` (namespaces), `procs.rs` (processes), `http.rs` (the HTTP
//! client, the daemon started), `sockets.rs` (the socket generator) and
//! `stats.rs` (statistics).
//!
//! `--smoke` runs the same code at small sizes, prints the table and leaves
//! BENCHMARKS.md alone; it fails only on errors, never on a missed target.

use std::{
    fmt::Write as _,
    fs::File,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream},
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
        unix::process::CommandExt as _,
    },
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::{
    cmd::{sh, workspace_root},
    setup,
};

mod ctfill;
mod nat;
mod nginx;
mod overhead;
mod reconcile;
mod scrape;
mod startup;
mod steady;
mod syscalls;

mod http;
mod netns;
mod procs;
mod sockets;
mod stats;

use self::{http::*, netns::*, procs::*, sockets::*, stats::*};

/// Where the daemon listens inside each namespace.
const DAEMON: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 19868);
/// Where node_exporter listens inside its namespace.
const NODE_EXPORTER: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 9100);
/// The usual script: TIME_WAIT sockets grouped by peer address.
const SS_PIPELINE: &str = "ss -Htan state time-wait | awk '{print $4}' | sed 's/:[0-9]*$//' | sort | uniq -c";
/// Text kept across runs: everything in BENCHMARKS.md from this line on.
const KEEP_MARKER: &str = "<!-- Everything below this line is kept when `cargo xtask bench` rewrites the file. -->";

#[derive(Debug, Clone, Default, clap::Args)]
pub struct BenchArgs {
    /// Small sizes (2,000 sockets, 20 scrapes, short churn): same code paths, prints the table, does not write BENCHMARKS.md.
    #[arg(long)]
    pub smoke: bool,
    /// TIME_WAIT sockets for scenarios 1, 3 and 4 [default: 100000; smoke: 2000].
    #[arg(long, value_name = "N")]
    pub sockets: Option<usize>,
    /// Distinct remote addresses they come from (127.0.x.y) [default: 1000; smoke: 100].
    #[arg(long, value_name = "N")]
    pub remotes: Option<usize>,
    /// Scrapes of each kind at the largest size (a quarter of it at the smaller ones) [default: 200; smoke: 20].
    #[arg(long, value_name = "N")]
    pub scrapes: Option<usize>,
    /// Connections per churn run in scenario 2 [default: 60000; smoke: 3000].
    #[arg(long, value_name = "N")]
    pub churn_conns: Option<usize>,
    /// Interleaved (without, with) daemon pairs in scenario 2 [default: 5; smoke: 2].
    #[arg(long, value_name = "N")]
    pub pairs: Option<usize>,
    /// Seconds of steady state in scenario 3 [default: 20; smoke: 3].
    #[arg(long, value_name = "S")]
    pub steady_secs: Option<u64>,
    /// Connections per second of churn in scenario 3 [default: 10000; smoke: 1000].
    #[arg(long, value_name = "N")]
    pub churn_rate: Option<u64>,
    /// Client threads of the socket generator [default: 2 x CPUs].
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,
    /// Interleaved (without, with) daemon pairs per load in scenario 7 [default: 4; smoke: 1].
    #[arg(long, value_name = "N")]
    pub nginx_pairs: Option<usize>,
    /// Seconds of wrk per run in scenario 7 [default: 4; smoke: 1].
    #[arg(long, value_name = "S")]
    pub nginx_secs: Option<u64>,
    /// Where scenario 7 runs: host, 5.10, 6.1, 6.12 or all (comma-separated) [default: all; smoke: host].
    #[arg(long = "kernel", value_delimiter = ',', value_name = "K")]
    pub kernels: Vec<String>,
    /// Conntrack entries for scenario 9's start-up dumps (comma-separated) [default: 100000,1000000; smoke: 2000].
    #[arg(long, value_delimiter = ',', value_name = "N")]
    pub nat_entries: Vec<usize>,
    /// Entries toward as many distinct destinations in scenario 9 (the memory worst case) [default: 1000000; smoke: 3000].
    #[arg(long, value_name = "N")]
    pub nat_wide: Option<usize>,
    /// Seconds of each load run through the NAT router in scenario 10 (the CPU runs: twice that) [default: 15, more than one `--nat-interval`; smoke: 2].
    #[arg(long, value_name = "S")]
    pub nat_secs: Option<u64>,
    /// Rounds of scenario 10 (each: without the daemon, with it, with it and `--nat off`, in rotating order) [default: 6; smoke: 1].
    #[arg(long, value_name = "N")]
    pub nat_rounds: Option<usize>,
    /// New NAT connections per second at which scenario 10 measures the daemon's CPU [default: 10000; smoke: 1000].
    #[arg(long, value_name = "N")]
    pub nat_rate: Option<u64>,
    /// Run only these scenarios (comma-separated, 1-10, or `nat` for 9 and 10; 5 runs inside 1).
    #[arg(long, value_delimiter = ',', value_name = "LIST", value_parser = parse_only)]
    pub only: Vec<Vec<u8>>,
    /// Inside a guest of `--kernel`: run with the daemon named by
    /// TIMEWAIT_BENCH_DAEMON and print the rows for the host.
    #[arg(long, hide = true)]
    pub in_guest: bool,
    /// Do not write BENCHMARKS.md (smoke never writes it).
    #[arg(long)]
    pub no_write: bool,
}

impl BenchArgs {
    /// `--smoke` with every other option at its default (for `xtask test`).
    pub fn smoke() -> Self {
        Self { smoke: true, ..Self::default() }
    }
}

/// One item of `--only`: a scenario number, or `nat` (9 and 10).
fn parse_only(s: &str) -> Result<Vec<u8>, String> {
    match s.trim() {
        "nat" => Ok(vec![9, 10]),
        n => match n.parse::<u8>() {
            Ok(v @ 1..=10) => Ok(vec![v]),
            _ => Err(format!("`{n}`: a scenario is 1-10 or `nat`")),
        },
    }
}

/// Sizes resolved from the flags.
#[derive(Debug, Clone)]
struct Sizes {
    sockets: usize,
    remotes: usize,
    scrapes: usize,
    churn_conns: usize,
    pairs: usize,
    steady: Duration,
    churn_rate: u64,
    threads: usize,
    nginx_pairs: usize,
    nginx_secs: u64,
    /// Scenario 7 waits for a run's TIME_WAIT to expire (not in smoke runs).
    nginx_expiry: bool,
    /// Bytes `dd bs=1` copies per run in scenario 8 (two system calls each).
    dd_bytes: usize,
    /// Rounds of scenario 8's three variants (a run is about a second; the
    /// spread between runs is several percent here, so many).
    dd_rounds: usize,
    /// `--smoke`: shorter waits where a scenario has them.
    smoke: bool,
    /// Scenario 9: conntrack entries toward 1,000 destinations, per size.
    nat_entries: Vec<usize>,
    /// Scenario 9: entries toward as many destinations.
    nat_wide: usize,
    /// Scenario 9: `--nat-max-destinations` for the wide fill (None: the
    /// daemon's default; smoke lowers it so the cap is reached).
    nat_wide_cap: Option<usize>,
    /// Scenario 10: one load run.
    nat_run: Duration,
    nat_rounds: usize,
    nat_rate: u64,
}

impl Sizes {
    fn from(a: &BenchArgs) -> Self {
        let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
        let pick = |v: Option<usize>, full: usize, smoke: usize| v.unwrap_or(if a.smoke { smoke } else { full });
        Sizes {
            sockets: pick(a.sockets, 100_000, 2_000).max(10),
            remotes: pick(a.remotes, 1_000, 100).clamp(1, 250 * 200),
            scrapes: pick(a.scrapes, 200, 20).max(4),
            churn_conns: pick(a.churn_conns, 60_000, 3_000).max(100),
            pairs: pick(a.pairs, 5, 2).max(1),
            steady: Duration::from_secs(a.steady_secs.unwrap_or(if a.smoke { 3 } else { 20 }).max(1)),
            churn_rate: a.churn_rate.unwrap_or(if a.smoke { 1_000 } else { 10_000 }).max(10),
            threads: a.threads.unwrap_or(2 * cpus).max(1),
            nginx_pairs: pick(a.nginx_pairs, 4, 1).max(1),
            nginx_secs: a.nginx_secs.unwrap_or(if a.smoke { 1 } else { 4 }).max(1),
            nginx_expiry: !a.smoke,
            dd_bytes: if a.smoke { 100_000 } else { 2_000_000 },
            dd_rounds: if a.smoke { 1 } else { 12 },
            smoke: a.smoke,
            nat_entries: if !a.nat_entries.is_empty() {
                a.nat_entries.iter().map(|&n| n.max(10)).collect()
            } else if a.smoke {
                vec![2_000]
            } else {
                vec![100_000, 1_000_000]
            },
            nat_wide: pick(a.nat_wide, 1_000_000, 3_000),
            nat_wide_cap: a.smoke.then_some(1_000),
            nat_run: Duration::from_secs(a.nat_secs.unwrap_or(if a.smoke { 2 } else { 15 }).max(1)),
            nat_rounds: pick(a.nat_rounds, 6, 1).max(1),
            nat_rate: a.nat_rate.unwrap_or(if a.smoke { 1_000 } else { 10_000 }).max(10),
        }
    }
}

/// One line of the result table.
struct Row {
    scenario: String,
    measure: String,
    value: String,
    target: String,
    /// Some(true) met, Some(false) missed, None: no target.
    met: Option<bool>,
}

#[derive(Default)]
struct Report {
    rows: Vec<Row>,
    notes: Vec<String>,
}

impl Report {
    fn row(&mut self, scenario: impl Into<String>, measure: impl Into<String>, value: impl Into<String>, target: &str, met: Option<bool>) {
        let r = Row { scenario: scenario.into(), measure: measure.into(), value: value.into(), target: target.to_string(), met };
        eprintln!("bench: [{}] {}: {}{}", r.scenario, r.measure, r.value, verdict_suffix(&r));
        self.rows.push(r);
    }
    fn note(&mut self, s: impl Into<String>) {
        let s = s.into();
        eprintln!("bench: note: {s}");
        self.notes.push(s);
    }
}

fn verdict_suffix(r: &Row) -> String {
    match r.met {
        Some(true) => format!("  (target {}: met)", r.target),
        Some(false) => format!("  (target {}: MISSED)", r.target),
        None => String::new(),
    }
}

fn verdict(r: &Row) -> &'static str {
    match r.met {
        Some(true) => "met",
        Some(false) => "**missed**",
        None => "",
    }
}

fn progress(msg: impl std::fmt::Display) {
    eprintln!("bench: {msg}");
}

pub fn run(args: BenchArgs) -> Result<()> {
    if !setup::is_root() {
        bail!("the bench creates network namespaces and loads eBPF programs: run it as root");
    }
    let sizes = Sizes::from(&args);
    if args.in_guest {
        return in_guest(sizes);
    }
    let guests = guest_kernels(&args)?;
    setup::toolchain()?;
    sh(Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
        .current_dir(workspace_root())
        .args(["build", "--release", "--package", "timewait-daemon"]))?;
    let bin = workspace_root().join("target/release/timewaitd");
    let logs = workspace_root().join("target/bench");
    std::fs::create_dir_all(&logs)?;
    remove_stale_namespaces();
    let want = |n: u8| args.only.is_empty() || args.only.iter().flatten().any(|&o| o == n);
    let started = Instant::now();
    let ctx = Ctx { bin, logs, sizes: sizes.clone() };
    let mut rep = Report::default();
    progress(format!("sizes: {sizes:?}"));
    let others = foreign_daemons();
    if !others.is_empty() {
        rep.note(format!(
            "other timewaitd processes were running on this host when the bench started (pids {others:?}): their eBPF programs fire for every namespace and add to both sides of scenario 2"
        ));
    }
    if want(1) || want(5) {
        scrape::scrape_cost(&ctx, &mut rep, want(5)).context("scenario 1 (scrape cost)")?;
    }
    if want(4) {
        startup::startup(&ctx, &mut rep).context("scenario 4 (start-up)")?;
    }
    if want(3) {
        steady::steady(&ctx, &mut rep).context("scenario 3 (steady state)")?;
    }
    if want(2) {
        overhead::overhead(&ctx, &mut rep).context("scenario 2 (kernel overhead)")?;
    }
    if want(6) {
        reconcile::reconcile(&ctx, &mut rep).context("scenario 6 (reconciliation and read cost)")?;
    }
    if want(7) {
        if guests.host {
            nginx::nginx(&ctx, &mut rep, "host").context("scenario 7 (nginx + wrk)")?;
        }
        nginx::in_guests(&ctx, &mut rep, &guests.guests).context("scenario 7 (nginx + wrk) in the guests")?;
    }
    if want(8) {
        syscalls::syscalls(&ctx, &mut rep).context("scenario 8 (system calls)")?;
    }
    if want(9) {
        nat::startup(&ctx, &mut rep).context("scenario 9 (NAT: start-up dump and memory)")?;
    }
    if want(10) {
        nat::rate(&ctx, &mut rep).context("scenario 10 (NAT: new connections through a router)")?;
    }
    let table = render_table(&rep);
    println!("{table}");
    for n in &rep.notes {
        println!("- {n}");
    }
    let missed = rep.rows.iter().filter(|r| r.met == Some(false)).count();
    println!(
        "bench: {} rows, {missed} target(s) missed, {:.0} s",
        rep.rows.len(),
        started.elapsed().as_secs_f64()
    );
    if args.smoke || args.no_write || !args.only.is_empty() {
        progress("BENCHMARKS.md left as it is (smoke, --no-write or --only)");
    } else {
        write_markdown(&rep, &table, &sizes)?;
        progress("wrote BENCHMARKS.md");
    }
    Ok(())
}

/// Where scenario 7 runs.
struct Where {
    host: bool,
    guests: Vec<&'static crate::vm::GuestKernel>,
}

fn guest_kernels(args: &BenchArgs) -> Result<Where> {
    let default = if args.smoke { vec!["host".to_string()] } else { vec!["all".to_string()] };
    let names = if args.kernels.is_empty() { &default } else { &args.kernels };
    let mut w = Where { host: false, guests: Vec::new() };
    for name in names {
        match name.as_str() {
            "host" => w.host = true,
            "all" => {
                w.host = true;
                w.guests = crate::vm::GUEST_KERNELS.iter().collect();
            }
            k => {
                let g = crate::vm::GuestKernel::by_name(k)?;
                if !w.guests.contains(&g) {
                    w.guests.push(g);
                }
            }
        }
    }
    Ok(w)
}

/// `--in-guest`: scenario 7 alone, in the guest the host booted, with the
/// daemon the host built; the rows go to the console for the host.
fn in_guest(sizes: Sizes) -> Result<()> {
    let bin = std::env::var_os("TIMEWAIT_BENCH_DAEMON").context("--in-guest needs TIMEWAIT_BENCH_DAEMON")?;
    let logs = std::env::temp_dir().join("timewait-bench");
    std::fs::create_dir_all(&logs)?;
    let label = std::env::var("TIMEWAIT_BENCH_LABEL").unwrap_or_else(|_| nginx::kernel_release());
    let ctx = Ctx { bin: bin.into(), logs, sizes };
    let mut rep = Report::default();
    nginx::nginx(&ctx, &mut rep, &label)?;
    nginx::print_rows(&rep);
    Ok(())
}

struct Ctx {
    bin: PathBuf,
    logs: PathBuf,
    sizes: Sizes,
}

// ------------------------------------------------------------------ reporting

fn render_table(rep: &Report) -> String {
    let mut t = String::from("| scenario | measure | value | target | |\n| --- | --- | --- | --- | --- |\n");
    for r in &rep.rows {
        let _ = writeln!(t, "| {} | {} | {} | {} | {} |", r.scenario, r.measure, r.value, r.target, verdict(r));
    }
    t
}

fn capture(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name").and_then(|r| r.split_once(':')).map(|(_, v)| v.trim().to_string()))
        .unwrap_or_else(|| "unknown".into());
    let mem = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:").map(|v| v.trim().to_string()))
        .unwrap_or_default();
    let mem_gb = mem.split_whitespace().next().and_then(|k| k.parse::<f64>().ok()).map_or(mem.clone(), |k| format!("{:.1} GiB", k / 1024.0 / 1024.0));
    format!(
        "- CPUs (`nproc`): {}\n- CPU model: {model}\n- kernel: {}\n- memory: {mem_gb}\n- rustc: {}",
        capture("nproc", &[]),
        capture("uname", &["-r"]),
        capture("rustc", &["--version"]),
    )
}

fn write_markdown(rep: &Report, table: &str, z: &Sizes) -> Result<()> {
    let path = workspace_root().join("BENCHMARKS.md");
    let kept = std::fs::read_to_string(&path)
        .ok()
        .and_then(|old| old.find(KEEP_MARKER).map(|i| old[i + KEEP_MARKER.len()..].to_string()))
        .unwrap_or_else(|| "\n\n## Analysis\n\n(none yet)\n".into());
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut md = String::new();
    let _ = writeln!(md, "# Benchmarks\n");
    let _ = writeln!(
        md,
        "Written by `cargo xtask {}` on {} (UTC), the whole run in one go; ratios are measured side by side in that run. \
         Every scenario runs in network namespaces the bench creates (`ip netns add`, `lo` up, \
         `net.ipv4.tcp_max_tw_buckets` raised, `ip_local_port_range` = `1024 65535`) with its own `timewaitd` (release build). \
         Rerun: `cargo xtask bench` (as root; `--smoke` for small sizes, which does not touch this file).\n",
        args.join(" "),
        capture("date", &["-u", "+%Y-%m-%d %H:%M"])
    );
    let _ = writeln!(md, "## Machine\n\n{}\n", machine());
    let _ = writeln!(
        md,
        "## How\n\n\
         - TIME_WAIT sockets: loopback connections from {} remotes (127.0.x.y, source address bound with `IP_BIND_ADDRESS_NO_PORT`) \
         to 127.0.0.1:8080, {} client threads; the server closes first, so the server side keeps one TIME_WAIT per connection, labelled inbound by the daemon.\n\
         - Scrapes: keep-alive HTTP/1.1 connections (as Prometheus does) that end with an RST (`SO_LINGER` 0), so scraping leaves no TIME_WAIT. \
         `/metrics`, `/api/v1/snapshot`, the `ss` pipeline and node_exporter are interleaved request by request (the order rotates); \
         the time is request to last byte of the body. The `ss` pipeline is `{}` run with `sh -c` inside the namespace (time from spawn to exit).\n\
         - Scenario 2: each run is a fresh namespace (so TIME_WAIT sockets of earlier runs do not pile up) with `--churn-conns` {} connections made as fast as \
         {} threads go, server closing first; with/without alternate in order pair by pair; the per-program figures come from one extra run with \
         `kernel.bpf_stats_enabled=1` (reset afterwards), from `bpftool prog show -j`, programs held by the daemon's pid.\n\
         - Scenario 3: {} TIME_WAIT, then a churn of {}/s over {} fixed (address, port) tuples, so that after a warm-up pass every SYN lands on the TIME_WAIT \
         the previous pass left (accepted reuse: one TIME_WAIT killed, one created per connection, population constant), for {} s, \
         while `/metrics` is scraped every second. CPU is utime+stime from `/proc/PID/stat` over the window; memory from `/proc/PID/status`.\n\
         - Scenario 4: {} TIME_WAIT created with no daemon running; then three starts, each from `spawn()` to the first `/readyz` 200 (polled every 2 ms).\n\
         - Scenario 5: Debian's `prometheus-node-exporter --collector.disable-defaults --collector.sockstat` in the scrape namespace, scraped in the same loop.\n\
         - Scenario 7: Debian's nginx (one worker, `return 200`, no access log) and `wrk -t1` on 127.0.0.1:8080 in a fresh namespace per run, \
         `-c8 -H 'Connection: close'` (nginx closes first: a server-side TIME_WAIT per request) and `-c32` keep-alive, {} s per run, \
         {} interleaved pairs per load (the order alternates; with = a daemon started and ready before wrk starts); the ratio is the median with over the median without. \
         Program runs: one more run per load with `kernel.bpf_stats_enabled=1`, `run_cnt` of the daemon's programs before and after the load and, for close, \
         again when every TIME_WAIT of the run has expired (creation to expiry), divided by wrk's requests. On the fentry path each program belongs to one end \
         of a loopback connection: the TIME_WAIT's own hooks to the side holding it, `inet_hash_connect` to the side that connected, `inet_put_port` \
         to both (one run each). In the guests (Debian's kernels under qemu, TCG, 2 vCPUs) the host runs `xtask bench --in-guest` and adds the rows it prints; \
         emulated rates are not comparable with the host's, the ratio in one guest is.\n\
         - Scenario 8: `dd if=/dev/zero of=/dev/null bs=1 count={}` (a read and a write per byte, nothing TCP) in a namespace, without the daemon, \
         with it, and with it and `--syscall-tracepoints`, {} rounds in rotating order (each daemon started and ready before dd starts); \
         wall time over system calls, median per variant.\n\
         - Scenario 9 (NAT): a namespace of its own with {:?} conntrack entries made over ctnetlink (batched `IPCTNL_MSG_CT_NEW`, \
         `xtask/src/bench/ctfill.rs`): the namespace's own TCP connections from 10.200.0.1 (on a veth there) to port 80 of 1,000 destinations, \
         1/4 ESTABLISHED and 3/4 TIME_WAIT, an hour's timeout; then {} entries toward as many destinations (the memory worst case, \
         `--nat-max-destinations` at its default). `nf_conntrack_max` (global) is raised to N + 10 % when needed and restored afterwards. \
         `timewaitd run --nat on` started there: exec to `/readyz` 200 (the first dump happens before ready), memory from `/proc/PID/status` \
         after {} scrapes of `/metrics`, the dump's wall time (`timewait_nat_dump_duration_seconds`) and CPU (the dump thread's own, \
         `dump_cpu_seconds` of `/api/v1/snapshot`; and utime+stime at ready minus an empty start's), and the counts against the fill. \
         Baseline: the same start in an empty namespace (median of three).\n\
         - Scenario 10 (NAT): client -> router -> server namespaces joined by veth pairs, `iptables -t nat -A POSTROUTING -o r1 -j MASQUERADE` \
         in the router, whose conntrack TCP timeouts are shortened (TIME_WAIT and CLOSE 1 s, FIN_WAIT, CLOSE_WAIT, LAST_ACK 2 s) so that neither \
         its table nor the 64,512 NAT ports toward the one server fill at these rates; {} client threads connect, the server closes first \
         (and keeps no TIME_WAIT: `tcp_max_tw_buckets` 0 in its namespace), the client reads EOF and closes, for {} s per run, as fast as they go; \
         each run in fresh namespaces, its load starting 2 s after they were made (the daemon's start included), {} rounds of three variants \
         in rotating order: without the daemon, with `timewaitd run --nat on` in the router, with `--nat off` (its eBPF side alone, which \
         also sees the client's and server's sockets since they share this kernel); ratios of medians. Then the daemon's CPU \
         (utime+stime over the load) at {} new connections/s for {} s, `--nat on` and `--nat off`.\n",
        z.remotes,
        z.threads,
        SS_PIPELINE,
        z.churn_conns,
        z.threads,
        z.sockets,
        z.churn_rate,
        z.churn_rate.div_ceil(10) * 10,
        z.steady.as_secs(),
        z.sockets,
        z.nginx_secs,
        z.nginx_pairs,
        z.dd_bytes,
        z.dd_rounds,
        z.nat_entries,
        z.nat_wide,
        z.scrapes,
        z.threads,
        z.nat_run.as_secs(),
        z.nat_rounds,
        z.nat_rate,
        z.nat_run.as_secs() * 2
    );
    let _ = writeln!(md, "## Results\n\n{table}");
    for n in &rep.notes {
        let _ = writeln!(md, "{n}\n");
    }
    let _ = write!(md, "{KEEP_MARKER}{kept}");
    std::fs::write(&path, md)?;
    Ok(())
}

