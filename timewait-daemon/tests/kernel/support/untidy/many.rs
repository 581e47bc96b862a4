//! Tens of thousands of server-side TIME_WAIT made fast, and readings of them whose failure output stays short.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::time::{Duration, Instant};

use crate::support::metrics::Metrics;
use crate::support::netns::{NetNs, run_cmd};
use crate::support::sockets::{connect_from_port, wait_eof};
use crate::support::ss::{SsSocket, label_ip};

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
