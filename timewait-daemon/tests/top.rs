//! `timewaitd top` against the real thing: a daemon in its own network
//! namespace, real TIME_WAIT sockets, and `top` running in a real terminal
//! (tmux), read back with `tmux capture-pane`. Plus the ways it refuses to
//! start: a bad `--interval`, stdout not a terminal, no daemon answering.
//!
//! Run: `cargo test -p timewait-daemon --test top -- --nocapture`
//! Needs `tmux` and `script` (bsdutils); the live test needs root.

use std::{
    fs::File,
    io::{self, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    path::PathBuf,
    process::{Child, Command, Output, Stdio},
    thread,
    time::{Duration, Instant},
};

const BIN: &str = env!("CARGO_BIN_EXE_timewaitd");
const WEB: &str = "127.0.0.1:19868";

// ---------------------------------------------------------------------------
// Helpers

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Straight to fd 2: libtest captures the print macros of a passing test, and
/// a skip must never look like a silent pass.
fn skip(msg: &str) {
    let _ = writeln!(io::stderr(), "SKIPPED top: {msg}");
}

fn have(cmd: &str) -> bool {
    Command::new("sh").args(["-c", &format!("command -v {cmd}")]).output().is_ok_and(|o| o.status.success())
}

#[track_caller]
fn run(cmd: &str, args: &[&str]) -> Output {
    let out = Command::new(cmd).args(args).output().unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Polls `f` every 100 ms until it returns Some; panics with `what` (and the
/// last thing `last` says) after `timeout`.
#[track_caller]
fn wait_for<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>, last: impl Fn() -> String) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        if start.elapsed() > timeout {
            panic!("timed out after {timeout:?} waiting for {what}; last:\n{}", last());
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// A port on 127.0.0.1 nothing listens on (bound, then released).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn lines(b: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(b).lines().map(str::trim).filter(|l| !l.is_empty()).map(String::from).collect()
}

// ---------------------------------------------------------------------------
// Guards: cleaned up in all cases, in reverse order of creation.

/// A named network namespace with loopback up, deleted on drop.
struct NetNs(String);

impl NetNs {
    fn new() -> Self {
        let name = format!("tw-top-{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        run("ip", &["netns", "add", &name]);
        let ns = NetNs(name);
        run("ip", &["-n", &ns.0, "link", "set", "lo", "up"]);
        ns
    }

    /// Runs `f` on a fresh thread that joined the namespace first (`setns`
    /// moves only the calling thread). Sockets stay in the namespace.
    fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = PathBuf::from("/var/run/netns").join(&self.0);
        thread::scope(|s| {
            s.spawn(move || {
                let ns = File::open(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                // SAFETY: a valid namespace fd; only this thread moves.
                let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(rc, 0, "setns: {}", io::Error::last_os_error());
                f()
            })
            .join()
            .unwrap_or_else(|e| std::panic::resume_unwind(e))
        })
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

/// A process killed (TERM, then KILL) and reaped on drop.
struct Proc(Child);

impl Proc {
    fn stop(&mut self) {
        if self.0.try_wait().ok().flatten().is_some() {
            return;
        }
        // SAFETY: signalling our own child, not yet reaped.
        unsafe { libc::kill(self.0.id() as libc::pid_t, libc::SIGTERM) };
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(10) {
            if self.0.try_wait().ok().flatten().is_some() {
                return;
            }
            thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A private tmux server (its own socket, no config), killed on drop.
struct Tmux {
    socket: String,
}

impl Tmux {
    fn new(tag: &str) -> Self {
        Self { socket: format!("timewait-{tag}-{}", std::process::id()) }
    }

    fn cmd(&self, args: &[&str]) -> Output {
        Command::new("tmux").args(["-L", &self.socket, "-f", "/dev/null"]).args(args).output().expect("tmux")
    }

    fn start(&self, session: &str, w: u16, h: u16, shell_cmd: &str) {
        let out = self.cmd(&["new-session", "-d", "-s", session, "-x", &w.to_string(), "-y", &h.to_string(), shell_cmd]);
        assert!(out.status.success(), "tmux new-session: {}", String::from_utf8_lossy(&out.stderr));
    }

    fn capture(&self, session: &str) -> String {
        String::from_utf8_lossy(&self.cmd(&["capture-pane", "-p", "-t", session]).stdout).into_owned()
    }

    fn alive(&self, session: &str) -> bool {
        self.cmd(&["has-session", "-t", session]).status.success()
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.cmd(&["kill-server"]);
    }
}

/// A temporary directory, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!("timewait-top-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

// ---------------------------------------------------------------------------
// Reading the screen

/// The columns of the busiest-remotes row for `remote`:
/// [remote, TW IN, TW OUT, FIN_WAIT2, SYN, REJECTED, ACCEPTED].
fn remote_row(screen: &str, remote: &str) -> Option<Vec<String>> {
    screen.lines().find_map(|l| {
        let cols: Vec<String> = l
            .split(|c: char| c == '│' || c.is_whitespace())
            .filter(|t| !t.is_empty())
            .map(String::from)
            .collect();
        (cols.len() == 7 && cols[0] == remote).then_some(cols)
    })
}

/// The whole screen is one frame drawn for a `w`x`h` terminal: the header's
/// corners on the first row and the last table's on the last, nothing wider.
fn redrawn_at(screen: &str, w: u16, h: u16) -> bool {
    let rows: Vec<&str> = screen.lines().collect();
    let (w, h) = (usize::from(w), usize::from(h));
    let width = |l: &str| l.chars().count();
    rows.len() == h
        && rows[0].starts_with('┌')
        && rows[0].ends_with('┐')
        && width(rows[0]) == w
        && rows[h - 1].starts_with('└')
        && rows[h - 1].ends_with('┘')
        && width(rows[h - 1]) == w
        && rows.iter().all(|l| width(l) <= w)
}

fn shows_counts(screen: &str, remote: &str, tw_in: u64, tw_out: u64) -> bool {
    remote_row(screen, remote)
        .is_some_and(|c| c[1] == tw_in.to_string() && c[2] == tw_out.to_string())
}

// ---------------------------------------------------------------------------
// Workload and daemon, inside the namespace

/// GET `path` on the daemon; closes with an RST so it leaves no TIME_WAIT.
fn http_status(path: &str) -> Option<String> {
    let addr: SocketAddr = WEB.parse().unwrap();
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: {WEB}\r\nConnection: close\r\n\r\n").ok()?;
    let mut buf = Vec::new();
    let r = s.read_to_end(&mut buf);
    let linger = libc::linger { l_onoff: 1, l_linger: 0 };
    // SAFETY: valid fd and a correctly sized linger struct.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const linger).cast(),
            size_of::<libc::linger>() as libc::socklen_t,
        );
    }
    r.ok()?;
    String::from_utf8_lossy(&buf).split_whitespace().nth(1).map(String::from)
}

/// `n` connections to `listener` where we close first: TIME_WAIT on our
/// (client) side, outbound toward the listener's address and port.
fn client_closes_first(listener: &TcpListener, n: usize) {
    let addr = listener.local_addr().unwrap();
    for _ in 0..n {
        let c = TcpStream::connect(addr).unwrap();
        let (mut s, _) = listener.accept().unwrap();
        drop(c);
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).unwrap();
        drop(s);
    }
}

/// `n` connections to `listener` where the server closes first: TIME_WAIT on
/// the listener's side, inbound from the client's address.
fn server_closes_first(listener: &TcpListener, n: usize) {
    let addr = listener.local_addr().unwrap();
    for _ in 0..n {
        let mut c = TcpStream::connect(addr).unwrap();
        let (s, _) = listener.accept().unwrap();
        drop(s);
        let mut buf = Vec::new();
        c.read_to_end(&mut buf).unwrap();
        drop(c);
    }
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

// ---------------------------------------------------------------------------
// Tests

#[test]
fn bad_interval_exits_2_with_one_line() {
    for bad in ["0", "-1", "nan", "inf"] {
        let out = Command::new(BIN).args(["top", &format!("--interval={bad}")]).output().unwrap();
        let err = lines(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "--interval {bad}: {err:?}");
        assert_eq!(err.len(), 1, "--interval {bad}: {err:?}");
        assert!(err[0].starts_with("timewaitd: invalid --interval"), "{err:?}");
        assert!(out.stdout.is_empty());
    }
}

#[test]
fn stdout_not_a_terminal_exits_2_with_one_line() {
    let port = free_port().to_string();
    let out = Command::new(BIN)
        .args(["top", "--web.listen-address", &format!("127.0.0.1:{port}")])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = lines(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err:?}");
    assert_eq!(err.len(), 1, "{err:?}");
    assert!(err[0].contains("not a terminal") && err[0].contains("snapshot"), "{err:?}");
    assert!(out.stdout.is_empty());
}

/// In a real terminal (`script` gives it a pty): one line, exit 2, and the
/// alternate screen was never entered.
#[test]
fn no_daemon_exits_2_with_one_line_before_the_alternate_screen() {
    if !have("script") {
        panic!("`script` not found: apt-get install bsdutils");
    }
    let addr = format!("127.0.0.1:{}", free_port());
    let cmd = format!("{} top --web.listen-address {addr}", shell_quote(BIN));
    let out = Command::new("script").args(["-qec", &cmd, "/dev/null"]).stdin(Stdio::null()).output().unwrap();
    let raw = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(2), "{raw:?}");
    let got = lines(&out.stdout);
    assert_eq!(got.len(), 1, "{raw:?}");
    assert!(got[0].starts_with(&format!("timewaitd: no daemon answering at {addr}: ")), "{raw:?}");
    assert!(!raw.contains("\x1b[?1049h"), "entered the alternate screen: {raw:?}");
}

#[test]
fn live_view_of_a_real_daemon() {
    if !is_root() {
        skip("needs root (network namespace, BPF programs)");
        return;
    }
    assert!(have("tmux"), "tmux not found: apt-get install tmux");
    let dir = TempDir::new("live");
    let ns = NetNs::new();

    // The daemon, in the namespace.
    let log = dir.0.join("daemon.log");
    let mut daemon = Proc(
        Command::new("ip")
            .args(["netns", "exec", &ns.0, BIN, "run"])
            .stdin(Stdio::null())
            .stdout(File::create(&log).unwrap())
            .stderr(File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    let daemon_log = || std::fs::read_to_string(&log).unwrap_or_default();
    wait_for(
        Duration::from_secs(60),
        "the daemon to be ready",
        || {
            if let Ok(Some(st)) = daemon.0.try_wait() {
                panic!("the daemon exited ({st}):\n{}", daemon_log());
            }
            (ns.run(|| http_status("/readyz")).as_deref() == Some("200")).then_some(())
        },
        daemon_log,
    );

    // top, in a real terminal inside the namespace.
    let tmux = Tmux::new("top");
    let rc_file = dir.0.join("rc");
    let cmd = format!(
        "ip netns exec {} {} top --interval 0.5 2>{}; echo $? >{}",
        ns.0,
        shell_quote(BIN),
        shell_quote(&dir.0.join("top.err").display().to_string()),
        shell_quote(&rc_file.display().to_string()),
    );
    tmux.start("top", 160, 50, &cmd);
    wait_for(
        Duration::from_secs(20),
        "top to show the daemon answering",
        || tmux.capture("top").contains("answering").then_some(()),
        || tmux.capture("top") + &std::fs::read_to_string(dir.0.join("top.err")).unwrap_or_default(),
    );

    // While it runs: 5 TIME_WAIT outbound toward 127.0.0.42:P, 3 inbound
    // from 127.0.0.1.
    let (out_listener, in_listener) = ns.run(|| {
        let out_l = TcpListener::bind("127.0.0.42:0").unwrap();
        let in_l = TcpListener::bind("127.0.0.1:0").unwrap();
        client_closes_first(&out_l, 5);
        server_closes_first(&in_l, 3);
        (out_l, in_l)
    });
    let out_port = out_listener.local_addr().unwrap().port();
    let ss = run("ip", &["netns", "exec", &ns.0, "ss", "-Htan", "state", "time-wait"]);
    eprintln!("ss in the namespace:\n{}", String::from_utf8_lossy(&ss.stdout));
    let screen = wait_for(
        Duration::from_secs(20),
        "top to show 127.0.0.42 with 5 outbound and 127.0.0.1 with 3 inbound TIME_WAIT",
        || {
            let s = tmux.capture("top");
            (shows_counts(&s, "127.0.0.42", 0, 5) && shows_counts(&s, "127.0.0.1", 3, 0)).then_some(s)
        },
        || tmux.capture("top"),
    );
    eprintln!("--- top at 160x50 ---\n{screen}");
    let dest = format!("127.0.0.42:{out_port}");
    assert!(screen.contains(&dest), "exhaustion row for {dest} missing:\n{screen}");
    assert!(screen.contains("TIME_WAIT 8"), "total missing:\n{screen}");

    // Still readable when the terminal shrinks.
    for (w, h) in [(120u16, 40u16), (80, 24)] {
        let out = tmux.cmd(&["resize-window", "-t", "top", "-x", &w.to_string(), "-y", &h.to_string()]);
        assert!(out.status.success(), "resize: {}", String::from_utf8_lossy(&out.stderr));
        let s = wait_for(
            Duration::from_secs(10),
            &format!("the screen at {w}x{h}"),
            || {
                let s = tmux.capture("top");
                (redrawn_at(&s, w, h) && shows_counts(&s, "127.0.0.42", 0, 5) && s.contains("Outbound exhaustion"))
                    .then_some(s)
            },
            || tmux.capture("top"),
        );
        eprintln!("--- top at {w}x{h} ---\n{s}");
    }

    // The daemon goes away: top says so and keeps the last data.
    daemon.stop();
    let s = wait_for(
        Duration::from_secs(20),
        "top to report the daemon not answering",
        || {
            let s = tmux.capture("top");
            (s.contains("not answering") && shows_counts(&s, "127.0.0.42", 0, 5)).then_some(s)
        },
        || tmux.capture("top"),
    );
    eprintln!("--- top with the daemon gone ---\n{s}");
    assert!(tmux.alive("top"), "top exited when the daemon went away");

    // q quits, exit 0, and the session ends.
    let out = tmux.cmd(&["send-keys", "-t", "top", "q"]);
    assert!(out.status.success());
    wait_for(Duration::from_secs(10), "the tmux session to end after q", || (!tmux.alive("top")).then_some(()), || {
        tmux.capture("top")
    });
    let rc = std::fs::read_to_string(&rc_file).unwrap_or_default();
    let err = std::fs::read_to_string(dir.0.join("top.err")).unwrap_or_default();
    assert_eq!(rc.trim(), "0", "top's exit status; stderr: {err}");
    assert!(err.trim().is_empty(), "top wrote to stderr: {err}");
    drop((out_listener, in_listener));
}
