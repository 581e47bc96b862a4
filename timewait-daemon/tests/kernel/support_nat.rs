//! Helpers for the NAT lab (issue 12, `nat_lab`): a routed topology of
//! network namespaces joined by veth pairs, a real web server (Debian's
//! nginx) inside one of them, HTTP/1.1 clients that send `Connection: close`,
//! a packet capture (`tshark`) as ground truth, and the rule that tells, from
//! that capture, which SYNs met a TIME_WAIT minisocket and which of those
//! the server did not accept.
//!
//! Everything here runs commands through `ip netns exec` or sockets through
//! `NetNs::run`/`NetNs::spawn`: nothing touches the host's own network.

#![allow(dead_code, reason = "not every test uses every helper")]

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use crate::support::{NetNs, run_cmd, scaled};

/// How long a minisocket holds its 4-tuple (`TCP_TIMEWAIT_LEN`).
pub const TIME_WAIT_LEN: f64 = 60.0;

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
fn stop_child(child: &mut Child, sig: libc::c_int, timeout: Duration) -> Option<std::process::ExitStatus> {
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

// ---------------------------------------------------------------------------
// tshark

/// A `tshark` capture running in a namespace, writing a pcapng file.
pub struct Capture {
    child: Option<Child>,
    pub file: PathBuf,
    stderr: Arc<Mutex<Vec<String>>>,
    reader: Option<thread::JoinHandle<()>>,
    stdout_reader: Option<thread::JoinHandle<()>>,
}

#[derive(Debug)]
pub struct CaptureSummary {
    pub captured: Option<u64>,
    pub dropped: u64,
    pub stderr: String,
}

impl Capture {
    /// Starts `tshark -i <iface> -f "(<filter>) or udp dst port 9" -w
    /// <file>` in `ns` and waits (bounded) until it is really capturing:
    /// tshark says `Capturing on` before dumpcap delivers packets, so
    /// `probe_from` (a namespace with a route to `probe_to`) sends a UDP
    /// datagram to `probe_to:9` every 100 ms until tshark prints one
    /// (`-P -l`: a summary line per packet, flushed). The probes are in the
    /// file too; `read_capture` returns TCP segments only.
    #[track_caller]
    pub fn start(
        ns: &NetNs,
        iface: &str,
        filter: &str,
        file: PathBuf,
        probe_from: &NetNs,
        probe_to: Ipv4Addr,
    ) -> Capture {
        let full = format!("({filter}) or (udp and dst host {probe_to} and dst port 9)");
        let mut child = Command::new("ip")
            .args([
                "netns",
                "exec",
                ns.name(),
                "tshark",
                "-n",
                "-l",
                "-P",
                "-i",
                iface,
                "-f",
                &full,
                "-B",
                "64",
                "-s",
                "160",
                "-w",
            ])
            .arg(&file)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn tshark: {e}"));
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        let pipe = child.stderr.take().expect("tshark stderr");
        let lines = Arc::clone(&stderr);
        let reader = thread::spawn(move || {
            for line in BufReader::new(pipe).lines() {
                let Ok(line) = line else { break };
                lines.lock().unwrap().push(line);
            }
        });
        let out = child.stdout.take().expect("tshark stdout");
        let stdout_reader = thread::spawn(move || {
            let mut told = false;
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if !told && line.contains("UDP") {
                    told = tx.send(()).is_ok();
                }
            }
        });
        let mut cap = Capture {
            child: Some(child),
            file,
            stderr,
            reader: Some(reader),
            stdout_reader: Some(stdout_reader),
        };
        let timeout = scaled(Duration::from_secs(20));
        let start = Instant::now();
        let sock = probe_from
            .run(|| std::net::UdpSocket::bind("0.0.0.0:0"))
            .expect("probe socket");
        let mut probes = 0u32;
        loop {
            sock.send_to(b"capture probe", (probe_to, 9)).expect("send probe");
            probes += 1;
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(()) => {
                    eprintln!("tshark capturing after {:?} ({probes} probe(s))", start.elapsed());
                    return cap;
                }
                Err(mpsc::RecvTimeoutError::Timeout) if start.elapsed() < timeout => {}
                Err(_) => {
                    let status = cap.child.as_mut().unwrap().try_wait().ok().flatten();
                    panic!(
                        "tshark saw none of {probes} probes within {timeout:?} (exit: {status:?}):\n{}",
                        cap.stderr.lock().unwrap().join("\n")
                    );
                }
            }
        }
    }

    /// SIGINT (tshark then writes out what it has), waits for it, and
    /// returns its own account of the capture.
    #[track_caller]
    pub fn stop(mut self) -> CaptureSummary {
        let mut child = self.child.take().expect("capture running");
        let status = stop_child(&mut child, libc::SIGINT, scaled(Duration::from_secs(20)));
        for r in [self.reader.take(), self.stdout_reader.take()].into_iter().flatten() {
            let _ = r.join();
        }
        let lines = self.stderr.lock().unwrap().clone();
        let text = lines.join("\n");
        if !status.is_some_and(|s| s.success() || s.code().is_none()) {
            panic!("tshark ended with {status:?}:\n{text}");
        }
        let captured = lines.iter().find_map(|l| {
            let (n, rest) = l.trim().split_once(' ')?;
            (rest.starts_with("packet") && rest.contains("captured")).then(|| n.parse().ok())?
        });
        CaptureSummary {
            captured,
            dropped: dropped_count(&lines),
            stderr: text,
        }
    }
}

/// Packets tshark/dumpcap say they lost: the number before "packet(s)
/// dropped" on any of its lines (0 when it says nothing about drops).
fn dropped_count(lines: &[String]) -> u64 {
    let mut total = 0;
    for l in lines {
        let mut rest = l.as_str();
        while let Some(pos) = rest.find("dropped") {
            let before = &rest[..pos];
            let n = before
                .split(|c: char| !c.is_ascii_digit())
                .filter(|t| !t.is_empty())
                .last()
                .and_then(|t| t.parse::<u64>().ok());
            total += n.unwrap_or(0);
            rest = &rest[pos + "dropped".len()..];
        }
    }
    total
}

impl Drop for Capture {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            stop_child(&mut child, libc::SIGINT, Duration::from_secs(10));
        }
        for r in [self.reader.take(), self.stdout_reader.take()].into_iter().flatten() {
            let _ = r.join();
        }
    }
}

/// One TCP segment of the capture.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Packet {
    /// Seconds since the first packet of the capture.
    pub t: f64,
    pub src: SocketAddrV4,
    pub dst: SocketAddrV4,
    pub flags: u16,
    pub seq: u32,
    pub ack: u32,
    /// Payload length.
    pub len: u32,
}

pub const FIN: u16 = 0x01;
pub const SYN: u16 = 0x02;
pub const RST: u16 = 0x04;
pub const ACK: u16 = 0x10;

impl Packet {
    fn has(&self, f: u16) -> bool {
        self.flags & f != 0
    }
}

/// Reads a capture back (`tshark -r FILE -T fields`), raw sequence numbers:
/// the TCP segments, and how many frames the file holds in all.
#[track_caller]
pub fn read_capture(file: &Path) -> (Vec<Packet>, u64) {
    let f = file.to_str().expect("UTF-8 path");
    let mut args = vec!["-n", "-r", f, "-T", "fields", "-E", "separator=,", "-E", "occurrence=f"];
    for field in [
        "frame.time_relative",
        "ip.src",
        "tcp.srcport",
        "ip.dst",
        "tcp.dstport",
        "tcp.flags",
        "tcp.seq_raw",
        "tcp.ack_raw",
        "tcp.len",
    ] {
        args.extend(["-e", field]);
    }
    let text = run_cmd("tshark", &args);
    let frames: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let packets = frames
        .iter()
        // Frames without TCP fields: the capture's UDP probes.
        .filter(|l| l.split(',').nth(5).is_some_and(|f| !f.is_empty()))
        .map(|l| parse_packet(l).unwrap_or_else(|e| panic!("capture line {l:?}: {e}")))
        .collect();
    (packets, frames.len() as u64)
}

fn parse_packet(line: &str) -> Result<Packet, String> {
    let f: Vec<&str> = line.split(',').collect();
    if f.len() < 9 {
        return Err(format!("{} fields", f.len()));
    }
    let ip = |s: &str| s.parse::<Ipv4Addr>().map_err(|e| format!("{s:?}: {e}"));
    let num = |s: &str| s.parse::<u64>().map_err(|e| format!("{s:?}: {e}"));
    let flags = u16::from_str_radix(f[5].trim_start_matches("0x"), 16).map_err(|e| format!("flags {:?}: {e}", f[5]))?;
    Ok(Packet {
        t: f[0].parse().map_err(|e| format!("time {:?}: {e}", f[0]))?,
        src: SocketAddrV4::new(ip(f[1])?, num(f[2])? as u16),
        dst: SocketAddrV4::new(ip(f[3])?, num(f[4])? as u16),
        flags,
        seq: num(f[6])? as u32,
        ack: if f[7].is_empty() { 0 } else { num(f[7])? as u32 },
        len: if f[8].is_empty() { 0 } else { num(f[8])? as u32 },
    })
}

// ---------------------------------------------------------------------------
// Ground truth: SYNs that met a TIME_WAIT, from the capture

/// What the server holds on one 4-tuple, as the capture shows it.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Tuple {
    /// Nothing (never used, reset, or closed by the client first).
    Free,
    /// A connection (from its SYN-ACK on) and who has sent a FIN so far.
    Open { server_fin: bool, client_fin: bool },
    /// The server closed first and the client's FIN arrived at `since`: the
    /// server's minisocket is in TIME_WAIT, expecting `rcv_nxt` next.
    TimeWait { since: f64, rcv_nxt: u32 },
}

/// A SYN that met a TIME_WAIT and waits for the server's verdict.
#[derive(Debug, Clone, Copy)]
struct Pending {
    t: f64,
    seq: u32,
    answered_ack: bool,
    /// The minisocket's `tw_snd_nxt` (the server's FIN + 1): a SYN it lets
    /// through gets the ISN `tw_snd_nxt + 65535 + 2` (`tcp_tw_isn`).
    tw_snd_nxt: Option<u32>,
}

#[derive(Debug, Default, Clone)]
pub struct SynTruth {
    /// SYNs (without ACK) from the remote.
    pub syns: u64,
    /// Of those, the ones that met a TIME_WAIT minisocket.
    pub hits: u64,
    /// Hits answered with a SYN-ACK for that very SYN.
    pub accepted: u64,
    /// Of those, the ones whose SYN-ACK carries the ISN the kernel derives
    /// from the minisocket (`tw_snd_nxt + 65537`): proof on the wire that the
    /// SYN went through the TIME_WAIT and was let through by it.
    pub accepted_isn_from_tw: u64,
    /// Hits not accepted.
    pub rejected: u64,
    /// Rejected hits the server answered with a bare ACK.
    pub rejected_acked: u64,
    /// Rejected hits the server did not answer at all.
    pub rejected_silent: u64,
    /// Hits whose sequence number repeats an earlier SYN on the 4-tuple (a
    /// retransmission).
    pub hits_retransmitted: u64,
    /// Connections the server closed first (each left a TIME_WAIT).
    pub server_first: u64,
    /// Connections the client closed first.
    pub client_first: u64,
    /// TIME_WAITs killed by the client's RST at exactly `rcv_nxt`.
    pub tw_reset: u64,
    /// SYNs on a 4-tuple in FIN_WAIT2 (server FIN sent, client FIN not in
    /// yet): not TIME_WAIT, reported apart.
    pub syn_in_fin_wait2: u64,
    /// SYN-ACKs from the server (connections opened).
    pub syn_acks: u64,
    /// First to last packet of the capture, seconds.
    pub span: f64,
    /// Distinct remote ports.
    pub ports: u64,
    /// A few rejected and accepted hits, for the report.
    pub examples: Vec<String>,
    /// Every hit that was a retransmission, for the report.
    pub retransmitted: Vec<String>,
}

/// The ground-truth rule (see `nat_lab`'s doc comment), over every segment
/// between `remote` (any port) and `server`, in capture order.
pub fn syn_truth(packets: &[Packet], remote: Ipv4Addr, server: SocketAddrV4) -> SynTruth {
    let mut tuples: BTreeMap<u16, Tuple> = BTreeMap::new();
    let mut pending: BTreeMap<u16, Pending> = BTreeMap::new();
    let mut syn_seqs: BTreeMap<u16, Vec<u32>> = BTreeMap::new();
    let mut server_nxt: BTreeMap<u16, u32> = BTreeMap::new();
    let mut out = SynTruth::default();
    let (mut first, mut last) = (None, 0.0f64);
    let reject = |out: &mut SynTruth, port: u16, p: Pending, why: &str| {
        out.rejected += 1;
        if p.answered_ack {
            out.rejected_acked += 1;
        } else {
            out.rejected_silent += 1;
        }
        if out.examples.len() < 6 {
            out.examples.push(format!(
                "rejected: SYN {remote}:{port} seq {} at {:.6} ({}; {why})",
                p.seq,
                p.t,
                if p.answered_ack {
                    "answered with an ACK"
                } else {
                    "not answered"
                }
            ));
        }
    };
    for p in packets {
        let from_remote = *p.src.ip() == remote && p.dst == server;
        let to_remote = p.src == server && *p.dst.ip() == remote;
        if !from_remote && !to_remote {
            continue;
        }
        first.get_or_insert(p.t);
        last = p.t;
        let port = if from_remote { p.src.port() } else { p.dst.port() };
        let state = tuples.entry(port).or_insert(Tuple::Free);
        if from_remote {
            // Any later segment from the remote settles a verdict still
            // open: the server did not answer the SYN with its SYN-ACK.
            if let Some(pend) = pending.remove(&port) {
                reject(&mut out, port, pend, "the remote's next segment came first");
            }
            if p.has(SYN) && !p.has(ACK) {
                out.syns += 1;
                let seqs = syn_seqs.entry(port).or_default();
                let retransmitted = seqs.contains(&p.seq);
                seqs.push(p.seq);
                match *state {
                    Tuple::TimeWait { since, .. } if p.t - since < TIME_WAIT_LEN => {
                        out.hits += 1;
                        if retransmitted {
                            out.hits_retransmitted += 1;
                            out.retransmitted.push(format!(
                                "SYN {remote}:{port} seq {} at {:.6} (TIME_WAIT since {since:.6})",
                                p.seq, p.t
                            ));
                        }
                        pending.insert(
                            port,
                            Pending {
                                t: p.t,
                                seq: p.seq,
                                answered_ack: false,
                                tw_snd_nxt: server_nxt.get(&port).copied(),
                            },
                        );
                    }
                    Tuple::TimeWait { .. } => *state = Tuple::Free,
                    Tuple::Open {
                        server_fin: true,
                        client_fin: false,
                    } => out.syn_in_fin_wait2 += 1,
                    _ => {}
                }
            } else if p.has(RST) {
                if let Tuple::TimeWait { rcv_nxt, .. } = *state
                    && p.seq == rcv_nxt
                {
                    out.tw_reset += 1;
                    *state = Tuple::Free;
                }
            } else if p.has(FIN)
                && let Tuple::Open { server_fin, .. } = *state
            {
                if server_fin {
                    out.server_first += 1;
                    *state = Tuple::TimeWait {
                        since: p.t,
                        rcv_nxt: p.seq.wrapping_add(p.len).wrapping_add(1),
                    };
                } else {
                    *state = Tuple::Open {
                        server_fin: false,
                        client_fin: true,
                    };
                }
            }
        } else if p.has(SYN) && p.has(ACK) {
            out.syn_acks += 1;
            if let Some(pend) = pending.remove(&port) {
                if p.ack == pend.seq.wrapping_add(1) {
                    out.accepted += 1;
                    if pend.tw_snd_nxt.map(|n| n.wrapping_add(65537)) == Some(p.seq) {
                        out.accepted_isn_from_tw += 1;
                    }
                    if out.examples.len() < 6 {
                        out.examples.push(format!(
                            "accepted: SYN {remote}:{port} seq {} at {:.6}, SYN-ACK at {:.6}",
                            pend.seq, pend.t, p.t
                        ));
                    }
                } else {
                    reject(&mut out, port, pend, "a SYN-ACK for another sequence number");
                }
            }
            *state = Tuple::Open {
                server_fin: false,
                client_fin: false,
            };
        } else if p.has(RST) {
            *state = Tuple::Free;
        } else if p.has(FIN) {
            server_nxt.insert(port, p.seq.wrapping_add(p.len).wrapping_add(1));
            if let Tuple::Open { client_fin, .. } = *state {
                if client_fin {
                    out.client_first += 1;
                    *state = Tuple::Free;
                } else {
                    *state = Tuple::Open {
                        server_fin: true,
                        client_fin: false,
                    };
                }
            }
        } else if p.has(ACK)
            && let Some(pend) = pending.get_mut(&port)
        {
            pend.answered_ack = true;
        }
    }
    for (port, pend) in std::mem::take(&mut pending) {
        reject(&mut out, port, pend, "the capture ended");
    }
    out.span = first.map_or(0.0, |f| last - f);
    out.ports = tuples.len() as u64;
    out
}

/// `SynTruth` as one line for the report.
pub fn truth_line(t: &SynTruth) -> String {
    let mut s = String::new();
    let _ = write!(
        s,
        "SYNs {} (SYN-ACKs {}), hitting TIME_WAIT {} (retransmissions {}): accepted {} (ISN from the TIME_WAIT {}), rejected {} \
         ({} answered with an ACK, {} silent); server closed first {}, client first {}; \
         TIME_WAIT reset by the client {}; SYNs in FIN_WAIT2 {}; {} remote ports; span {:.1} s",
        t.syns,
        t.syn_acks,
        t.hits,
        t.hits_retransmitted,
        t.accepted,
        t.accepted_isn_from_tw,
        t.rejected,
        t.rejected_acked,
        t.rejected_silent,
        t.server_first,
        t.client_first,
        t.tw_reset,
        t.syn_in_fin_wait2,
        t.ports,
        t.span
    );
    s
}

/// The rule on a hand-written capture (no root needed): a rejected SYN
/// answered with an ACK and followed by the client's RST at `rcv_nxt` (its
/// retransmission then meets the listener: no hit), a silent rejection whose
/// retransmission meets the TIME_WAIT again and is accepted, a client-first
/// close (no TIME_WAIT on the server), and expiry after 60 s.
#[test]
fn syn_truth_rule() {
    let nat = Ipv4Addr::new(10, 77, 3, 1);
    let server = SocketAddrV4::new(Ipv4Addr::new(10, 77, 3, 2), 80);
    let c = |port| SocketAddrV4::new(nat, port);
    let mut t = 0.0;
    let mut pk = Vec::new();
    let mut push = |dt: f64, from_client: bool, port: u16, flags: u16, seq: u32, ack: u32| {
        t += dt;
        let (src, dst) = if from_client {
            (c(port), server)
        } else {
            (server, c(port))
        };
        pk.push(Packet {
            t,
            src,
            dst,
            flags,
            seq,
            ack,
            len: 0,
        });
    };
    // A connection the server closes first: SYN, SYN-ACK, ACK, server FIN,
    // client FIN (TIME_WAIT from here, rcv_nxt = fin_seq + 1), last ACK.
    let conn = |push: &mut dyn FnMut(f64, bool, u16, u16, u32, u32), port, isn: u32, server_first: bool| {
        push(0.001, true, port, SYN, isn, 0);
        push(0.001, false, port, SYN | ACK, 5000, isn + 1);
        push(0.001, true, port, ACK, isn + 1, 5001);
        if server_first {
            push(0.001, false, port, FIN | ACK, 5001, isn + 1);
            push(0.001, true, port, FIN | ACK, isn + 1, 5002);
            push(0.001, false, port, ACK, 5002, isn + 2);
        } else {
            push(0.001, true, port, FIN | ACK, isn + 1, 5001);
            push(0.001, false, port, FIN | ACK, 5001, isn + 2);
            push(0.001, true, port, ACK, isn + 2, 5002);
        }
    };
    conn(&mut push, 40000, 100, true);
    // Rejected (ACK, then the client's RST at rcv_nxt 102 kills the TIME_WAIT).
    push(1.0, true, 40000, SYN, 50, 0);
    push(0.001, false, 40000, ACK, 5002, 102);
    push(0.001, true, 40000, RST, 102, 0);
    // Its retransmission meets no TIME_WAIT: a plain new connection.
    conn(&mut push, 40000, 50, true);
    // Rejected silently, retransmitted 1 s later, accepted then.
    push(1.0, true, 40000, SYN, 10, 0);
    push(1.0, true, 40000, SYN, 10, 0);
    push(0.001, false, 40000, SYN | ACK, 5002 + 65537, 11);
    push(0.001, true, 40000, ACK, 11, 5002 + 65538);
    // Closed by the client first: no TIME_WAIT on the server.
    push(0.001, true, 40000, FIN | ACK, 11, 5002 + 65538);
    push(0.001, false, 40000, FIN | ACK, 5002 + 65538, 12);
    push(0.001, true, 40000, ACK, 12, 5002 + 65539);
    conn(&mut push, 40000, 900, true);
    // Another port: its TIME_WAIT expires before the next SYN.
    conn(&mut push, 40001, 100, true);
    push(61.0, true, 40001, SYN, 200, 0);
    push(0.001, false, 40001, SYN | ACK, 8000, 201);
    let truth = syn_truth(&pk, nat, server);
    assert_eq!(
        (truth.hits, truth.rejected, truth.accepted, truth.hits_retransmitted),
        (3, 2, 1, 1),
        "{}",
        truth_line(&truth)
    );
    assert_eq!((truth.rejected_acked, truth.rejected_silent, truth.tw_reset), (1, 1, 1));
    assert_eq!((truth.server_first, truth.client_first), (4, 1));
    assert_eq!(truth.accepted_isn_from_tw, 1);
}
