//! Helpers for the issue-3 tests (SYN in TIME_WAIT, kill reasons): fixed-port
//! clients, reading a connection's send sequence and timestamp, hand-built
//! TCP segments sent from a raw socket, `nstat` counters of a namespace, and
//! bounded waits for counters that the daemon resolves a little late.
//!
//! Everything that opens a socket must run inside the namespace under test
//! (through `NetNs::run`).

#![allow(dead_code, reason = "not every test uses every helper")]

use std::collections::BTreeMap;
use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::thread;
use std::time::{Duration, Instant};

use crate::support::{Daemon, Metrics, NetNs, parse_ss};

/// `struct tcp_repair_opt`'s queue id for the send queue (include/uapi/linux/tcp.h);
/// the libc crate does not export it.
const TCP_SEND_QUEUE: libc::c_int = 2;

/// The daemon resolves a kill up to ~200 ms after it happened; an
/// expected count is watched this long after it is reached, to catch a late
/// over-count.
const OVERSHOOT_WATCH: Duration = Duration::from_millis(600);
/// How long a counter may take to reach its expected value.
const COUNTER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a socket may take to reach (or leave) a state.
const SOCKET_TIMEOUT: Duration = Duration::from_secs(5);

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

// ---------------------------------------------------------------------------
// Sockets

fn check(rc: libc::c_int, what: &str) -> io::Result<()> {
    if rc < 0 {
        Err(io::Error::other(format!(
            "{what}: {}",
            io::Error::last_os_error()
        )))
    } else {
        Ok(())
    }
}

fn sockaddr_in(a: SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*a.ip()).to_be(),
        },
        sin_zero: [0; 8],
    }
}

fn set_int(
    fd: &OwnedFd,
    level: libc::c_int,
    opt: libc::c_int,
    val: libc::c_int,
    what: &str,
) -> io::Result<()> {
    // SAFETY: `fd` is open; the value points to a live c_int of the given size.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            opt,
            (&raw const val).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    check(rc, what)
}

/// A TCP client bound to exactly `local` (SO_REUSEADDR), connected to `remote`.
pub fn fixed_port_client(local: SocketAddrV4, remote: SocketAddrV4) -> io::Result<TcpStream> {
    // SAFETY: plain socket(2) call; the result is checked before use.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    check(fd, "socket")?;
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    set_int(&fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1, "SO_REUSEADDR")?;
    let sa = sockaddr_in(local);
    // SAFETY: `sa` is a valid sockaddr_in of the size passed.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&raw const sa).cast(),
            size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    check(rc, &format!("bind {local}"))?;
    let sa = sockaddr_in(remote);
    // SAFETY: as above.
    let rc = unsafe {
        libc::connect(
            fd.as_raw_fd(),
            (&raw const sa).cast(),
            size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    check(rc, &format!("connect {local} -> {remote}"))?;
    Ok(TcpStream::from(fd))
}

pub use crate::support::wait_eof;

/// The connection's next send sequence number (`tp->write_seq`), read through
/// TCP_REPAIR: repair mode on, select the send queue, read TCP_QUEUE_SEQ,
/// repair mode off again (the connection carries on normally). Needs
/// CAP_NET_ADMIN.
#[track_caller]
pub fn send_seq(s: &TcpStream) -> u32 {
    let fd = s.as_raw_fd();
    let set = |opt: libc::c_int, val: libc::c_int, what: &str| {
        // SAFETY: `fd` is open (borrowed from `s`); the value is a live c_int.
        let rc = unsafe {
            libc::setsockopt(
                fd,
                libc::IPPROTO_TCP,
                opt,
                (&raw const val).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            panic!("setsockopt {what}: {}", io::Error::last_os_error());
        }
    };
    set(libc::TCP_REPAIR, 1, "TCP_REPAIR=1");
    set(
        libc::TCP_REPAIR_QUEUE,
        TCP_SEND_QUEUE,
        "TCP_REPAIR_QUEUE=TCP_SEND_QUEUE",
    );
    let mut seq: u32 = 0;
    let mut len = size_of::<u32>() as libc::socklen_t;
    // SAFETY: `fd` is open; `seq`/`len` are live and `len` is seq's size.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_QUEUE_SEQ,
            (&raw mut seq).cast(),
            &raw mut len,
        )
    };
    if rc != 0 {
        panic!("getsockopt TCP_QUEUE_SEQ: {}", io::Error::last_os_error());
    }
    // TCP_REPAIR_OFF_NO_WP (-1): leave repair mode without the window probe
    // that TCP_REPAIR_OFF (0) sends, so the connection sees no extra segment.
    set(libc::TCP_REPAIR, -1, "TCP_REPAIR=TCP_REPAIR_OFF_NO_WP");
    seq
}

/// The timestamp value the connection puts in its next segment
/// (`TCP_TIMESTAMP`: the TCP clock plus the connection's offset).
#[track_caller]
pub fn tsval(s: &TcpStream) -> u32 {
    let mut v: u32 = 0;
    let mut len = size_of::<u32>() as libc::socklen_t;
    // SAFETY: the fd is open (borrowed from `s`); `v`/`len` are live and `len` is v's size.
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_TIMESTAMP,
            (&raw mut v).cast(),
            &raw mut len,
        )
    };
    if rc != 0 {
        panic!("getsockopt TCP_TIMESTAMP: {}", io::Error::last_os_error());
    }
    v
}

/// One hand-built TCP segment.
#[derive(Debug, Clone, Copy)]
pub struct Segment {
    pub src: SocketAddrV4,
    pub dst: SocketAddrV4,
    pub seq: u32,
    pub ack: u32,
    pub flags: u8,
    /// `(tsval, tsecr)`: adds the timestamp option (NOP, NOP, TS).
    pub timestamp: Option<(u32, u32)>,
}

impl Segment {
    /// The TCP header with a correct checksum (pseudo-header: src, dst,
    /// protocol 6, TCP length).
    pub fn bytes(&self) -> Vec<u8> {
        let opt_len = if self.timestamp.is_some() { 12 } else { 0 };
        let len = 20 + opt_len;
        let mut h = vec![0u8; len];
        h[0..2].copy_from_slice(&self.src.port().to_be_bytes());
        h[2..4].copy_from_slice(&self.dst.port().to_be_bytes());
        h[4..8].copy_from_slice(&self.seq.to_be_bytes());
        h[8..12].copy_from_slice(&self.ack.to_be_bytes());
        h[12] = ((len / 4) as u8) << 4;
        h[13] = self.flags;
        h[14..16].copy_from_slice(&65535u16.to_be_bytes());
        if let Some((val, ecr)) = self.timestamp {
            h[20] = 1; // NOP
            h[21] = 1; // NOP
            h[22] = 8; // kind: timestamp
            h[23] = 10; // length
            h[24..28].copy_from_slice(&val.to_be_bytes());
            h[28..32].copy_from_slice(&ecr.to_be_bytes());
        }
        let mut pseudo = Vec::with_capacity(12 + len);
        pseudo.extend_from_slice(&self.src.ip().octets());
        pseudo.extend_from_slice(&self.dst.ip().octets());
        pseudo.extend_from_slice(&[0, libc::IPPROTO_TCP as u8]);
        pseudo.extend_from_slice(&(len as u16).to_be_bytes());
        pseudo.extend_from_slice(&h);
        let sum = internet_checksum(&pseudo);
        h[16..18].copy_from_slice(&sum.to_be_bytes());
        h
    }

    /// Sends it from a raw socket (`SOCK_RAW`, `IPPROTO_TCP`; the kernel
    /// writes the IP header) bound to the source address, so the kernel's IP
    /// source is the one the checksum covers. Call inside the namespace.
    #[track_caller]
    pub fn send(&self) {
        // SAFETY: plain socket(2) call; the result is checked before use.
        let fd = unsafe {
            libc::socket(
                libc::AF_INET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::IPPROTO_TCP,
            )
        };
        if fd < 0 {
            panic!(
                "socket(SOCK_RAW, IPPROTO_TCP): {}",
                io::Error::last_os_error()
            );
        }
        // SAFETY: `fd` is a fresh descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let src = sockaddr_in(SocketAddrV4::new(*self.src.ip(), 0));
        // SAFETY: `src` is a valid sockaddr_in of the size passed.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&raw const src).cast(),
                size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            panic!(
                "bind raw socket to {}: {}",
                self.src.ip(),
                io::Error::last_os_error()
            );
        }
        let bytes = self.bytes();
        let dst = sockaddr_in(SocketAddrV4::new(*self.dst.ip(), 0));
        // SAFETY: `bytes` is live for the call and its length is passed;
        // `dst` is a valid sockaddr_in of the size passed.
        let n = unsafe {
            libc::sendto(
                fd.as_raw_fd(),
                bytes.as_ptr().cast(),
                bytes.len(),
                0,
                (&raw const dst).cast(),
                size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        };
        if n != bytes.len() as isize {
            panic!("sendto {self:?}: {n}: {}", io::Error::last_os_error());
        }
    }
}

fn internet_checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for chunk in data.chunks(2) {
        let word = if chunk.len() == 2 {
            u16::from_be_bytes([chunk[0], chunk[1]])
        } else {
            u16::from_be_bytes([chunk[0], 0])
        };
        sum += u32::from(word);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

pub fn sa4(ip: [u8; 4], port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::from(ip), port)
}

/// What is left of one connection whose server closed first.
#[derive(Debug, Clone, Copy)]
pub struct ServerTimeWait {
    /// The client's address and port (the minisocket's peer).
    pub client: SocketAddrV4,
    /// The listener's address and port (the minisocket's local end).
    pub server: SocketAddrV4,
    /// The minisocket's `tw_rcv_nxt`: the client's send sequence + 1 for its FIN.
    pub rcv_nxt: u32,
    /// The client's timestamp clock just before it closed (its FIN carried
    /// this or later, so the minisocket's `ts_recent` is at least this).
    pub tsval: u32,
}

/// One connection from exactly `client` to `server` (a listener of this
/// namespace, passed as `listener`), the server closing first: the server
/// accepts and closes, the client reads EOF and closes. Before closing, the
/// client's send sequence and timestamp are read. Returns once `ss` shows the
/// server's minisocket in TIME_WAIT and nothing else on the 4-tuple.
#[track_caller]
pub fn server_closes_first_once(
    ns: &NetNs,
    listener: &std::net::TcpListener,
    client: SocketAddrV4,
) -> ServerTimeWait {
    let server = match listener.local_addr().expect("listener address") {
        SocketAddr::V4(a) => a,
        other => panic!("IPv4 listener expected, got {other}"),
    };
    let (seq, ts) = ns.run(|| {
        let c = fixed_port_client(client, server)
            .unwrap_or_else(|e| panic!("connect {client} -> {server}: {e}"));
        let (srv, _) = listener.accept().expect("accept");
        let seq = send_seq(&c);
        let ts = tsval(&c);
        drop(srv);
        wait_eof(&c);
        drop(c);
        (seq, ts)
    });
    wait_only_time_wait(ns, server, client);
    ServerTimeWait {
        client,
        server,
        rcv_nxt: seq.wrapping_add(1),
        tsval: ts,
    }
}

// ---------------------------------------------------------------------------
// What the namespace shows

/// Every socket (any state but LISTEN) of the namespace on exactly this 4-tuple, as
/// `ss` lines.
pub fn ss_tuple(ns: &NetNs, local: SocketAddrV4, peer: SocketAddrV4) -> Vec<String> {
    ns.exec(&["ss", "-Htan", "state", "connected"])
        .lines()
        .filter(|l| {
            parse_ss(l)
                .iter()
                .any(|s| s.local == SocketAddr::V4(local) && s.peer == SocketAddr::V4(peer))
        })
        .map(str::to_string)
        .collect()
}

/// Whether `ss state time-wait` shows this 4-tuple.
pub fn in_time_wait(ns: &NetNs, local: SocketAddrV4, peer: SocketAddrV4) -> bool {
    ns.ss("time-wait")
        .iter()
        .any(|s| s.local == SocketAddr::V4(local) && s.peer == SocketAddr::V4(peer))
}

/// Waits (bounded) until the namespace holds exactly one socket on the
/// 4-tuple and it is in TIME_WAIT: the peer's end is fully gone, so a
/// segment answered toward it meets no socket.
#[track_caller]
pub fn wait_only_time_wait(ns: &NetNs, local: SocketAddrV4, peer: SocketAddrV4) {
    let start = Instant::now();
    let mut seen: Vec<Vec<String>> = Vec::new();
    loop {
        let lines = ss_tuple(ns, local, peer);
        if lines.len() == 1 && lines[0].starts_with("TIME-WAIT") {
            return;
        }
        if seen.last() != Some(&lines) {
            seen.push(lines.clone());
        }
        if start.elapsed() >= SOCKET_TIMEOUT {
            let k = nstat(ns);
            let kernel: Vec<String> = [
                "TcpExtTW",
                "TcpExtTCPTimeWaitOverflow",
                "TcpEstabResets",
                "TcpExtTCPAbortOnClose",
                "TcpExtTCPAbortOnData",
                "TcpOutRsts",
            ]
            .iter()
            .map(|c| format!("{c}={}", k.get(*c).copied().unwrap_or(0)))
            .collect();
            panic!(
                "{local} <-> {peer}: expected only a TIME-WAIT after {SOCKET_TIMEOUT:?}, \
                 ss showed, in turn: {seen:?}; kernel counters now: {}",
                kernel.join(" ")
            );
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Waits (bounded) until no socket is left on the 4-tuple.
#[track_caller]
pub fn wait_tuple_gone(ns: &NetNs, local: SocketAddrV4, peer: SocketAddrV4) {
    let start = Instant::now();
    loop {
        let lines = ss_tuple(ns, local, peer);
        if lines.is_empty() {
            return;
        }
        if start.elapsed() >= SOCKET_TIMEOUT {
            panic!("{local} <-> {peer}: still there after {SOCKET_TIMEOUT:?}: {lines:?}");
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// The namespace's kernel SNMP/netstat counters (`nstat -asz`: absolute,
/// history file left alone, zeros included).
#[track_caller]
pub fn nstat(ns: &NetNs) -> BTreeMap<String, u64> {
    ns.exec(&["nstat", "-asz"])
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            let k = it.next()?;
            let v = it.next()?.parse().ok()?;
            Some((k.to_string(), v))
        })
        .collect()
}

/// `after[key] - before[key]` (a missing counter reads 0).
pub fn kdelta(before: &BTreeMap<String, u64>, after: &BTreeMap<String, u64>, key: &str) -> u64 {
    let a = after.get(key).copied().unwrap_or(0);
    let b = before.get(key).copied().unwrap_or(0);
    a.checked_sub(b)
        .unwrap_or_else(|| panic!("kernel counter {key} went down: {b} -> {a}"))
}

/// Minisockets the kernel created between two readings, from its own
/// counters: `TcpExtTW + TcpExtTWKilled`. Where the kernel bumps them when
/// the timer fires instead (measured on 5.10: `tw_timer_handler` counts
/// TIMEWAITED/TIMEWAITKILLED; 6.1 and later count them in
/// `__inet_twsk_schedule`), they count expiries, not creations: None there,
/// said on stderr.
pub fn tw_created_delta(before: &BTreeMap<String, u64>, after: &BTreeMap<String, u64>) -> Option<u64> {
    if crate::support::test_kernel() == "5.10" {
        eprintln!("kernel 5.10 counts TcpExtTW at expiry: created_total not compared with it");
        return None;
    }
    Some(kdelta(before, after, "TcpExtTW") + kdelta(before, after, "TcpExtTWKilled"))
}

/// PAWS rejections by minisockets. Which counter the kernel bumps changed:
/// measured, 6.12 and earlier count them in `TcpExtPAWSEstab`
/// (LINUX_MIB_PAWSESTABREJECTED), 6.18 in `TcpExtPAWSTimewait`. A test's own
/// namespace has no other PAWS rejections, so the sum is the oracle.
pub fn paws_tw_delta(before: &BTreeMap<String, u64>, after: &BTreeMap<String, u64>) -> u64 {
    kdelta(before, after, "TcpExtPAWSTimewait") + kdelta(before, after, "TcpExtPAWSEstab")
}

/// The kernel counters these tests compare with, as one printable line.
pub fn kernel_line(before: &BTreeMap<String, u64>, after: &BTreeMap<String, u64>) -> String {
    [
        "TcpExtTW",
        "TcpExtTWKilled",
        "TcpExtTWRecycled",
        "TcpExtPAWSTimewait",
        "TcpExtPAWSEstab",
        "TcpExtTCPACKSkippedTimeWait",
        "TcpExtTCPTimeWaitOverflow",
    ]
    .iter()
    .map(|k| format!("{k}+{}", kdelta(before, after, k)))
    .collect::<Vec<_>>()
    .join(" ")
}

// ---------------------------------------------------------------------------
// Metrics

/// `timewait_lifetime_seconds_bucket{reason, le}` (cumulative).
#[track_caller]
pub fn lifetime_bucket(m: &Metrics, reason: &str, le: f64) -> u64 {
    let found: Vec<f64> = m
        .series("timewait_lifetime_seconds_bucket")
        .into_iter()
        .filter(|(l, _)| l.get("reason").map(String::as_str) == Some(reason))
        .filter(|(l, _)| l.get("le").and_then(|v| v.parse::<f64>().ok()) == Some(le))
        .map(|(_, v)| v)
        .collect();
    match found.as_slice() {
        [v] => *v as u64,
        [] => 0,
        _ => panic!("several lifetime buckets for reason={reason} le={le}: {found:?}"),
    }
}

/// Waits (bounded) until `name{filters}` (summed) reaches `want`, then
/// watches it a little longer than the daemon's kill-resolution delay;
/// panics if it never gets there or goes past it. Returns the scrape that
/// last showed `want`.
#[track_caller]
pub fn wait_count(daemon: &Daemon, name: &str, filters: &[(&str, &str)], want: u64) -> Metrics {
    let start = Instant::now();
    let mut m;
    loop {
        m = daemon.scrape();
        let v = m.count(name, filters);
        if v > want {
            panic!(
                "{name}{filters:?} = {v}, expected {want}\n{}",
                daemon.log_tail()
            );
        }
        if v == want {
            break;
        }
        if start.elapsed() >= COUNTER_TIMEOUT {
            panic!(
                "{name}{filters:?} = {v} after {COUNTER_TIMEOUT:?}, expected {want}\n{}",
                daemon.log_tail()
            );
        }
        thread::sleep(Duration::from_millis(50));
    }
    let reached = Instant::now();
    while reached.elapsed() < OVERSHOOT_WATCH {
        thread::sleep(Duration::from_millis(100));
        let later = daemon.scrape();
        let v = later.count(name, filters);
        if v != want {
            panic!(
                "{name}{filters:?} reached {want}, then read {v} {:?} later",
                reached.elapsed()
            );
        }
        m = later;
    }
    m
}

/// `created_total` (all directions) vs closed (all reasons) + open
/// (`timewait_sockets` + `timewait_fin_wait2_orphans`), from one scrape,
/// retried until they agree (20 s at most). Returns
/// `(created, closed_by_reason, sockets, orphans)`.
#[track_caller]
pub fn wait_balanced(daemon: &Daemon) -> (u64, BTreeMap<String, u64>, u64, u64) {
    let start = Instant::now();
    loop {
        let m = daemon.scrape();
        let created = m.count("timewait_created_total", &[]);
        let closed: BTreeMap<String, u64> = [
            "expired",
            "reused_by_syn",
            "reused_by_connect",
            "reset",
            "other",
        ]
        .iter()
        .map(|r| {
            (
                r.to_string(),
                m.count("timewait_closed_total", &[("reason", r)]),
            )
        })
        .collect();
        let all_closed = m.count("timewait_closed_total", &[]);
        let sockets = m.count("timewait_sockets", &[]);
        let orphans = m.count("timewait_fin_wait2_orphans", &[]);
        if created == all_closed + sockets + orphans && all_closed == closed.values().sum::<u64>() {
            return (created, closed, sockets, orphans);
        }
        if start.elapsed() >= Duration::from_secs(20) {
            panic!(
                "created ({created}) != closed ({all_closed}: {closed:?}) + sockets ({sockets}) + \
                 fin_wait2 orphans ({orphans}) for 20 s\n{}",
                daemon.log_tail()
            );
        }
        thread::sleep(Duration::from_millis(200));
    }
}

/// Like `NetNs::wait_settled`, for a namespace where some peers stay
/// half-open on purpose: waits (bounded) until no socket is in SYN-SENT,
/// SYN-RECV, FIN-WAIT-1, LAST-ACK or CLOSING, and every FIN-WAIT-2 socket is
/// a minisocket (timer `timewait`). CLOSE-WAIT (the peers kept open) is fine.
#[track_caller]
pub fn wait_settled_keeping_half_open(ns: &NetNs) {
    let start = Instant::now();
    loop {
        let mut busy: Vec<String> = Vec::new();
        for st in ["syn-sent", "syn-recv", "fin-wait-1", "last-ack", "closing"] {
            busy.extend(ns.ss(st).iter().map(|s| format!("{st} {s:?}")));
        }
        busy.extend(
            ns.ss("fin-wait-2")
                .iter()
                .filter(|s| {
                    !s.timer
                        .as_deref()
                        .is_some_and(|t| t.starts_with("timewait"))
                })
                .map(|s| format!("fin-wait-2 (full socket) {s:?}")),
        );
        if busy.is_empty() {
            return;
        }
        if start.elapsed() >= SOCKET_TIMEOUT {
            panic!("sockets still in transit after {SOCKET_TIMEOUT:?}: {busy:?}");
        }
        thread::sleep(Duration::from_millis(50));
    }
}
