//! What the namespace and the daemon show in the issue-3 tests: `ss` of one 4-tuple, `nstat`, bounded waits for counters.

use std::collections::BTreeMap;
use std::net::{SocketAddr, SocketAddrV4};
use std::thread;
use std::time::{Duration, Instant};

use crate::support::daemon::Daemon;
use crate::support::metrics::Metrics;
use crate::support::netns::NetNs;
use crate::support::ss::parse_ss;

/// The daemon resolves a kill up to ~200 ms after it happened; an
/// expected count is watched this long after it is reached, to catch a late
/// over-count.
const OVERSHOOT_WATCH: Duration = Duration::from_millis(600);
/// How long a counter may take to reach its expected value.
const COUNTER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a socket may take to reach (or leave) a state.
const SOCKET_TIMEOUT: Duration = Duration::from_secs(5);

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
    if crate::support::matrix::test_kernel() == "5.10" {
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
