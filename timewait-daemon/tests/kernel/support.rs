//! Shared harness for the real-kernel tests: network-namespace guard, daemon
//! guard, a scrape client that leaves no TIME_WAIT behind, a Prometheus text
//! parser, `ss` readers and socket workloads.
//!
//! Every test gets its own network namespace and its own daemon in it, so the
//! tests run in parallel (libtest threads) without counting each other's
//! sockets. Test threads never change namespace themselves: work inside a
//! namespace runs on a fresh thread that `setns()`es first (`NetNs::run`),
//! because `setns` moves only the calling thread.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

/// Where every daemon under test listens, inside its own namespace.
pub const WEB_ADDR: &str = "127.0.0.1:19868";
pub const WEB_PORT: u16 = 19868;

/// How long a daemon may take to become ready, on the host. Emulated guests
/// of the kernel matrix run 10-30x slower: `TIMEWAIT_TEST_READY_SECS` (set by
/// `cargo xtask test` in each guest) overrides it.
fn ready_timeout() -> Duration {
    let secs = std::env::var("TIMEWAIT_TEST_READY_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(60);
    Duration::from_secs(secs)
}

/// The daemon under test: this build's, or `TIMEWAIT_TEST_DAEMON` (the
/// matrix runs the release build in emulated guests, where start-up in a
/// debug build takes a minute).
pub fn daemon_bin() -> String {
    std::env::var("TIMEWAIT_TEST_DAEMON").unwrap_or_else(|_| env!("CARGO_BIN_EXE_timewaitd").to_string())
}
/// How long the "same quiet moment" comparison keeps retrying.
pub const QUIET_TIMEOUT: Duration = Duration::from_secs(20);
/// How long the workloads wait for their sockets to finish closing.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------
// Skipping

/// True when the tests can run. Otherwise says why on stderr (never a silent
/// pass) and the test returns early.
pub fn require_root(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    if euid != 0 {
        // Straight to fd 2, not eprintln!: libtest captures the print macros
        // of a passing test, and a skip must never look like a silent pass.
        let _ = writeln!(
            io::stderr(),
            "SKIPPED {test}: needs root (network namespaces, BPF programs; euid is {euid})"
        );
        return false;
    }
    true
}

// ---------------------------------------------------------------------------
// Polling

/// A wait bound, 3x wider in an emulated guest of the kernel matrix (TCG
/// runs the workloads 10-30x slower; seen: 25 loopback connections not in
/// TIME_WAIT within 10 s on a loaded host).
pub fn scaled(d: Duration) -> Duration {
    if emulated() { d * 3 } else { d }
}

/// Polls `cond` every 50 ms until it holds; panics with `what` after `timeout`.
#[track_caller]
pub fn wait_until(timeout: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let timeout = scaled(timeout);
    let start = Instant::now();
    loop {
        if cond() {
            return;
        }
        if start.elapsed() >= timeout {
            panic!("timed out after {timeout:?} waiting for: {what}");
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// The "same quiet moment" comparison: read `ss`, read the metrics, read `ss`
/// again; accept when both `ss` readings agree and equal the metric reading.
/// Retries for [`QUIET_TIMEOUT`], then panics printing both sides. Returns the
/// agreed value.
#[track_caller]
pub fn quiet_equal<T: PartialEq + Debug>(
    what: &str,
    from_ss: impl FnMut() -> T,
    from_metrics: impl FnMut() -> T,
) -> T {
    quiet_equal_within(what, scaled(QUIET_TIMEOUT), from_ss, from_metrics).0
}

/// [`quiet_equal`] with its own time bound; also returns how long it took.
/// A failure message shows each map cut to 3,000 characters (a daemon that
/// made one series per socket would print tens of thousands).
#[track_caller]
pub fn quiet_equal_within<T: PartialEq + Debug>(
    what: &str,
    timeout: Duration,
    mut from_ss: impl FnMut() -> T,
    mut from_metrics: impl FnMut() -> T,
) -> (T, Duration) {
    let start = Instant::now();
    let mut tries = 0u32;
    // When the last disagreement was printed: the first one, then one every
    // 5 s, so a slow agreement shows in the log what the two sides said.
    let mut shown: Option<Instant> = None;
    loop {
        tries += 1;
        let before = from_ss();
        let metric = from_metrics();
        let after = from_ss();
        if before != metric && shown.is_none_or(|t| t.elapsed() >= Duration::from_secs(5)) {
            shown = Some(Instant::now());
            eprintln!(
                "quiet_equal {what}: reading {tries} at {:?} differs: ss {} / metrics {}",
                start.elapsed(),
                cut(&before, 400),
                cut(&metric, 400)
            );
        }
        if before == after && before == metric {
            eprintln!(
                "quiet_equal {what}: agreed after {tries} reading(s), {:?}: {}",
                start.elapsed(),
                cut(&metric, 400)
            );
            return (metric, start.elapsed());
        }
        if start.elapsed() >= timeout {
            panic!(
                "{what}: ss and metrics never agreed at a quiet moment in {timeout:?} \
                 ({tries} readings)\n  ss before: {}\n  metrics:   {}\n  \
                 ss after:  {}",
                cut(&before, 3000),
                cut(&metric, 3000),
                cut(&after, 3000)
            );
        }
        thread::sleep(Duration::from_millis(200));
    }
}

fn cut<T: Debug>(v: &T, at: usize) -> String {
    let s = format!("{v:?}");
    if s.len() > at { format!("{}... ({} chars)", &s[..at], s.len()) } else { s }
}

/// Panics listing exactly which keys differ between two count maps.
#[track_caller]
pub fn assert_maps_equal<K: Ord + Debug>(
    what: &str,
    expected: &BTreeMap<K, u64>,
    actual: &BTreeMap<K, u64>,
) {
    if expected == actual {
        return;
    }
    let mut diff = String::new();
    for (k, e) in expected {
        match actual.get(k) {
            Some(a) if a == e => {}
            other => diff.push_str(&format!("\n  {k:?}: expected {e}, got {other:?}")),
        }
    }
    for (k, a) in actual {
        if !expected.contains_key(k) {
            diff.push_str(&format!("\n  {k:?}: expected nothing, got {a}"));
        }
    }
    panic!("{what}: maps differ:{diff}");
}

// ---------------------------------------------------------------------------
// Network namespace guard

static NETNS_COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A named network namespace (`ip netns add`), loopback up, deleted on drop.
pub struct NetNs {
    name: String,
}

impl NetNs {
    #[track_caller]
    pub fn new() -> NetNs {
        let n = NETNS_COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!("tw-{}-{n}", std::process::id());
        run_cmd("ip", &["netns", "add", &name]);
        let ns = NetNs { name };
        run_cmd("ip", &["-n", &ns.name, "link", "set", "lo", "up"]);
        // Workloads count the TIME_WAIT they leave. With loopback reuse (the
        // default, 2), a connect() whose port search comes back to one of its
        // own TIME_WAIT ports (the search's offset is shared with every other
        // namespace's tests) takes that socket over and the count falls one
        // short. The tests of that takeover turn it on themselves.
        ns.run(|| std::fs::write("/proc/sys/net/ipv4/tcp_tw_reuse", "0"))
            .unwrap_or_else(|e| panic!("net.ipv4.tcp_tw_reuse=0 in {}: {e}", ns.name));
        ns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    fn path(&self) -> PathBuf {
        PathBuf::from("/var/run/netns").join(&self.name)
    }

    /// Runs `f` on a fresh thread that first joins this namespace. Sockets
    /// created there belong to the namespace for their whole life, so they
    /// may be handed back to (and used from) any thread.
    #[track_caller]
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = self.path();
        thread::scope(|s| {
            s.spawn(move || {
                enter_netns(&path);
                f()
            })
            .join()
            .unwrap_or_else(|e| std::panic::resume_unwind(e))
        })
    }

    /// Like [`NetNs::run`] but in the background.
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> thread::JoinHandle<T> {
        let path = self.path();
        thread::spawn(move || {
            enter_netns(&path);
            f()
        })
    }

    /// `sysctl -w key=value` inside the namespace (sysctls such as
    /// `ip_local_port_range` are per network namespace).
    #[track_caller]
    pub fn sysctl(&self, key: &str, value: &str) {
        run_cmd(
            "ip",
            &[
                "netns",
                "exec",
                &self.name,
                "sysctl",
                "-w",
                &format!("{key}={value}"),
            ],
        );
    }

    /// Runs a command inside the namespace and returns its stdout.
    #[track_caller]
    pub fn exec(&self, args: &[&str]) -> String {
        let mut all = vec!["netns", "exec", &self.name];
        all.extend_from_slice(args);
        run_cmd("ip", &all)
    }

    // --- ss readers --------------------------------------------------------

    /// Parsed `ss -Htano state <state>` lines.
    pub fn ss(&self, state: &str) -> Vec<SsSocket> {
        parse_ss(&self.exec(&["ss", "-Htano", "state", state]))
    }

    /// `ss -Htan state time-wait | wc -l`.
    pub fn ss_tw_total(&self) -> u64 {
        self.ss("time-wait").len() as u64
    }

    /// TIME_WAIT sockets grouped by peer address (port stripped, IPv4-mapped
    /// IPv6 shown as plain IPv4, as the daemon labels it).
    pub fn ss_tw_by_remote(&self) -> BTreeMap<String, u64> {
        group_by_remote(&self.ss("time-wait"))
    }

    /// TIME_WAIT sockets grouped the way the daemon labels them, given the
    /// listening ports: `(direction, remote, port)`.
    pub fn ss_tw_series(&self, listening: &[u16]) -> BTreeMap<SeriesKey, u64> {
        group_by_series(&self.ss("time-wait"), listening)
    }

    /// TIME_WAIT sockets grouped by `(direction, port)` only.
    pub fn ss_tw_by_direction_port(&self, listening: &[u16]) -> BTreeMap<(String, u16), u64> {
        let mut out = BTreeMap::new();
        for ((d, _r, p), n) in self.ss_tw_series(listening) {
            *out.entry((d, p)).or_insert(0) += n;
        }
        out
    }

    /// FIN-WAIT-2 sockets that are minisockets (the kernel shows a
    /// `timewait` timer for those; an orphaned full socket in FIN_WAIT2 shows
    /// `keepalive`), grouped like [`NetNs::ss_tw_series`].
    pub fn ss_fw2_orphan_series(&self, listening: &[u16]) -> BTreeMap<SeriesKey, u64> {
        let orphans: Vec<SsSocket> = self
            .ss("fin-wait-2")
            .into_iter()
            .filter(|s| {
                s.timer
                    .as_deref()
                    .is_some_and(|t| t.starts_with("timewait"))
            })
            .collect();
        group_by_series(&orphans, listening)
    }

    /// Sockets still on their way to closed (or to TIME_WAIT).
    pub fn ss_transient(&self) -> Vec<SsSocket> {
        // One ss for all of them (the filters OR): under emulation each
        // `ip netns exec ss` takes about a second, and seven per check made
        // a wait_settled take longer than a TIME_WAIT lives.
        let mut args = vec!["ss", "-Htano"];
        for st in ["syn-sent", "syn-recv", "fin-wait-1", "fin-wait-2", "close-wait", "last-ack", "closing"] {
            args.extend(["state", st]);
        }
        parse_ss(&self.exec(&args))
    }

    /// Waits until no socket in the namespace is half-closed, so every close
    /// of a workload has been ACKed and every TIME_WAIT exists.
    #[track_caller]
    pub fn wait_settled(&self) {
        let start = Instant::now();
        loop {
            let last = self.ss_transient();
            if last.is_empty() {
                return;
            }
            if start.elapsed() >= scaled(SETTLE_TIMEOUT) {
                panic!(
                    "sockets in {} still half-closed after {SETTLE_TIMEOUT:?}: {} left, e.g. {:?}",
                    self.name,
                    last.len(),
                    &last[..last.len().min(5)]
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    // --- workloads, run inside the namespace --------------------------------

    /// A listener inside the namespace (kept open by the caller, so the port
    /// is a listening port while the daemon watches).
    #[track_caller]
    pub fn listen(&self, addr: SocketAddr) -> TcpListener {
        self.run(|| TcpListener::bind(addr))
            .unwrap_or_else(|e| panic!("bind listener {addr} in {}: {e}", self.name))
    }

    /// See [`server_closes_first`]; then waits until every close is ACKed.
    #[track_caller]
    pub fn server_closes_first(&self, listener: &TcpListener, clients: &[(IpAddr, usize)]) {
        self.run(|| server_closes_first(listener, clients));
        self.wait_settled();
    }

    /// See [`client_closes_first`]; then waits until every close is ACKed.
    #[track_caller]
    pub fn client_closes_first(&self, listener: &TcpListener, client: Option<IpAddr>, n: usize) {
        self.run(|| client_closes_first(listener, client, n));
        self.wait_settled();
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let out = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
        match out {
            Ok(o) if o.status.success() => {}
            Ok(o) => eprintln!(
                "warning: ip netns del {}: {}",
                self.name,
                String::from_utf8_lossy(&o.stderr).trim()
            ),
            Err(e) => eprintln!("warning: ip netns del {}: {e}", self.name),
        }
    }
}

fn enter_netns(path: &std::path::Path) {
    let f = File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    // SAFETY: `f` is an open namespace file descriptor for the duration of the
    // call; setns only changes this (fresh, test-owned) thread's namespace.
    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        panic!("setns({}): {}", path.display(), io::Error::last_os_error());
    }
}

/// Runs a command to completion; panics with its stderr if it fails.
#[track_caller]
pub fn run_cmd(prog: &str, args: &[&str]) -> String {
    let out = Command::new(prog)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {prog} {args:?}: {e}"));
    if !out.status.success() {
        panic!(
            "{prog} {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    String::from_utf8(out.stdout).expect("command output is UTF-8")
}

// ---------------------------------------------------------------------------
// ss parsing

/// `(direction, remote, port)`, exactly as the daemon's labels.
pub type SeriesKey = (String, String, u16);

#[derive(Debug, Clone)]
pub struct SsSocket {
    pub local: SocketAddr,
    pub peer: SocketAddr,
    pub timer: Option<String>,
}

impl SsSocket {
    pub fn series_key(&self, listening: &[u16]) -> SeriesKey {
        let remote = label_ip(self.peer.ip());
        if listening.contains(&self.local.port()) {
            ("inbound".to_string(), remote, self.local.port())
        } else {
            ("outbound".to_string(), remote, self.peer.port())
        }
    }
}

/// The daemon's label form of an address: IPv4-mapped IPv6 as plain IPv4,
/// everything else as Rust prints it (RFC 5952 for IPv6).
pub fn label_ip(ip: IpAddr) -> String {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => v4.to_string(),
            None => v6.to_string(),
        },
        IpAddr::V4(v4) => v4.to_string(),
    }
}

/// Parses `ss -Htan[o]` output, with or without the state column.
pub fn parse_ss(text: &str) -> Vec<SsSocket> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|line| {
            let toks: Vec<&str> = line.split_whitespace().collect();
            // Without a state filter the first column is the state name.
            let first = if toks[0].parse::<u64>().is_ok() { 0 } else { 1 };
            let (local, peer) = match (toks.get(first + 2), toks.get(first + 3)) {
                (Some(l), Some(p)) => (*l, *p),
                _ => panic!("unexpected ss line: {line:?}"),
            };
            let timer = toks.iter().find_map(|t| {
                t.strip_prefix("timer:(")
                    .map(|t| t.trim_end_matches(')').to_string())
            });
            SsSocket {
                local: parse_ss_addr(local)
                    .unwrap_or_else(|| panic!("bad ss address {local:?} in {line:?}")),
                peer: parse_ss_addr(peer)
                    .unwrap_or_else(|| panic!("bad ss address {peer:?} in {line:?}")),
                timer,
            }
        })
        .collect()
}

/// `127.0.0.1:80`, `[::1]:80`, `[::ffff:127.0.0.1]:80`, `[fe80::1%lo]:80`.
pub fn parse_ss_addr(s: &str) -> Option<SocketAddr> {
    let (host, port) = s.rsplit_once(':')?;
    let port: u16 = port.parse().ok()?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let host = host.split('%').next()?;
    let ip: IpAddr = host.parse().ok()?;
    Some(SocketAddr::new(ip, port))
}

pub fn group_by_remote(socks: &[SsSocket]) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for s in socks {
        *out.entry(label_ip(s.peer.ip())).or_insert(0) += 1;
    }
    out
}

pub fn group_by_series(socks: &[SsSocket], listening: &[u16]) -> BTreeMap<SeriesKey, u64> {
    let mut out = BTreeMap::new();
    for s in socks {
        *out.entry(s.series_key(listening)).or_insert(0) += 1;
    }
    out
}

// ---------------------------------------------------------------------------
// Daemon guard

static LOG_DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

fn log_dir() -> &'static PathBuf {
    LOG_DIR.get_or_init(|| {
        let dir =
            std::env::temp_dir().join(format!("timewait-kernel-tests-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
        dir
    })
}

static DAEMON_COUNTER: AtomicUsize = AtomicUsize::new(0);

// ---------------------------------------------------------------------------
// The kernel matrix: which path each signal must take where the tests run

/// The matrix kernel the tests run on (`cargo xtask test` sets
/// `TIMEWAIT_TEST_KERNEL` in each guest): `host`, `5.10`, `6.1` or `6.12`.
pub fn test_kernel() -> String {
    std::env::var("TIMEWAIT_TEST_KERNEL").unwrap_or_else(|_| "host".into())
}

/// Whether the tests run in an emulated guest of the kernel matrix (where
/// time bounds on the kernel's own speed are 10x wider).
pub fn emulated() -> bool {
    test_kernel() != "host"
}

/// The `--probe-path` every daemon under test gets (`TIMEWAIT_TEST_PROBE_PATH`;
/// the matrix forces the fallbacks on kernels that would not pick them).
pub fn test_probe_path() -> String {
    std::env::var("TIMEWAIT_TEST_PROBE_PATH").unwrap_or_else(|_| "auto".into())
}

/// (lifecycle path, segments path) the daemon must report on this kernel,
/// so that a silent fallback fails the test. The host of these machines
/// refuses fentry (lockdown) and has no kprobes; Debian's 5.10, 6.1 and 6.12
/// allow both; kfree_skb has `rx_sk` (segments on the tracepoint path) from
/// 6.11. `TIMEWAIT_TEST_EXPECT=LIFECYCLE,SEGMENTS` overrides it for a host
/// that is not one of these machines.
pub fn expected_paths() -> (String, String) {
    if let Ok(v) = std::env::var("TIMEWAIT_TEST_EXPECT")
        && let Some((l, s)) = v.split_once(',')
    {
        return (l.to_string(), s.to_string());
    }
    let kernel = test_kernel();
    let (l, s) = match (kernel.as_str(), test_probe_path().as_str()) {
        ("host", _) => ("tracepoint", "tracepoint"),
        ("5.10" | "6.1", "tracepoint") => ("tracepoint", "unavailable"),
        (_, "tracepoint") => ("tracepoint", "tracepoint"),
        (_, "kprobe") => ("kprobe", "kprobe"),
        _ => ("fentry", "fentry"),
    };
    (l.to_string(), s.to_string())
}

/// The path of the full-socket hooks here: fentry or the tracepoints (they
/// have no kprobe fallback and are taken whole), fentry wherever the
/// lifecycle gets it.
pub fn expected_sockets_path() -> String {
    if expected_paths().0 == "fentry" { "fentry" } else { "tracepoint" }.to_string()
}

/// The path of bind() errors: with the fentry sockets hooks, else the
/// `sys_exit_bind` tracepoint when asked for (`--syscall-tracepoints`), else off.
pub fn expected_bind_errors_path(syscall_tracepoints: bool) -> String {
    match (expected_sockets_path().as_str(), syscall_tracepoints) {
        ("fentry", _) => "fentry",
        (_, true) => "tracepoint",
        _ => "off",
    }
    .to_string()
}

/// Whether SYN verdicts, segment kinds and reset reasons are served here.
/// Tests of them skip, saying why, where the path cannot serve them.
pub fn segments_available(test: &str) -> bool {
    let (_, segments) = expected_paths();
    if segments == "unavailable" {
        let _ = writeln!(
            io::stderr(),
            "SKIPPED {test}: kernel {} on the {} path has no segment hooks (kfree_skb has no rx_sk before 6.11)",
            test_kernel(),
            test_probe_path()
        );
        return false;
    }
    true
}

/// A `timewaitd run` inside a namespace; SIGTERM on drop.
pub struct Daemon<'a> {
    ns: &'a NetNs,
    child: Option<Child>,
    pub log: PathBuf,
    /// Every counter and histogram sample of this daemon's last scrape:
    /// each scrape checks that none went back (issue 25).
    counters: std::sync::Mutex<crate::support_counters::Seen>,
}

impl<'a> Daemon<'a> {
    /// Starts the daemon in `ns` and waits (60 s at most) until `/readyz`
    /// answers 200.
    #[track_caller]
    pub fn start(ns: &'a NetNs, extra: &[&str]) -> Daemon<'a> {
        Self::start_via(ns, extra, false, &[])
    }

    /// Like [`Daemon::start`], with these environment variables set (the
    /// daemon's test knobs, e.g. `TIMEWAITD_TEST_STALL_DRAIN`).
    #[track_caller]
    pub fn start_with_env(ns: &'a NetNs, extra: &[&str], env: &[(&str, &str)]) -> Daemon<'a> {
        Self::start_via(ns, extra, false, env)
    }

    /// Like [`Daemon::start`], entering the namespace with `nsenter --net`
    /// (only the network namespace changes) instead of `ip netns exec`,
    /// which remounts `/sys` and so hides the cgroup hierarchy under it.
    #[track_caller]
    pub fn start_nsenter(ns: &'a NetNs, extra: &[&str]) -> Daemon<'a> {
        Self::start_via(ns, extra, true, &[])
    }

    #[track_caller]
    fn start_via(ns: &'a NetNs, extra: &[&str], nsenter: bool, env: &[(&str, &str)]) -> Daemon<'a> {
        let n = DAEMON_COUNTER.fetch_add(1, Ordering::Relaxed);
        let log = log_dir().join(format!("{}-daemon{n}.log", ns.name()));
        let out = File::create(&log).unwrap_or_else(|e| panic!("create {}: {e}", log.display()));
        let err = out.try_clone().expect("dup log file");
        let bin = daemon_bin();
        let mut cmd = if nsenter {
            let mut c = Command::new("nsenter");
            c.arg(format!("--net={}", ns.path().display())).arg("--");
            c
        } else {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns.name()]);
            c
        };
        cmd.args([bin.as_str(), "run", "--web.listen-address", WEB_ADDR])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err);
        let forced = test_probe_path();
        if forced != "auto" && !extra.contains(&"--probe-path") {
            cmd.args(["--probe-path", forced.as_str()]);
        }
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "info");
        }
        cmd.envs(env.iter().copied());
        let child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {bin}: {e}"));
        eprintln!(
            "started timewaitd (pid {}) in {} with {extra:?}, log {}",
            child.id(),
            ns.name(),
            log.display()
        );
        let mut d = Daemon {
            ns,
            child: Some(child),
            log,
            counters: Default::default(),
        };
        d.wait_ready();
        if !extra.contains(&"--probe-path") {
            d.assert_paths(extra.contains(&"--syscall-tracepoints"));
        }
        d
    }

    /// The daemon reports the paths this kernel must get (see `expected_paths`);
    /// `syscall_tracepoints`: it was started with `--syscall-tracepoints`.
    #[track_caller]
    pub fn assert_paths(&self, syscall_tracepoints: bool) {
        let (lifecycle, segments) = expected_paths();
        let sockets = expected_sockets_path();
        let bind_errors = expected_bind_errors_path(syscall_tracepoints);
        let m = self.scrape();
        for (signal, want) in
            [("sockets", sockets), ("bind_errors", bind_errors), ("lifecycle", lifecycle), ("segments", segments)]
        {
            let got: Vec<String> = m
                .series("timewait_probe_path")
                .into_iter()
                .filter(|(l, v)| *v == 1.0 && l.get("signal").map(String::as_str) == Some(signal))
                .filter_map(|(l, _)| l.get("path").cloned())
                .collect();
            assert_eq!(
                got,
                vec![want.clone()],
                "kernel {} (probe path {}): signal {signal} must be served by {want}\n{}",
                test_kernel(),
                test_probe_path(),
                self.log_tail()
            );
        }
    }

    #[track_caller]
    fn wait_ready(&mut self) {
        let start = Instant::now();
        let mut last = String::from("no answer yet");
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .expect("running")
                .try_wait()
                .expect("try_wait")
            {
                self.child = None;
                panic!(
                    "timewaitd exited before ready ({status}); last /readyz: {last}\n{}",
                    self.log_tail()
                );
            }
            match self
                .ns
                .run(|| http_get(WEB_ADDR.parse().unwrap(), "/readyz"))
            {
                Ok((200, _)) => {
                    eprintln!(
                        "timewaitd in {} ready after {:?}",
                        self.ns.name(),
                        start.elapsed()
                    );
                    return;
                }
                Ok((code, body)) => last = format!("{code} {}", body.trim()),
                Err(e) => last = e.to_string(),
            }
            if start.elapsed() >= ready_timeout() {
                panic!(
                    "timewaitd not ready after {:?}; last /readyz: {last}\n{}",
                    ready_timeout(),
                    self.log_tail()
                );
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("daemon running").id()
    }

    /// Whether the daemon has exited, and how, without reaping it: a failed
    /// scrape then says "killed by signal 15" rather than only "refused".
    pub fn exit_note(&self) -> String {
        let Some(child) = self.child.as_ref() else {
            return "the daemon was stopped by the test".into();
        };
        // SAFETY: siginfo_t is plain old data; all-zero is a valid value.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: `info` is a live siginfo_t; WNOWAIT leaves the child
        // unreaped, so `Child` still owns its pid.
        let rc = unsafe {
            libc::waitid(
                libc::P_PID,
                child.id() as libc::id_t,
                &raw mut info,
                libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
            )
        };
        if rc != 0 {
            return format!("waitid: {}", io::Error::last_os_error());
        }
        // SAFETY: waitid filled `info` for a child-state change (or left it
        // zeroed, si_pid 0, when the child still runs).
        let (pid, status) = unsafe { (info.si_pid(), info.si_status()) };
        if pid == 0 {
            return format!("the daemon (pid {}) is still running", child.id());
        }
        match info.si_code {
            libc::CLD_EXITED => format!(
                "the daemon (pid {pid}) EXITED with status {status} while the test needed it \
                 (a SIGTERM/SIGINT from outside the test ends it with 0)"
            ),
            libc::CLD_KILLED | libc::CLD_DUMPED => format!(
                "the daemon (pid {pid}) was KILLED by signal {status} (not sent by this test)"
            ),
            code => {
                format!("the daemon (pid {pid}) changed state (si_code {code}, status {status})")
            }
        }
    }

    /// The last lines of the daemon's log, for failure messages.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let from = lines.len().saturating_sub(40);
        format!(
            "--- {} (last {} lines) ---\n{}",
            self.log.display(),
            lines.len() - from,
            lines[from..].join("\n")
        )
    }

    /// `GET /metrics`, parsed.
    #[track_caller]
    pub fn scrape(&self) -> Metrics {
        let addr: SocketAddr = WEB_ADDR.parse().unwrap();
        match self.ns.run(|| http_get(addr, "/metrics")) {
            Ok((200, body)) => {
                let m = Metrics::parse(&body);
                let mut seen = self.counters.lock().unwrap_or_else(|e| e.into_inner());
                if let Err(e) = seen.advance(&m) {
                    panic!("{e}\n{}", self.log_tail());
                }
                m
            }
            Ok((code, body)) => panic!("GET /metrics: {code}: {body}\n{}", self.log_tail()),
            Err(e) => panic!(
                "GET /metrics: {e}; {}\n{}",
                self.exit_note(),
                self.log_tail()
            ),
        }
    }

    /// `GET path` → (status, body).
    #[track_caller]
    pub fn get(&self, path: &str) -> (u16, String) {
        let addr: SocketAddr = WEB_ADDR.parse().unwrap();
        self.ns.run(|| http_get(addr, path)).unwrap_or_else(|e| {
            panic!("GET {path}: {e}; {}\n{}", self.exit_note(), self.log_tail())
        })
    }

    fn signal(&self, sig: libc::c_int) {
        let pid = self.pid() as libc::pid_t;
        // SAFETY: kill has no memory-safety preconditions; `pid` is our own
        // child, not yet reaped (we hold its `Child`), so it cannot be reused.
        let rc = unsafe { libc::kill(pid, sig) };
        if rc != 0 {
            panic!("kill({pid}, {sig}): {}", io::Error::last_os_error());
        }
    }

    fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let start = Instant::now();
        let child = self.child.as_mut()?;
        loop {
            if let Some(st) = child.try_wait().expect("try_wait") {
                self.child = None;
                return Some(st);
            }
            if start.elapsed() >= timeout {
                return None;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, then asserts the daemon exits 0 within 15 s.
    #[track_caller]
    pub fn stop(mut self) {
        self.signal(libc::SIGTERM);
        match self.wait_exit(Duration::from_secs(15)) {
            Some(st) if st.code() == Some(0) => {
                eprintln!("timewaitd stopped by SIGTERM with exit status 0");
            }
            Some(st) => panic!(
                "timewaitd exited with {st} after SIGTERM, not 0\n{}",
                self.log_tail()
            ),
            None => panic!(
                "timewaitd did not exit within 15 s of SIGTERM\n{}",
                self.log_tail()
            ),
        }
    }

    /// Sends `sig`, asserts the daemon exits 0 within `within`, and returns
    /// how long that took.
    #[track_caller]
    pub fn stop_with(mut self, sig: i32, within: Duration) -> Duration {
        let start = Instant::now();
        self.signal(sig);
        match self.wait_exit(within) {
            Some(st) if st.code() == Some(0) => start.elapsed(),
            Some(st) => panic!("timewaitd exited with {st} after signal {sig}, not 0\n{}", self.log_tail()),
            None => panic!("timewaitd did not exit within {within:?} of signal {sig}\n{}", self.log_tail()),
        }
    }

    /// Sends a signal that should not stop it (SIGHUP).
    pub fn send(&self, sig: i32) {
        // SAFETY: kill with the pid of our own live child.
        unsafe { libc::kill(self.pid() as i32, sig) };
    }

    /// SIGKILL, as a crash would; waits for the process to be gone.
    #[track_caller]
    pub fn kill9(mut self) {
        self.signal(libc::SIGKILL);
        if self.wait_exit(Duration::from_secs(10)).is_none() {
            panic!("timewaitd survived SIGKILL for 10 s");
        }
    }
}

impl Drop for Daemon<'_> {
    fn drop(&mut self) {
        if self.child.is_none() {
            if thread::panicking() {
                eprintln!("{}", self.log_tail());
            }
            return;
        }
        self.signal(libc::SIGTERM);
        if self.wait_exit(Duration::from_secs(15)).is_none() {
            eprintln!("timewaitd ignored SIGTERM for 15 s; SIGKILL");
            self.signal(libc::SIGKILL);
            let _ = self.wait_exit(Duration::from_secs(10));
        }
        if thread::panicking() {
            eprintln!("{}", self.log_tail());
        }
    }
}

// ---------------------------------------------------------------------------
// HTTP client that leaves no TIME_WAIT behind

/// A minimal HTTP/1.1 GET, to be called inside the namespace.
///
/// Every scrape is itself a TCP connection in the namespace under test. So
/// that it leaves no TIME_WAIT on either side: ask for keep-alive (the server
/// must not close first), read exactly one response, then close with
/// `SO_LINGER {on, 0}`, which sends an RST and frees both ends at once.
pub fn http_get(addr: SocketAddr, path: &str) -> io::Result<(u16, String)> {
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    let result = http_exchange(&stream, addr, path);
    abortive_close(stream)?;
    result
}

fn http_exchange(stream: &TcpStream, addr: SocketAddr, path: &str) -> io::Result<(u16, String)> {
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.set_write_timeout(Some(Duration::from_secs(10)))?;
    let mut w = stream;
    write!(
        w,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: keep-alive\r\nAccept: */*\r\n\r\n"
    )?;
    w.flush()?;
    let mut r = BufReader::new(stream);
    let mut status_line = String::new();
    r.read_line(&mut status_line)?;
    let code: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| io::Error::other(format!("bad status line {status_line:?}")))?;
    let mut content_length = None;
    let mut chunked = false;
    loop {
        let mut line = String::new();
        if r.read_line(&mut line)? == 0 {
            return Err(io::Error::other("EOF in headers"));
        }
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
            if k == "content-length" {
                content_length = Some(v.parse::<usize>().map_err(io::Error::other)?);
            } else if k == "transfer-encoding" && v.to_ascii_lowercase().contains("chunked") {
                chunked = true;
            }
        }
    }
    let mut body = Vec::new();
    if chunked {
        loop {
            let mut size = String::new();
            r.read_line(&mut size)?;
            let size = usize::from_str_radix(size.trim().split(';').next().unwrap_or(""), 16)
                .map_err(|e| io::Error::other(format!("bad chunk size {size:?}: {e}")))?;
            if size == 0 {
                // Trailers end with an empty line.
                loop {
                    let mut l = String::new();
                    if r.read_line(&mut l)? == 0 || l.trim_end().is_empty() {
                        break;
                    }
                }
                break;
            }
            let start = body.len();
            body.resize(start + size, 0);
            r.read_exact(&mut body[start..])?;
            let mut crlf = [0u8; 2];
            r.read_exact(&mut crlf)?;
        }
    } else if let Some(n) = content_length {
        body.resize(n, 0);
        r.read_exact(&mut body)?;
    } else {
        // No length: the server will close first, which would leave it a
        // TIME_WAIT (which the RST below then kills). Read to EOF anyway.
        r.read_to_end(&mut body)?;
    }
    Ok((code, String::from_utf8_lossy(&body).into_owned()))
}

/// Closes with an RST (`SO_LINGER {on, 0}`): neither end enters TIME_WAIT.
pub fn abortive_close(stream: TcpStream) -> io::Result<()> {
    let lg = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: the fd is open (owned by `stream`), and the option value points
    // to a live `linger` whose exact size is passed.
    let rc = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const lg).cast(),
            size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    drop(stream);
    Ok(())
}

/// Scrapes a few times and asserts that this left no socket behind on the
/// daemon's port other than its listener (no TIME_WAIT on either side).
#[track_caller]
pub fn assert_scrape_leaves_no_timewait(ns: &NetNs, daemon: &Daemon) {
    for _ in 0..5 {
        daemon.scrape();
    }
    let port = WEB_PORT.to_string();
    let leftovers = || -> Vec<String> {
        ns.exec(&["ss", "-Htan", "state", "all"])
            .lines()
            .filter(|l| !l.starts_with("LISTEN"))
            .filter(|l| {
                parse_ss(l).iter().any(|s| {
                    s.local.port().to_string() == port || s.peer.port().to_string() == port
                })
            })
            .map(str::to_string)
            .collect()
    };
    let start = Instant::now();
    loop {
        let left = leftovers();
        if left.is_empty() {
            return;
        }
        if start.elapsed() > Duration::from_secs(5) {
            panic!(
                "scrapes left sockets behind on port {port}:\n{}",
                left.join("\n")
            );
        }
        thread::sleep(Duration::from_millis(50));
    }
}

// ---------------------------------------------------------------------------
// Prometheus text format

#[derive(Debug, Clone, Default)]
pub struct Metrics {
    samples: Vec<(String, BTreeMap<String, String>, f64)>,
    /// `# TYPE` of each family.
    pub types: BTreeMap<String, String>,
}

impl Metrics {
    /// Parses the text exposition format 0.0.4 (comments skipped).
    #[track_caller]
    pub fn parse(text: &str) -> Metrics {
        let mut samples = Vec::new();
        let mut types = BTreeMap::new();
        for line in text.lines() {
            let line = line.trim();
            if let Some(t) = line.strip_prefix("# TYPE ") {
                if let Some((name, kind)) = t.split_once(' ') {
                    types.insert(name.to_string(), kind.trim().to_string());
                }
                continue;
            }
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            samples.push(
                parse_sample(line).unwrap_or_else(|e| panic!("bad metrics line {line:?}: {e}")),
            );
        }
        Metrics { samples, types }
    }

    fn matching<'s>(
        &'s self,
        name: &'s str,
        filters: &'s [(&'s str, &'s str)],
    ) -> impl Iterator<Item = &'s (String, BTreeMap<String, String>, f64)> + 's {
        self.samples.iter().filter(move |(n, labels, _)| {
            n == name
                && filters
                    .iter()
                    .all(|(k, v)| labels.get(*k).map(String::as_str) == Some(*v))
        })
    }

    /// The one series of `name` whose labels include `filters`; `None` when
    /// there is none, a panic when several match.
    #[track_caller]
    pub fn get(&self, name: &str, filters: &[(&str, &str)]) -> Option<f64> {
        let found: Vec<_> = self.matching(name, filters).collect();
        match found.len() {
            0 => None,
            1 => Some(found[0].2),
            _ => panic!("{name}{filters:?} is ambiguous: {found:?}"),
        }
    }

    /// Sum over every series of `name` whose labels include `filters`.
    pub fn sum(&self, name: &str, filters: &[(&str, &str)]) -> f64 {
        self.matching(name, filters).map(|s| s.2).sum()
    }

    /// Every sample: (name, labels, value).
    pub fn all(&self) -> impl Iterator<Item = (&str, &BTreeMap<String, String>, f64)> {
        self.samples.iter().map(|(n, l, v)| (n.as_str(), l, *v))
    }

    pub fn series(&self, name: &str) -> Vec<(BTreeMap<String, String>, f64)> {
        self.matching(name, &[])
            .map(|(_, l, v)| (l.clone(), *v))
            .collect()
    }

    /// A per-socket gauge (`timewait_sockets`, `timewait_fin_wait2_orphans`)
    /// as `(direction, remote, port) -> count`, zero-valued series dropped.
    #[track_caller]
    pub fn series_map(&self, name: &str) -> BTreeMap<SeriesKey, u64> {
        let mut out = BTreeMap::new();
        for (labels, v) in self.series(name) {
            let n = as_count(name, &labels, v);
            if n == 0 {
                continue;
            }
            let get = |k: &str| {
                labels
                    .get(k)
                    .unwrap_or_else(|| panic!("{name} series {labels:?} has no {k} label"))
                    .clone()
            };
            // port="other" (ports folded beyond --top-ports) reads as 0.
            let port: u16 = match get("port").as_str() {
                "other" => 0,
                p => p.parse().unwrap_or_else(|e| panic!("{name} {labels:?}: port: {e}")),
            };
            let key = (get("direction"), get("remote"), port);
            if out.insert(key.clone(), n).is_some() {
                panic!("{name}: two series for {key:?}");
            }
        }
        out
    }

    /// `timewait_sockets` grouped by remote (zero series dropped).
    #[track_caller]
    pub fn tw_by_remote(&self) -> BTreeMap<String, u64> {
        let mut out = BTreeMap::new();
        for ((_, remote, _), n) in self.series_map("timewait_sockets") {
            *out.entry(remote).or_insert(0) += n;
        }
        out
    }

    /// Sum of a gauge/counter as an exact count.
    #[track_caller]
    pub fn count(&self, name: &str, filters: &[(&str, &str)]) -> u64 {
        let v = self.sum(name, filters);
        as_count(name, &BTreeMap::new(), v)
    }
}

#[track_caller]
fn as_count(name: &str, labels: &BTreeMap<String, String>, v: f64) -> u64 {
    if !(v >= 0.0 && v.fract() == 0.0 && v < 1e15) {
        panic!("{name}{labels:?} = {v} is not a non-negative whole number");
    }
    v as u64
}

fn parse_sample(line: &str) -> Result<(String, BTreeMap<String, String>, f64), String> {
    let name_end = line.find(['{', ' ', '\t']).ok_or("no value")?;
    let name = line[..name_end].to_string();
    let mut labels = BTreeMap::new();
    let mut rest = &line[name_end..];
    if rest.starts_with('{') {
        let mut chars = rest[1..].char_indices().peekable();
        let mut end = None;
        loop {
            // Skip separators.
            while let Some(&(_, c)) = chars.peek() {
                if c == ',' || c == ' ' {
                    chars.next();
                } else {
                    break;
                }
            }
            match chars.peek() {
                Some(&(i, '}')) => {
                    end = Some(i);
                    break;
                }
                None => break,
                _ => {}
            }
            let mut key = String::new();
            for (_, c) in chars.by_ref() {
                if c == '=' {
                    break;
                }
                key.push(c);
            }
            if chars.next().map(|x| x.1) != Some('"') {
                return Err(format!("label {key} value not quoted"));
            }
            let mut val = String::new();
            loop {
                match chars.next().map(|x| x.1) {
                    Some('\\') => match chars.next().map(|x| x.1) {
                        Some('n') => val.push('\n'),
                        Some(c) => val.push(c),
                        None => return Err("dangling escape".into()),
                    },
                    Some('"') => break,
                    Some(c) => val.push(c),
                    None => return Err("unterminated label value".into()),
                }
            }
            labels.insert(key.trim().to_string(), val);
        }
        let end = end.ok_or("unterminated label set")?;
        rest = &rest[1 + end + 1..];
    }
    let value = rest.split_whitespace().next().ok_or("no value")?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        "NaN" => f64::NAN,
        v => v.parse().map_err(|e| format!("value {v:?}: {e}"))?,
    };
    Ok((name, labels, value))
}

// ---------------------------------------------------------------------------
// Workloads (call inside the namespace, e.g. through `NetNs::run`)

pub const fn v4(a: u8, b: u8, c: u8, d: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(a, b, c, d))
}

pub const V6_LOOPBACK: IpAddr = IpAddr::V6(Ipv6Addr::LOCALHOST);

/// A TCP socket of `local`'s family bound to `local` (port 0: the kernel
/// picks one at bind time, or, with `no_port`, at connect time:
/// `IP_BIND_ADDRESS_NO_PORT`, so that the port is chosen per destination like
/// a plain `connect()` does). Errors are the kernel's own, so a caller can
/// tell EADDRINUSE apart.
pub fn bound_socket(local: SocketAddr, no_port: bool) -> io::Result<OwnedFd> {
    let family = if local.is_ipv4() { libc::AF_INET } else { libc::AF_INET6 };
    // SAFETY: plain socket(2) call; the result is checked before use.
    let fd = unsafe { libc::socket(family, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    if no_port {
        let one: libc::c_int = 1;
        // SAFETY: `fd` is open; the value points to a live c_int of the given size.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::IPPROTO_IP,
                libc::IP_BIND_ADDRESS_NO_PORT,
                (&raw const one).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    let (sa, len) = sockaddr(local);
    // SAFETY: `sa` is a sockaddr_storage holding a valid address of `len` bytes.
    if unsafe { libc::bind(fd.as_raw_fd(), (&raw const sa).cast(), len) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

/// `connect()` of a socket made by [`bound_socket`]; the kernel's error.
fn connect_fd(fd: OwnedFd, remote: SocketAddr) -> io::Result<TcpStream> {
    let (sa, len) = sockaddr(remote);
    // SAFETY: `fd` is open; `sa` holds a valid address of `len` bytes.
    if unsafe { libc::connect(fd.as_raw_fd(), (&raw const sa).cast(), len) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(TcpStream::from(fd))
}

/// A connected TCP socket from `local` (port chosen by the kernel at connect
/// time, as a plain `connect()` does) to `remote`.
pub fn connect_from(local: Option<IpAddr>, remote: SocketAddr) -> io::Result<TcpStream> {
    let Some(local) = local else {
        return TcpStream::connect(remote);
    };
    let fd = bound_socket(SocketAddr::new(local, 0), true)
        .map_err(|e| io::Error::other(format!("bind {local}: {e}")))?;
    connect_fd(fd, remote).map_err(|e| io::Error::other(format!("connect {local} -> {remote}: {e}")))
}

/// A TCP connection from exactly `local` (address and port) to `remote`.
/// The errors are the kernel's own (bind: EADDRINUSE when the port is held).
pub fn connect_from_port(local: SocketAddr, remote: SocketAddr) -> io::Result<TcpStream> {
    connect_fd(bound_socket(local, false)?, remote)
}

/// The calling thread's namespace's `ip_local_port_range` (read once per
/// workload, not per connection).
#[track_caller]
fn thread_port_range() -> (u16, u16) {
    let path = "/proc/sys/net/ipv4/ip_local_port_range";
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    match text.split_whitespace().filter_map(|w| w.parse().ok()).collect::<Vec<u16>>()[..] {
        [lo, hi] => (lo, hi),
        _ => panic!("{path}: {text:?}"),
    }
}

/// Where [`connect_fresh_port`] takes its next source port: one cursor for the
/// whole test process, so no two connections made through it use the same
/// port until it has gone round the range.
static CLIENT_PORT: AtomicUsize = AtomicUsize::new(0);

/// A connection from `local` to `remote` on a source port of the calling
/// namespace's ephemeral range (`range`) that no earlier connection through
/// here took (ports held by another socket are skipped). The kernel's own
/// choice cannot promise that: its offset per (source, destination) lives in
/// one table for all namespaces (`table_perturb`), so connections of tests
/// running beside this one move it, and it comes back to a port whose
/// 4-tuple the server still holds in TIME_WAIT; that SYN then reopens the
/// TIME_WAIT (the kernel kills it to accept the connection) and a workload
/// of N connections leaves N-1 (seen: 149 of 150 on 6.1). Call inside the
/// namespace.
pub fn connect_fresh_port(local: IpAddr, remote: SocketAddr, (lo, hi): (u16, u16)) -> io::Result<TcpStream> {
    let size = usize::from(hi.saturating_sub(lo)) + 1;
    for _ in 0..size {
        let port = lo + (CLIENT_PORT.fetch_add(1, Ordering::Relaxed) % size) as u16;
        let from = SocketAddr::new(local, port);
        match connect_from_port(from, remote) {
            Err(e) if e.raw_os_error() == Some(libc::EADDRINUSE) => continue,
            Err(e) => return Err(io::Error::other(format!("{from} -> {remote}: {e}"))),
            Ok(s) => return Ok(s),
        }
    }
    Err(io::Error::other(format!("{local} -> {remote}: every port of {lo}-{hi} is held")))
}

pub fn sockaddr(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: sockaddr_storage is plain old data; all-zero is a valid value.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from(*a.ip()).to_be(),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in.
            unsafe { std::ptr::write((&raw mut ss).cast::<libc::sockaddr_in>(), sin) };
            size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in6.
            unsafe { std::ptr::write((&raw mut ss).cast::<libc::sockaddr_in6>(), sin6) };
            size_of::<libc::sockaddr_in6>()
        }
    };
    (ss, len as libc::socklen_t)
}

/// Where a client from `from` reaches `listener`: a wildcard listener is
/// reached on loopback, an IPv6 wildcard one over IPv4 too (bindv6only=0).
fn target(listener: &TcpListener, from: Option<IpAddr>) -> SocketAddr {
    let mut addr = listener.local_addr().expect("listener address");
    if addr.ip().is_unspecified() {
        let v4_client = match from {
            Some(ip) => ip.is_ipv4(),
            None => addr.is_ipv4(),
        };
        addr.set_ip(if v4_client {
            v4(127, 0, 0, 1)
        } else {
            V6_LOOPBACK
        });
    }
    addr
}

/// The server closes first: for each client connection the server accepts
/// and closes; the client (from the given address) waits for EOF, then
/// closes. Each connection leaves one TIME_WAIT on the SERVER side (local
/// port = the listening port, peer = the client address), each with its own
/// client port ([`connect_fresh_port`]), so N connections leave exactly N.
/// Sockets are closed as we go, so thousands of connections need only a few
/// descriptors.
#[track_caller]
pub fn server_closes_first(listener: &TcpListener, clients: &[(IpAddr, usize)]) {
    let range = thread_port_range();
    for &(from, n) in clients {
        let to = target(listener, Some(from));
        for i in 0..n {
            let client = connect_fresh_port(from, to, range)
                .unwrap_or_else(|e| panic!("connection {i} of {n} from {from}: {e}"));
            let (server, _) = listener.accept().expect("accept");
            drop(server);
            wait_eof(&client);
            drop(client);
        }
    }
}

/// Like [`server_closes_first`] but the clients never close: returns them
/// open. Their servers' sockets sit in FIN_WAIT2 (as minisockets) until the
/// caller drops the clients.
#[track_caller]
pub fn server_closes_first_clients_stay(
    listener: &TcpListener,
    clients: &[(IpAddr, usize)],
) -> Vec<TcpStream> {
    let mut open = Vec::new();
    let range = thread_port_range();
    for &(from, n) in clients {
        let to = target(listener, Some(from));
        for i in 0..n {
            let client = connect_fresh_port(from, to, range)
                .unwrap_or_else(|e| panic!("connection {i} of {n} from {from}: {e}"));
            let (server, _) = listener.accept().expect("accept");
            drop(server);
            wait_eof(&client);
            open.push(client);
        }
    }
    open
}

/// The client closes first: the server reads EOF and closes. Each connection
/// leaves one TIME_WAIT on the CLIENT side (local ephemeral port, peer = the
/// listener's address and port).
#[track_caller]
pub fn client_closes_first(listener: &TcpListener, from: Option<IpAddr>, n: usize) {
    let to = target(listener, from);
    for i in 0..n {
        let client =
            connect_from(from, to).unwrap_or_else(|e| panic!("connection {i} of {n} to {to}: {e}"));
        let (server, _) = listener.accept().expect("accept");
        drop(client);
        wait_eof(&server);
        drop(server);
    }
}

/// Reads until EOF (10 s at most); panics on data or error.
#[track_caller]
pub fn wait_eof(s: &TcpStream) {
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("set_read_timeout");
    let mut buf = [0u8; 64];
    match (&*s).read(&mut buf) {
        Ok(0) => {}
        Ok(n) => panic!("expected EOF, read {n} bytes"),
        Err(e) => panic!("expected EOF: {e}"),
    }
}
