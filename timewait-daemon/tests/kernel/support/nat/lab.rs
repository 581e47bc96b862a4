//! The NAT lab's pieces: namespaces joined by veth pairs, a scratch directory, nginx, HTTP/1.1 clients that let the server close first.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, SocketAddrV4, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use crate::support::netns::{NetNs, run_cmd};
use crate::support::wait::scaled;

// ---------------------------------------------------------------------------
// Topology

/// A veth pair between two namespaces, created directly inside them (no name
/// in the host's namespace at any moment), each end addressed (`addr/prefix`)
/// and up. The pair goes away with either namespace.
#[track_caller]
pub fn veth(a: &NetNs, a_if: &str, a_addr: &str, b: &NetNs, b_if: &str, b_addr: &str) {
    run_cmd(
        "ip",
        &[
            "-n",
            a.name(),
            "link",
            "add",
            a_if,
            "type",
            "veth",
            "peer",
            "name",
            b_if,
            "netns",
            b.name(),
        ],
    );
    for (ns, ifname, addr) in [(a, a_if, a_addr), (b, b_if, b_addr)] {
        run_cmd("ip", &["-n", ns.name(), "addr", "add", addr, "dev", ifname]);
        run_cmd("ip", &["-n", ns.name(), "link", "set", ifname, "up"]);
    }
}

/// `ip route add <dst> via <gw>` inside `ns`.
#[track_caller]
pub fn route(ns: &NetNs, dst: &str, gw: &str) {
    run_cmd("ip", &["-n", ns.name(), "route", "add", dst, "via", gw]);
}

/// Whether `iptables` works inside a namespace here; `Err` says why not
/// (which flavour, what it printed).
pub fn iptables_usable(ns: &NetNs) -> Result<String, String> {
    let out = Command::new("ip")
        .args(["netns", "exec", ns.name(), "iptables", "-V"])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run iptables: {e}"))?;
    let version = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if !out.status.success() {
        return Err(format!("iptables -V: {}", String::from_utf8_lossy(&out.stderr).trim()));
    }
    let out = Command::new("ip")
        .args(["netns", "exec", ns.name(), "iptables", "-t", "nat", "-S"])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run iptables: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{version}: iptables -t nat -S in a namespace: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(version)
}

/// Whether a command is installed (`command -v`).
pub fn have(cmd: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {cmd} >/dev/null 2>&1")])
        .status()
        .is_ok_and(|s| s.success())
}

// ---------------------------------------------------------------------------
// A scratch directory, removed on drop (kept when the test fails, for the pcap)

static DIR_COUNTER: AtomicUsize = AtomicUsize::new(0);

pub struct ScratchDir {
    pub path: PathBuf,
}

impl ScratchDir {
    #[track_caller]
    pub fn new(what: &str) -> ScratchDir {
        let n = DIR_COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("timewait-{what}-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
        ScratchDir { path }
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!("kept {} (capture, nginx logs) for the failure", self.path.display());
        } else {
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

// ---------------------------------------------------------------------------
// A child process in a namespace, stopped on drop

/// Sends `sig` to our own child and waits (bounded) for it; SIGKILL after
/// `timeout`. Returns the exit status, if it ended.
pub(super) fn stop_child(child: &mut Child, sig: libc::c_int, timeout: Duration) -> Option<std::process::ExitStatus> {
    if let Ok(Some(st)) = child.try_wait() {
        return Some(st);
    }
    // SAFETY: kill has no memory-safety preconditions; the pid is our own
    // child, not yet reaped (we hold its `Child`), so it cannot be reused.
    unsafe { libc::kill(child.id() as libc::pid_t, sig) };
    let start = Instant::now();
    loop {
        if let Ok(Some(st)) = child.try_wait() {
            return Some(st);
        }
        if start.elapsed() >= timeout {
            eprintln!("pid {} ignored signal {sig} for {timeout:?}: SIGKILL", child.id());
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

// ---------------------------------------------------------------------------
// nginx

/// Debian's nginx (`nginx-light`) in the foreground inside a namespace, with
/// its config, pid file, logs and temp paths in a scratch directory; SIGTERM
/// (then SIGKILL) on drop.
pub struct Nginx {
    child: Option<Child>,
    pub error_log: PathBuf,
}

impl Nginx {
    /// Starts nginx on `listen` answering every request with `200 ok\n`
    /// (one worker), and waits (bounded) until `ss` shows its listener.
    #[track_caller]
    pub fn start(ns: &NetNs, listen: SocketAddrV4, dir: &Path) -> Nginx {
        let d = dir.display();
        let conf = dir.join("nginx.conf");
        let error_log = dir.join("nginx-error.log");
        let text = format!(
            "daemon off;\n\
             master_process on;\n\
             worker_processes 1;\n\
             pid {d}/nginx.pid;\n\
             error_log {d}/nginx-error.log info;\n\
             events {{ worker_connections 1024; }}\n\
             http {{\n  \
               access_log off;\n  \
               client_body_temp_path {d}/body;\n  \
               proxy_temp_path {d}/proxy;\n  \
               fastcgi_temp_path {d}/fastcgi;\n  \
               uwsgi_temp_path {d}/uwsgi;\n  \
               scgi_temp_path {d}/scgi;\n  \
               server {{\n    \
                 listen {listen};\n    \
                 location / {{ return 200 \"ok\\n\"; }}\n  \
               }}\n\
             }}\n"
        );
        fs::write(&conf, text).unwrap_or_else(|e| panic!("write {}: {e}", conf.display()));
        let log = fs::File::create(dir.join("nginx-stderr.log")).expect("create nginx stderr log");
        let child = Command::new("ip")
            .args(["netns", "exec", ns.name(), "/usr/sbin/nginx", "-p"])
            .arg(dir)
            .arg("-c")
            .arg(&conf)
            .arg("-e")
            .arg(&error_log)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn nginx: {e}"));
        let mut nginx = Nginx {
            child: Some(child),
            error_log,
        };
        let start = Instant::now();
        let want = listen.to_string();
        loop {
            if let Some(st) = nginx.child.as_mut().unwrap().try_wait().expect("try_wait") {
                nginx.child = None;
                panic!(
                    "nginx exited before listening ({st}): {}\n{}",
                    fs::read_to_string(dir.join("nginx-stderr.log")).unwrap_or_default(),
                    fs::read_to_string(&nginx.error_log).unwrap_or_default()
                );
            }
            let listening = ns.exec(&["ss", "-Hltn"]);
            if listening.split_whitespace().any(|t| t == want) {
                eprintln!("nginx listening on {want} in {} after {:?}", ns.name(), start.elapsed());
                return nginx;
            }
            if start.elapsed() >= scaled(Duration::from_secs(10)) {
                panic!("nginx not listening on {want} after 10 s:\n{listening}");
            }
            thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SIGTERM: fast shutdown; the master stops its worker.
            stop_child(&mut child, libc::SIGTERM, Duration::from_secs(5));
        }
    }
}

// ---------------------------------------------------------------------------
// HTTP/1.1 clients that let the server close first

#[derive(Debug, Default, Clone)]
pub struct LoadStats {
    pub ok: u64,
    pub failed: u64,
    pub errors: BTreeMap<String, u64>,
    pub elapsed: Duration,
}

impl LoadStats {
    /// Several threads' figures added up (elapsed: the longest).
    pub fn sum(all: impl IntoIterator<Item = LoadStats>) -> LoadStats {
        let mut t = LoadStats::default();
        for s in all {
            t.ok += s.ok;
            t.failed += s.failed;
            for (e, n) in s.errors {
                *t.errors.entry(e).or_insert(0) += n;
            }
            t.elapsed = t.elapsed.max(s.elapsed);
        }
        t
    }
}

/// One `GET /` with `Connection: close`: the server sends its answer and
/// closes first; the client reads to EOF, then closes. Every step bounded
/// (`timeout` each).
pub fn http_close_request(server: SocketAddr, timeout: Duration) -> io::Result<()> {
    let s = TcpStream::connect_timeout(&server, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    (&s).write_all(format!("GET / HTTP/1.1\r\nHost: {server}\r\nConnection: close\r\n\r\n").as_bytes())?;
    let mut body = Vec::new();
    (&s).read_to_end(&mut body)?;
    let text = String::from_utf8_lossy(&body);
    if !text.starts_with("HTTP/1.1 200") || !text.ends_with("\r\n\r\nok\n") {
        return Err(io::Error::other(format!("unexpected answer {text:?}")));
    }
    Ok(())
}

/// Up to `n` requests one after another, stopping early after `budget`.
/// Call inside the client's namespace.
pub fn http_close_load(server: SocketAddr, n: usize, budget: Duration, timeout: Duration) -> LoadStats {
    let start = Instant::now();
    let mut st = LoadStats::default();
    for _ in 0..n {
        if start.elapsed() >= budget {
            break;
        }
        match http_close_request(server, timeout) {
            Ok(()) => st.ok += 1,
            Err(e) => {
                st.failed += 1;
                *st.errors.entry(e.to_string()).or_insert(0) += 1;
            }
        }
    }
    st.elapsed = start.elapsed();
    st
}
