//! Helpers for the port-exhaustion tests (issue 4): ports in use, connect/bind errors, `nstat`, a thread's `comm`.
//!
//! The outbound ports in use per destination as `ss` shows them and as the
//! daemon reports them, the connect/bind error counter, namespace counters
//! from `nstat`, the calling thread's `comm`.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::ops::RangeInclusive;

use crate::support::daemon::WEB_PORT;
use crate::support::metrics::Metrics;
use crate::support::netns::NetNs;
use crate::support::sockets::{connect_from_port, wait_eof};
use crate::support::ss::{label_ip, parse_ss};

/// `(remote, port)`, exactly as the daemon labels an outbound destination.
pub type Dest = (String, u16);

/// `net.ipv4.ip_local_port_range` inside the namespace.
#[track_caller]
pub fn set_port_range(ns: &NetNs, lo: u16, hi: u16) {
    ns.sysctl("net.ipv4.ip_local_port_range", &format!("{lo} {hi}"));
    assert_eq!(
        port_range(ns),
        (lo, hi),
        "ip_local_port_range in {} did not take",
        ns.name()
    );
}

/// `net.ipv4.ip_local_port_range` of the namespace, as `(low, high)`.
#[track_caller]
pub fn port_range(ns: &NetNs) -> (u16, u16) {
    let now = ns.exec(&["sysctl", "-n", "net.ipv4.ip_local_port_range"]);
    let v: Vec<u16> = now
        .split_whitespace()
        .map(|t| {
            t.parse()
                .unwrap_or_else(|e| panic!("ip_local_port_range {now:?}: {e}"))
        })
        .collect();
    match v[..] {
        [lo, hi] => (lo, hi),
        _ => panic!("ip_local_port_range {now:?}"),
    }
}

/// The name the kernel shows for the calling thread (`/proc/thread-self/comm`),
/// i.e. what a tracepoint's `bpf_get_current_comm` reads for this thread.
pub fn thread_comm() -> String {
    std::fs::read_to_string("/proc/thread-self/comm")
        .unwrap_or_else(|e| panic!("read /proc/thread-self/comm: {e}"))
        .trim_end_matches('\n')
        .to_string()
}

/// One absolute kernel counter of the namespace (`nstat -asz NAME`: absolute,
/// zeros included, history file left alone).
#[track_caller]
pub fn nstat(ns: &NetNs, counter: &str) -> u64 {
    let out = ns.exec(&["nstat", "-asz", counter]);
    for line in out.lines() {
        let mut toks = line.split_whitespace();
        if toks.next() == Some(counter) {
            let v = toks.next().unwrap_or("");
            return v
                .parse()
                .unwrap_or_else(|e| panic!("nstat {counter}: bad value {v:?}: {e}\n{out}"));
        }
    }
    panic!("nstat in {} does not show {counter}:\n{out}", ns.name());
}

/// Sockets in the namespace holding a local port inside `[lo, hi]` (every
/// state but LISTEN, TIME_WAIT included), grouped by destination. The daemon's
/// own HTTP port is left out (the harness's scrapes close with RST, so `ss`
/// normally shows none anyway).
pub fn ss_outbound_in_use(ns: &NetNs, lo: u16, hi: u16) -> BTreeMap<Dest, u64> {
    let text = ns.exec(&["ss", "-Htan", "state", "all"]);
    let kept: Vec<&str> = text
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with("LISTEN"))
        .collect();
    let mut out = BTreeMap::new();
    for s in parse_ss(&kept.join("\n")) {
        let lport = s.local.port();
        if (lo..=hi).contains(&lport) && s.peer.port() != WEB_PORT {
            *out.entry((label_ip(s.peer.ip()), s.peer.port()))
                .or_insert(0) += 1;
        }
    }
    out
}

/// `timewait_outbound_ports_in_use` by destination, zero series dropped and
/// the scraper's own connection (toward the daemon's HTTP port) left out.
#[track_caller]
pub fn metric_in_use(m: &Metrics) -> BTreeMap<Dest, u64> {
    let mut out = BTreeMap::new();
    for (labels, v) in m.series("timewait_outbound_ports_in_use") {
        let remote = labels
            .get("remote")
            .unwrap_or_else(|| panic!("ports_in_use series {labels:?} has no remote label"))
            .clone();
        let port: u16 = labels
            .get("port")
            .unwrap_or_else(|| panic!("ports_in_use series {labels:?} has no port label"))
            .parse()
            .unwrap_or_else(|e| panic!("ports_in_use series {labels:?}: port: {e}"));
        if port == WEB_PORT {
            continue;
        }
        if !(v >= 0.0 && v.fract() == 0.0) {
            panic!("timewait_outbound_ports_in_use{labels:?} = {v} is not a whole count");
        }
        if v == 0.0 {
            continue;
        }
        if out.insert((remote, port), v as u64).is_some() {
            panic!("timewait_outbound_ports_in_use: two series for {labels:?}");
        }
    }
    out
}

/// The one `timewait_port_exhaustion_ratio` series of a destination.
#[track_caller]
pub fn exhaustion_ratio(m: &Metrics, remote: &str, port: u16) -> f64 {
    let p = port.to_string();
    m.get(
        "timewait_port_exhaustion_ratio",
        &[("remote", remote), ("port", p.as_str())],
    )
    .unwrap_or_else(|| {
        panic!(
            "no timewait_port_exhaustion_ratio{{remote=\"{remote}\",port=\"{port}\"}}; \
             series: {:?}",
            m.series("timewait_port_exhaustion_ratio")
        )
    })
}

/// A gauge without labels that must be present.
#[track_caller]
pub fn gauge(m: &Metrics, name: &str) -> f64 {
    m.get(name, &[])
        .unwrap_or_else(|| panic!("{name} is missing from /metrics"))
}

/// `timewait_connect_errors_total{errno, comm}`, 0 while the series is absent.
#[track_caller]
pub fn connect_errors(m: &Metrics, errno: &str, comm: &str) -> u64 {
    m.count(
        "timewait_connect_errors_total",
        &[("errno", errno), ("comm", comm)],
    )
}

/// Asserts two ratios are equal up to float formatting.
#[track_caller]
pub fn assert_ratio(what: &str, got: f64, want: f64) {
    let tol = 1e-12_f64.max(want.abs() * 1e-12);
    if (got - want).abs() > tol {
        panic!(
            "{what}: got {got:?}, want {want:?} (difference {:e})",
            got - want
        );
    }
}

/// `127.0.0.1:port`.
pub fn lo4(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// The server closes first, once per client port in `ports`: each client
/// socket is bound to `from:port` explicitly, so every connection has its own
/// 4-tuple. (A kernel-chosen port, even with `IP_BIND_ADDRESS_NO_PORT`, comes
/// back after a few thousand connections; its SYN then meets its own
/// TIME_WAIT, which the kernel kills to accept it, and the count falls short.)
/// Leaves one inbound TIME_WAIT per port on the server side. Call inside the
/// namespace (`NetNs::run`); then `NetNs::wait_settled`.
#[track_caller]
pub fn server_closes_first_from_ports(
    listener: &TcpListener,
    from: Ipv4Addr,
    ports: RangeInclusive<u16>,
) {
    let to = listener.local_addr().expect("listener address");
    for port in ports {
        let client = connect_from_port(SocketAddr::new(from.into(), port), to)
            .unwrap_or_else(|e| panic!("{from}:{port} -> {to}: {e}"));
        let (server, _) = listener.accept().expect("accept");
        drop(server);
        wait_eof(&client);
        drop(client);
    }
}

/// One line of the daemon's minisocket bookkeeping beside the kernel's own
/// counters, printed with every check so a failing test shows both sides.
pub fn diag(ns: &NetNs, m: &Metrics) -> String {
    let closed: Vec<String> = m
        .series("timewait_closed_total")
        .into_iter()
        .filter(|(_, v)| *v != 0.0)
        .map(|(l, v)| format!("{}={v}", l.get("reason").map_or("?", String::as_str)))
        .collect();
    let segments: Vec<String> = m
        .series("timewait_segments_total")
        .into_iter()
        .filter(|(_, v)| *v != 0.0)
        .map(|(l, v)| format!("{}={v}", l.get("kind").map_or("?", String::as_str)))
        .collect();
    let kernel: Vec<String> = [
        "TcpExtTW",
        "TcpExtTWKilled",
        "TcpExtTWRecycled",
        "TcpExtPAWSTimewait",
        "TcpExtTCPTimeWaitOverflow",
    ]
    .iter()
    .map(|c| format!("{c}={}", nstat(ns, c)))
    .collect();
    format!(
        "daemon: timewait_sockets={} fin_wait2_orphans={} created={} closed[{}] segments[{}] \
         lost={} snapshot={} | kernel: ss time-wait={} {}",
        m.sum("timewait_sockets", &[]) + 0.0,
        m.sum("timewait_fin_wait2_orphans", &[]) + 0.0,
        m.sum("timewait_created_total", &[]) + 0.0,
        closed.join(" "),
        segments.join(" "),
        m.sum("timewait_events_lost_total", &[]) + 0.0,
        m.sum("timewait_snapshot_sockets_total", &[]) + 0.0,
        ns.ss_tw_total(),
        kernel.join(" ")
    )
}
