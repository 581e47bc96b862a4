//! The daemon under test: `timewaitd run` in a test's namespace, waited for, scraped and stopped (SIGTERM on drop).

use std::fs::File;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use crate::support::http::http_get;
use crate::support::matrix::{expected_bind_errors_path, expected_paths, expected_sockets_path, test_kernel, test_probe_path};
use crate::support::metrics::Metrics;
use crate::support::netns::NetNs;
use crate::support::ss::parse_ss;

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

/// A `timewaitd run` inside a namespace; SIGTERM on drop.
pub struct Daemon<'a> {
    ns: &'a NetNs,
    child: Option<Child>,
    pub log: PathBuf,
    /// Every counter and histogram sample of this daemon's last scrape:
    /// each scrape checks that none went back (issue 25).
    counters: std::sync::Mutex<crate::support::counters::Seen>,
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
