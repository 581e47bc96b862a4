//! Issue 12 helpers: real third-party processes (nginx, wrk) in a test's
//! namespace, tens of thousands of server-side TIME_WAIT made fast, and
//! comparisons whose failure output stays short when the daemon labels
//! sockets one series each.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::fs::{self, File};
use std::io::{self, Write as _};
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use crate::support::{Metrics, NetNs, SsSocket, connect_from_port, http_get, label_ip, run_cmd, scaled, wait_eof};

static DIR_COUNTER: AtomicUsize = AtomicUsize::new(0);

/// False (saying why on stderr) in an emulated guest of the kernel matrix:
/// these tests load the machine (tens of thousands of connections, wrk) and
/// are for the host only; `GUEST_TESTS` does not list them either.
pub fn host_only(test: &str) -> bool {
    if crate::support::emulated() {
        let _ = writeln!(io::stderr(), "SKIPPED {test}: host only (heavy), not under emulation");
        return false;
    }
    true
}

/// A scratch directory of this test process, removed on drop unless the test
/// is failing (its logs then stay for a look).
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(what: &str) -> TempDir {
        let n = DIR_COUNTER.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("timewait-{what}-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
        TempDir(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    pub fn file(&self, name: &str) -> String {
        self.0.join(name).display().to_string()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!("kept {} for a look", self.0.display());
        } else {
            let _ = fs::remove_dir_all(&self.0);
        }
    }
}

// ---------------------------------------------------------------------------
// A process in the namespace, in its own process group

/// A command run with `ip netns exec` (which execs it, so the pid is the
/// program's), leader of its own process group: on drop the whole group
/// (nginx's master and workers) is SIGKILLed and reaped, on every exit path.
pub struct NsProcess {
    name: String,
    child: Option<Child>,
}

impl NsProcess {
    #[track_caller]
    pub fn spawn(ns: &NetNs, name: &str, args: &[&str], stdout: File) -> NsProcess {
        let err = stdout.try_clone().expect("dup output file");
        let child = Command::new("ip")
            .args(["netns", "exec", ns.name()])
            .args(args)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(err)
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {name} ({args:?}): {e}"));
        eprintln!("started {name} (pid {}) in {}: {}", child.id(), ns.name(), args.join(" "));
        NsProcess { name: name.to_string(), child: Some(child) }
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().map_or(0, |c| c.id() as i32)
    }

    /// The exit status, if it has exited (reaped then).
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        let st = self.child.as_mut()?.try_wait().expect("try_wait")?;
        self.child = None;
        Some(st)
    }

    /// Waits up to `timeout` for the process to exit.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let start = Instant::now();
        loop {
            if let Some(st) = self.try_wait() {
                return Some(st);
            }
            if start.elapsed() >= timeout {
                return None;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends `sig` to the leader only.
    pub fn signal(&self, sig: libc::c_int) {
        if self.child.is_some() {
            // SAFETY: kill has no memory-safety preconditions; the pid is our
            // unreaped child, so it cannot have been reused.
            unsafe { libc::kill(self.pid(), sig) };
        }
    }

    /// Whether any process of the group (e.g. an nginx worker) is still alive.
    pub fn group_alive(&self, pgid: i32) -> bool {
        // SAFETY: signal 0 only checks for existence.
        unsafe { libc::kill(-pgid, 0) == 0 }
    }

    fn kill_group(&mut self) {
        let Some(mut child) = self.child.take() else { return };
        let pgid = child.id() as i32;
        // SAFETY: the group is led by our unreaped child, so its id is ours.
        unsafe { libc::kill(-pgid, libc::SIGKILL) };
        let _ = child.wait();
        eprintln!("{} (pid {pgid}) killed with its process group", self.name);
    }
}

impl Drop for NsProcess {
    fn drop(&mut self) {
        self.kill_group();
    }
}

// ---------------------------------------------------------------------------
// nginx

/// Debian's nginx with its own config, pid file and logs in a temp dir; the
/// master stays in the foreground (`daemon off`), one worker.
pub struct Nginx {
    pub proc: NsProcess,
    pub addrs: Vec<SocketAddr>,
    pub dir: TempDir,
}

pub const NGINX_BIN: &str = "/usr/sbin/nginx";

impl Nginx {
    /// Starts nginx listening on `addrs` and waits (10 s at most) until it
    /// answers `GET /` with `200 ok` on each.
    #[track_caller]
    pub fn start(ns: &NetNs, addrs: &[SocketAddr]) -> Nginx {
        assert!(
            Path::new(NGINX_BIN).exists(),
            "{NGINX_BIN} is missing: install Debian's nginx-light (cargo xtask test installs it)"
        );
        let dir = TempDir::new("nginx");
        let d = |f: &str| dir.file(f);
        let conf = format!(
            "worker_processes 1;\n\
             pid {pid};\n\
             error_log {err} warn;\n\
             events {{ worker_connections 4096; }}\n\
             http {{\n\
             \x20 access_log {access} combined buffer=256k flush=1s;\n\
             \x20 client_body_temp_path {tmp}/body;\n\
             \x20 proxy_temp_path {tmp}/proxy;\n\
             \x20 fastcgi_temp_path {tmp}/fastcgi;\n\
             \x20 uwsgi_temp_path {tmp}/uwsgi;\n\
             \x20 scgi_temp_path {tmp}/scgi;\n\
             \x20 server {{\n\
             {listen}\
             \x20   location / {{ return 200 \"ok\\n\"; }}\n\
             \x20 }}\n\
             }}\n",
            pid = d("nginx.pid"),
            err = d("error.log"),
            access = d("access.log"),
            tmp = dir.path().display(),
            listen = addrs.iter().map(|a| format!("    listen {a};\n")).collect::<String>(),
        );
        fs::write(d("nginx.conf"), conf).expect("write nginx.conf");
        let out = File::create(d("stdout.log")).expect("create nginx stdout log");
        let conf = d("nginx.conf");
        let err = d("error.log");
        let prefix = format!("{}/", dir.path().display());
        let args = [NGINX_BIN, "-p", &prefix, "-e", &err, "-c", &conf, "-g", "daemon off;"];
        let mut proc = NsProcess::spawn(ns, "nginx", &args, out);
        let start = Instant::now();
        let mut last = String::from("no answer yet");
        loop {
            if let Some(st) = proc.try_wait() {
                panic!("nginx exited at start ({st}): {}\n{}", last, nginx_logs(&dir));
            }
            let answers: Vec<String> = addrs
                .iter()
                .map(|a| match ns.run(|| http_get(*a, "/")) {
                    Ok((200, body)) if body == "ok\n" => String::new(),
                    Ok((code, body)) => format!("{a}: {code} {body:?}"),
                    Err(e) => format!("{a}: {e}"),
                })
                .filter(|s| !s.is_empty())
                .collect();
            if answers.is_empty() {
                break;
            }
            last = answers.join("; ");
            if start.elapsed() > scaled(Duration::from_secs(10)) {
                panic!("nginx on {addrs:?} not answering after 10 s: {last}\n{}", nginx_logs(&dir));
            }
            thread::sleep(Duration::from_millis(50));
        }
        eprintln!("nginx answers on {addrs:?} after {:?}", start.elapsed());
        Nginx { proc, addrs: addrs.to_vec(), dir }
    }

    /// Graceful stop (SIGQUIT: the master closes the listener, the worker
    /// finishes and exits); asserts that every process of the group is gone
    /// within 10 s and that no listener is left on its port.
    #[track_caller]
    pub fn stop(&mut self, ns: &NetNs) {
        let pgid = self.proc.pid();
        self.proc.signal(libc::SIGQUIT);
        let st = self.proc.wait_timeout(Duration::from_secs(10));
        assert!(st.is_some(), "nginx master did not exit within 10 s of SIGQUIT\n{}", nginx_logs(&self.dir));
        let start = Instant::now();
        while self.proc.group_alive(pgid) {
            assert!(start.elapsed() < Duration::from_secs(10), "an nginx worker outlived its master by 10 s");
            thread::sleep(Duration::from_millis(20));
        }
        let port = self.addrs[0].port();
        let left = ns.exec(&["ss", "-Htln", &format!("sport = :{port}")]);
        assert!(left.trim().is_empty(), "a listener is left on port {port} after nginx stopped: {left}");
        eprintln!("nginx stopped ({st:?}); no listener on port {port}");
    }
}

fn nginx_logs(dir: &TempDir) -> String {
    let mut s = String::new();
    for f in ["stdout.log", "error.log"] {
        let text = fs::read_to_string(dir.path().join(f)).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let from = lines.len().saturating_sub(20);
        s.push_str(&format!("--- nginx {f} ---\n{}\n", lines[from..].join("\n")));
    }
    s
}

// ---------------------------------------------------------------------------
// wrk

/// What `wrk` reported.
#[derive(Debug, Default, Clone)]
pub struct WrkReport {
    pub requests: u64,
    pub seconds: f64,
    /// connect, read, write, timeout.
    pub socket_errors: [u64; 4],
    pub non_2xx: u64,
    pub text: String,
}

/// A running `wrk` with its output in a file.
pub struct Wrk {
    pub proc: NsProcess,
    out: PathBuf,
    duration: Duration,
    started: Instant,
}

impl Wrk {
    /// `wrk -t1 -cCONNS -dSECSs -H 'Connection: close' URL` in the namespace.
    #[track_caller]
    pub fn start(ns: &NetNs, dir: &TempDir, url: &str, conns: u32, secs: u64) -> Wrk {
        assert!(
            Command::new("sh").args(["-c", "command -v wrk"]).stdout(Stdio::null()).status().is_ok_and(|s| s.success()),
            "wrk is missing: install Debian's wrk (cargo xtask test installs it)"
        );
        let n = DIR_COUNTER.fetch_add(1, Ordering::Relaxed);
        let out = dir.path().join(format!("wrk{n}.out"));
        let file = File::create(&out).expect("create wrk output");
        let c = conns.to_string();
        let d = format!("{secs}s");
        let args = ["wrk", "-t1", "-c", &c, "-d", &d, "--timeout", "2s", "-H", "Connection: close", url];
        let proc = NsProcess::spawn(ns, "wrk", &args, file);
        Wrk { proc, out, duration: Duration::from_secs(secs), started: Instant::now() }
    }

    pub fn running(&mut self) -> bool {
        self.proc.try_wait().is_none()
    }

    /// Waits for wrk to end (its duration + 15 s at most) and parses its
    /// report; panics if it fails or reports nothing.
    #[track_caller]
    pub fn finish(mut self) -> WrkReport {
        let left = (self.duration + Duration::from_secs(15)).saturating_sub(self.started.elapsed());
        let st = self.proc.wait_timeout(left);
        let text = fs::read_to_string(&self.out).unwrap_or_default();
        match st {
            Some(st) if st.success() => {}
            Some(st) => panic!("wrk exited with {st}:\n{text}"),
            None => panic!("wrk still running {:?} after its {:?} load:\n{text}", self.started.elapsed(), self.duration),
        }
        parse_wrk(&text)
    }
}

#[track_caller]
pub fn parse_wrk(text: &str) -> WrkReport {
    let mut r = WrkReport { text: text.to_string(), ..Default::default() };
    let mut found = false;
    for line in text.lines().map(str::trim) {
        // "14682 requests in 5.09s, 2.03MB read"
        if let Some((n, rest)) = line.split_once(" requests in ") {
            r.requests = n.trim().parse().unwrap_or_else(|e| panic!("wrk line {line:?}: {e}"));
            r.seconds = rest.split('s').next().and_then(|s| s.parse().ok()).unwrap_or(0.0);
            found = true;
        } else if let Some(rest) = line.strip_prefix("Socket errors:") {
            // "Socket errors: connect 0, read 0, write 0, timeout 0"
            for (i, part) in rest.split(',').enumerate().take(4) {
                r.socket_errors[i] = part.split_whitespace().nth(1).and_then(|v| v.parse().ok()).unwrap_or(0);
            }
        } else if let Some(rest) = line.strip_prefix("Non-2xx or 3xx responses:") {
            r.non_2xx = rest.trim().parse().unwrap_or(0);
        }
    }
    assert!(found, "wrk printed no request count:\n{text}");
    r
}

// ---------------------------------------------------------------------------
// Namespace readings

/// The `tw` figure of the namespace's `/proc/net/sockstat` (TIME_WAIT and
/// FIN_WAIT2 minisockets): cheap to read while tens of thousands exist.
#[track_caller]
pub fn sockstat_tw(ns: &NetNs) -> u64 {
    let text = ns.exec(&["cat", "/proc/net/sockstat"]);
    text.lines()
        .find_map(|l| l.strip_prefix("TCP: "))
        .and_then(|l| {
            let t: Vec<&str> = l.split_whitespace().collect();
            t.iter().position(|w| *w == "tw").and_then(|i| t.get(i + 1)).and_then(|v| v.parse().ok())
        })
        .unwrap_or_else(|| panic!("no TCP tw figure in sockstat: {text}"))
}

/// The namespace's `net.ipv4.ip_local_port_range`.
#[track_caller]
pub fn ephemeral_range(ns: &NetNs) -> (u16, u16) {
    let text = ns.exec(&["sysctl", "-n", "net.ipv4.ip_local_port_range"]);
    let v: Vec<u16> = text.split_whitespace().filter_map(|w| w.parse().ok()).collect();
    assert_eq!(v.len(), 2, "ip_local_port_range: {text:?}");
    (v[0], v[1])
}

/// `(direction, port)` with every port of the ephemeral range folded into
/// `"ephemeral"`: stays a handful of keys even if a daemon labels sockets by
/// their client's ephemeral port, so a failure prints short.
pub type DirPortKey = (String, String);

fn port_class(port: u16, eph: (u16, u16)) -> String {
    if (eph.0..=eph.1).contains(&port) { "ephemeral".to_string() } else { port.to_string() }
}

/// ss's TIME_WAIT, one reading, grouped by remote and by [`DirPortKey`]
/// (`listening`: the ports the daemon must call service ports).
pub fn ss_tw_remote_and_dir_port(
    ns: &NetNs,
    listening: &[u16],
    eph: (u16, u16),
) -> (BTreeMap<String, u64>, BTreeMap<DirPortKey, u64>) {
    group_remote_and_dir_port(&ns.ss("time-wait"), listening, eph)
}

pub fn group_remote_and_dir_port(
    socks: &[SsSocket],
    listening: &[u16],
    eph: (u16, u16),
) -> (BTreeMap<String, u64>, BTreeMap<DirPortKey, u64>) {
    let mut by_remote = BTreeMap::new();
    let mut by_dp = BTreeMap::new();
    for s in socks {
        *by_remote.entry(label_ip(s.peer.ip())).or_insert(0) += 1;
        let (d, _, p) = s.series_key(listening);
        *by_dp.entry((d, port_class(p, eph))).or_insert(0) += 1;
    }
    (by_remote, by_dp)
}

/// The metrics' `timewait_sockets`, grouped the same way.
#[track_caller]
pub fn metrics_remote_and_dir_port(
    m: &Metrics,
    eph: (u16, u16),
) -> (BTreeMap<String, u64>, BTreeMap<DirPortKey, u64>) {
    let mut by_remote = BTreeMap::new();
    let mut by_dp = BTreeMap::new();
    for ((d, r, p), n) in m.series_map("timewait_sockets") {
        *by_remote.entry(r).or_insert(0) += n;
        *by_dp.entry((d, port_class(p, eph))).or_insert(0) += n;
    }
    (by_remote, by_dp)
}

/// What the `timewait_sockets` series look like: how many, how many carry a
/// port of the ephemeral range, and a few of those.
#[derive(Debug)]
pub struct SeriesShape {
    pub series: usize,
    pub ephemeral_port_series: usize,
    pub examples: Vec<String>,
}

pub fn series_shape(m: &Metrics, eph: (u16, u16)) -> SeriesShape {
    let all = m.series("timewait_sockets");
    let eph_series: Vec<String> = all
        .iter()
        .filter(|(l, _)| l.get("port").and_then(|p| p.parse::<u16>().ok()).is_some_and(|p| (eph.0..=eph.1).contains(&p)))
        .map(|(l, v)| format!("{l:?} {v}"))
        .collect();
    SeriesShape { series: all.len(), ephemeral_port_series: eph_series.len(), examples: eph_series.into_iter().take(3).collect() }
}

// ---------------------------------------------------------------------------
// Many server-side TIME_WAIT, fast

/// Like `support::server_closes_first`, for tens of thousands, bounded by
/// `limit`. Each client's connections leave from source ports
/// `first_port`, `first_port + 1`, ... (give the start of the ephemeral
/// range, where a client's ports are): the kernel's own choice walks the
/// range with random strides, and 1,400 connections from one address to one
/// port wrap it often enough to reuse a 4-tuple whose TIME_WAIT the server
/// still holds (seen: 70,000 made, 69,779 in ss). One connection at a time,
/// on one thread: with several threads sharing the listener, or batches of
/// 64 connected before the server closes them, some of the server's
/// minisockets were reset on the way to TIME_WAIT (6.18: 9 to 385 short of
/// 70,000, as many `TcpOutRsts`), and sequential is fast enough (~4 s for
/// 70,000 on an idle 2-core machine, explicit ports skip the port search).
/// Returns how long it took.
#[track_caller]
pub fn server_closes_first_fast(
    ns: &NetNs,
    listener: &TcpListener,
    clients: &[(IpAddr, usize)],
    first_port: u16,
    limit: Duration,
) -> Duration {
    let to = listener.local_addr().expect("listener address");
    let most = clients.iter().map(|c| c.1).max().unwrap_or(0);
    assert!(usize::from(first_port) + most <= usize::from(u16::MAX), "{most} source ports from {first_port} do not fit");
    let want: usize = clients.iter().map(|c| c.1).sum();
    let start = Instant::now();
    let made = ns.run(|| -> Result<usize, String> {
        let mut made = 0;
        for &(from, n) in clients {
            for k in 0..n {
                if made % 1000 == 0 && start.elapsed() > limit {
                    return Err(format!("only {made} made in {:?}", start.elapsed()));
                }
                let port = first_port + k as u16;
                let c = connect_from_port(SocketAddr::new(from, port), to).map_err(|e| format!("connection {made}: {e}"))?;
                let (s, _) = listener.accept().map_err(|e| format!("accept: {e}"))?;
                drop(s);
                wait_eof(&c);
                drop(c);
                made += 1;
            }
        }
        Ok(made)
    });
    let took = start.elapsed();
    match made {
        Ok(n) if n == want => took,
        Ok(n) => panic!("creating {want} server-side TIME_WAIT: {n} made in {took:?}"),
        Err(e) => panic!("creating {want} server-side TIME_WAIT (limit {limit:?}): {e}"),
    }
}

/// Runs `ss -s` style totals for a message: TIME_WAIT count and how long ss
/// took to list them.
pub fn ss_tw_timed(ns: &NetNs) -> (u64, Duration) {
    let t = Instant::now();
    let n = ns.ss_tw_total();
    (n, t.elapsed())
}

/// Adds `addr/32` to the namespace's loopback.
#[track_caller]
pub fn add_lo_addr(ns: &NetNs, addr: &str) {
    run_cmd("ip", &["-n", ns.name(), "addr", "add", &format!("{addr}/32"), "dev", "lo"]);
}

/// Makes connections from inside the namespace to the local address
/// `server` leave from `client` (another address of the namespace): the
/// `local` route's preferred source, so that one namespace has clients with
/// their own addresses, as a real server sees them (wrk cannot bind).
#[track_caller]
pub fn route_from(ns: &NetNs, server: &str, client: &str) {
    run_cmd(
        "ip",
        &["-n", ns.name(), "route", "replace", "local", server, "dev", "lo", "table", "local", "proto", "kernel", "scope", "host", "src", client],
    );
    let got = run_cmd("ip", &["-n", ns.name(), "route", "get", server]);
    assert!(got.contains(&format!("src {client} ")), "route to {server} should leave from {client}: {got}");
}
