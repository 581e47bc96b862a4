//! Real third-party processes in a test's namespace: nginx and wrk, each in its own process group, logs in a temp dir.

use std::fs::{self, File};
use std::io::{self, Write as _};
use std::net::SocketAddr;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use crate::support::http::http_get;
use crate::support::netns::NetNs;
use crate::support::wait::scaled;

static DIR_COUNTER: AtomicUsize = AtomicUsize::new(0);

/// False (saying why on stderr) in an emulated guest of the kernel matrix:
/// these tests load the machine (tens of thousands of connections, wrk) and
/// are for the host only; `GUEST_TESTS` does not list them either.
pub fn host_only(test: &str) -> bool {
    if crate::support::matrix::emulated() {
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
