//! Issue 27: packets NAT found no free source port for, counted per destination (`--nat`, `nat_kfree_skb`).
//!
//! Topology (namespaces this test creates, nothing routed out of them):
//!
//! ```text
//!  c 10.97.1.2 ── r (10.97.1.1 | 10.97.3.1 = NAT address) ── s 10.97.3.2
//!                  ip_forward=1, MASQUERADE --to-ports 40000-40007 (udp, tcp), timewaitd --nat on
//! ```
//!
//! Ground truth: conntrack's own per-CPU `insert_failed` in r
//! (`/proc/net/stat/nf_conntrack`, hex, summed by header), `conntrack -L`
//! in r, and what the server received.
//! - UDP: 9 client ports send one datagram each to s:5000 through 8 NAT
//!   ports: 8 entries, 8 received, `insert_failed` +1, and
//!   `timewait_nat_allocation_failures_total{nat_address=10.97.3.1,
//!   remote=10.97.3.2,port=5000,protocol=udp}` exactly 1.
//! - A FORWARD DROP (before NAT) of datagrams to s:6000 is not counted.
//! - TCP: 8 connections held ESTABLISHED through the 8 ports (the 6.5+
//!   eviction of conntrack TIME_WAIT never takes a held port), then one
//!   more connect() with a short timeout: every SYN it sends is dropped at
//!   confirm; the failures of (10.97.3.1, 10.97.3.2, 83, tcp) equal the
//!   `insert_failed` delta, and nothing goes unattributed.
//!
//! 5.10's `kfree_skb` has no `reason`: there the daemon must say
//! `timewait_probe_path{signal="nat_failures",path="unavailable"}` and
//! export no failure series (the UDP part still checks the kernel's side).

use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::thread;
use std::time::{Duration, Instant};

use crate::support::nat::{have, iptables_usable, route, veth};
use crate::support::{Daemon, Metrics, NetNs, require_root, scaled, test_kernel, wait_until};

const FAILURES: &str = "timewait_nat_allocation_failures_total";
const UNATTRIBUTED: &str = "timewait_nat_allocation_failures_unattributed_total";
const NAT: &str = "10.97.3.1";
const SERVER: &str = "10.97.3.2";

/// The path this kernel must report: the tracepoint from 5.18 (the drop
/// reason), unavailable on 5.10.
fn expected_path() -> &'static str {
    if test_kernel() == "5.10" { "unavailable" } else { "tracepoint" }
}

/// Sum of conntrack's `insert_failed` over the CPUs of `ns`.
#[track_caller]
fn insert_failed(ns: &NetNs) -> u64 {
    let text = ns.exec(&["cat", "/proc/net/stat/nf_conntrack"]);
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap_or_default().split_whitespace().collect();
    let col = header
        .iter()
        .position(|h| *h == "insert_failed")
        .unwrap_or_else(|| panic!("no insert_failed column in /proc/net/stat/nf_conntrack:\n{text}"));
    lines
        .filter_map(|l| l.split_whitespace().nth(col))
        .map(|v| u64::from_str_radix(v, 16).unwrap_or_else(|e| panic!("insert_failed {v:?}: {e}")))
        .sum()
}

/// Lines of `conntrack -L` in `ns` for `proto` with original destination port `dport`.
#[track_caller]
fn conntrack_entries(ns: &NetNs, proto: &str, dport: u16) -> Vec<String> {
    let out = ns.exec(&["conntrack", "-L", "-p", proto, "--dport", &dport.to_string()]);
    out.lines().filter(|l| l.starts_with(proto)).map(str::to_string).collect()
}

fn failures(m: &Metrics, port: &str, protocol: &str) -> Option<f64> {
    m.get(FAILURES, &[("nat_address", NAT), ("remote", SERVER), ("port", port), ("protocol", protocol)])
}

/// Datagrams `sock` receives until none comes for a second.
fn received(sock: &UdpSocket) -> usize {
    sock.set_read_timeout(Some(scaled(Duration::from_secs(1)))).expect("read timeout");
    let mut buf = [0u8; 64];
    let mut n = 0;
    while sock.recv_from(&mut buf).is_ok() {
        n += 1;
    }
    n
}

/// One datagram from each of `n` fresh client sockets (distinct ports) to `to`.
fn send_from_ports(c: &NetNs, n: usize, to: SocketAddr) {
    c.run(move || {
        let socks: Vec<UdpSocket> = (0..n).map(|_| UdpSocket::bind("10.97.1.2:0").expect("bind client")).collect();
        for s in &socks {
            s.send_to(b"x", to).expect("send");
        }
    });
}

#[test]
fn nat_failures() {
    if !require_root("nat_failures") {
        return;
    }
    for (cmd, pkg) in [("iptables", "iptables"), ("conntrack", "conntrack")] {
        assert!(have(cmd), "nat_failures needs `{cmd}` (Debian package {pkg}; `cargo xtask setup` installs it)");
    }
    let c = NetNs::new();
    let r = NetNs::new();
    let s = NetNs::new();
    veth(&c, "eth0", "10.97.1.2/24", &r, "to-c", "10.97.1.1/24");
    veth(&r, "to-s", "10.97.3.1/24", &s, "eth0", "10.97.3.2/24");
    route(&c, "10.97.3.0/24", "10.97.1.1");
    r.sysctl("net.ipv4.ip_forward", "1");
    let flavour = iptables_usable(&r).unwrap_or_else(|e| panic!("iptables inside a namespace: {e}"));
    for proto in ["udp", "tcp"] {
        r.exec(&[
            "iptables", "-t", "nat", "-A", "POSTROUTING", "-o", "to-s", "-p", proto, "-j", "MASQUERADE", "--to-ports", "40000-40007",
        ]);
    }
    r.exec(&["iptables", "-A", "FORWARD", "-p", "udp", "--dport", "6000", "-j", "DROP"]);
    eprintln!("nat_failures: {flavour}, kernel {}", test_kernel());

    let daemon = Daemon::start(&r, &["--nat", "on"]);
    let m = daemon.scrape();
    let paths: Vec<String> = m
        .series("timewait_probe_path")
        .into_iter()
        .filter(|(l, v)| *v == 1.0 && l.get("signal").map(String::as_str) == Some("nat_failures"))
        .filter_map(|(l, _)| l.get("path").cloned())
        .collect();
    assert_eq!(paths, vec![expected_path().to_string()], "kernel {}: nat_failures path\n{}", test_kernel(), daemon.log_tail());
    let served = expected_path() == "tracepoint";
    // Segments and NAT failures may share tp_btf/kfree_skb: still one series per hook.
    let hooks: Vec<String> = m.series("timewait_probe_attached").into_iter().filter_map(|(l, _)| l.get("hook").cloned()).collect();
    let unique: std::collections::BTreeSet<&String> = hooks.iter().collect();
    assert_eq!(unique.len(), hooks.len(), "duplicate timewait_probe_attached series: {hooks:?}");

    // --- UDP: 9 flows, 8 ports ------------------------------------------------
    let server = s.run(|| UdpSocket::bind((SERVER, 5000)).expect("bind server"));
    let before = insert_failed(&r);
    send_from_ports(&c, 9, format!("{SERVER}:5000").parse().unwrap());
    let got = received(&server);
    let udp_failed = insert_failed(&r) - before;
    let entries = conntrack_entries(&r, "udp", 5000);
    eprintln!("udp: server received {got}, insert_failed +{udp_failed}, {} conntrack entries", entries.len());
    assert_eq!((got, udp_failed, entries.len()), (8, 1, 8), "9 flows through 8 NAT ports:\n{}", entries.join("\n"));
    if !served {
        let m = daemon.scrape();
        assert!(m.series(FAILURES).is_empty() && m.series(UNATTRIBUTED).is_empty(), "no NAT failure series where unavailable");
        let log = std::fs::read_to_string(&daemon.log).unwrap_or_default();
        let why = log.lines().find(|l| l.contains("NAT allocation failures")).unwrap_or("(no line in the log)");
        eprintln!("nat_failures: unavailable on kernel {} as expected; kernel side checked; daemon: {why}", test_kernel());
        return;
    }
    wait_until(Duration::from_secs(10), "the UDP failure counted", || failures(&daemon.scrape(), "5000", "udp").is_some());
    let m = daemon.scrape();
    assert_eq!(failures(&m, "5000", "udp"), Some(1.0), "udp failures\n{:?}", m.series(FAILURES));
    assert_eq!(m.sum(FAILURES, &[]), 1.0, "only that destination: {:?}", m.series(FAILURES));
    assert_eq!(m.get(UNATTRIBUTED, &[]), Some(0.0));

    // --- a rule's DROP before NAT is not a NAT failure -----------------------
    let before = insert_failed(&r);
    send_from_ports(&c, 3, format!("{SERVER}:6000").parse().unwrap());
    let dropped = r.exec(&["iptables", "-L", "FORWARD", "-v", "-x", "-n"]);
    thread::sleep(scaled(Duration::from_millis(500)));
    let m = daemon.scrape();
    assert_eq!(insert_failed(&r), before, "a FORWARD DROP is no insert failure");
    assert_eq!(failures(&m, "6000", "udp"), None, "FORWARD DROP counted as a NAT failure:\n{dropped}");
    assert_eq!(m.sum(FAILURES, &[]), 1.0, "{:?}", m.series(FAILURES));
    assert!(dropped.lines().any(|l| l.contains("DROP") && !l.trim_start().starts_with('0')), "the rule dropped them:\n{dropped}");

    // --- TCP: 8 held connections, then one that finds no port ----------------
    // Never accepted: the kernel completes the handshakes into the backlog,
    // the connections stay ESTABLISHED (held ports, never evicted).
    let listener = s.run(|| TcpListener::bind((SERVER, 83)).expect("listen"));
    let to: SocketAddr = format!("{SERVER}:83").parse().unwrap();
    let held: Vec<TcpStream> = c.run(move || {
        (0..8).map(|i| TcpStream::connect_timeout(&to, scaled(Duration::from_secs(5))).unwrap_or_else(|e| panic!("connection {i}: {e}"))).collect()
    });
    wait_until(Duration::from_secs(10), "8 ESTABLISHED entries in r", || {
        conntrack_entries(&r, "tcp", 83).iter().filter(|l| l.contains("ESTABLISHED")).count() == 8
    });
    let before = insert_failed(&r);
    let before_metric = daemon.scrape().sum(FAILURES, &[]);
    let t = Instant::now();
    let ninth = c.run(move || TcpStream::connect_timeout(&to, Duration::from_secs(3)));
    assert!(ninth.is_err(), "a 9th connection through 8 held NAT ports got through: {ninth:?}");
    eprintln!("tcp: 9th connect failed after {:?}: {:?}", t.elapsed(), ninth.err());
    // Its last SYN may still be on its way through r.
    thread::sleep(scaled(Duration::from_secs(1)));
    let (delta, m) = {
        let mut last = None;
        let start = Instant::now();
        loop {
            let a = insert_failed(&r);
            let m = daemon.scrape();
            let b = insert_failed(&r);
            if a == b && failures(&m, "83", "tcp") == Some((a - before) as f64) {
                break (a - before, m);
            }
            if start.elapsed() >= scaled(Duration::from_secs(10)) {
                panic!("tcp: insert_failed +{} vs metric {:?} (last {last:?})", b - before, failures(&m, "83", "tcp"));
            }
            last = Some((a, b, failures(&m, "83", "tcp")));
            thread::sleep(Duration::from_millis(200));
        }
    };
    eprintln!("tcp: insert_failed +{delta} = timewait_nat_allocation_failures_total{{remote={SERVER},port=83,protocol=tcp}}");
    assert!(delta >= 1, "the 9th connect's SYNs were dropped at confirm");
    assert_eq!(m.sum(FAILURES, &[]) - before_metric, delta as f64, "all attributed to that destination: {:?}", m.series(FAILURES));
    assert_eq!(m.get(UNATTRIBUTED, &[]), Some(0.0));
    drop(held);
    drop(listener);
    daemon.stop();
}

/// The IPv6 header path of `nat_kfree_skb`: 9 UDP flows through 8 NAT
/// ports of an `ip6tables` MASQUERADE, one failure for the destination.
#[test]
fn nat_failures_ipv6() {
    if !require_root("nat_failures_ipv6") {
        return;
    }
    for (cmd, pkg) in [("ip6tables", "iptables"), ("conntrack", "conntrack")] {
        assert!(have(cmd), "nat_failures_ipv6 needs `{cmd}` (Debian package {pkg}; `cargo xtask setup` installs it)");
    }
    let (nat, server_ip) = ("fd97:3::1", "fd97:3::2");
    let c = NetNs::new();
    let r = NetNs::new();
    let s = NetNs::new();
    veth(&c, "eth0", "10.97.1.2/24", &r, "to-c", "10.97.1.1/24");
    veth(&r, "to-s", "10.97.3.1/24", &s, "eth0", "10.97.3.2/24");
    // nodad: usable at once, no duplicate-address detection wait.
    for (ns, ifname, addr) in [(&c, "eth0", "fd97:1::2/64"), (&r, "to-c", "fd97:1::1/64"), (&r, "to-s", "fd97:3::1/64"), (&s, "eth0", "fd97:3::2/64")] {
        ns.exec(&["ip", "-6", "addr", "add", addr, "dev", ifname, "nodad"]);
    }
    route(&c, "fd97:3::/64", "fd97:1::1");
    r.sysctl("net.ipv6.conf.all.forwarding", "1");
    r.exec(&["ip6tables", "-t", "nat", "-A", "POSTROUTING", "-o", "to-s", "-p", "udp", "-j", "MASQUERADE", "--to-ports", "40000-40007"]);

    let daemon = Daemon::start(&r, &["--nat", "on"]);
    let server = s.run(move || UdpSocket::bind((server_ip, 5000)).expect("bind server"));
    let before = insert_failed(&r);
    let to: SocketAddr = format!("[{server_ip}]:5000").parse().unwrap();
    c.run(move || {
        let socks: Vec<UdpSocket> = (0..9).map(|_| UdpSocket::bind("[fd97:1::2]:0").expect("bind client")).collect();
        for s in &socks {
            s.send_to(b"x", to).expect("send");
        }
    });
    let got = received(&server);
    let failed = insert_failed(&r) - before;
    eprintln!("udp6: server received {got}, insert_failed +{failed}");
    assert_eq!((got, failed), (8, 1), "9 flows through 8 NAT ports");
    if expected_path() != "tracepoint" {
        assert!(daemon.scrape().series(FAILURES).is_empty(), "no NAT failure series where unavailable");
        return;
    }
    let get = |m: &Metrics| m.get(FAILURES, &[("nat_address", nat), ("remote", server_ip), ("port", "5000"), ("protocol", "udp")]);
    wait_until(Duration::from_secs(10), "the UDP/IPv6 failure counted", || get(&daemon.scrape()).is_some());
    let m = daemon.scrape();
    assert_eq!(get(&m), Some(1.0), "{:?}", m.series(FAILURES));
    assert_eq!((m.sum(FAILURES, &[]), m.get(UNATTRIBUTED, &[])), (1.0, Some(0.0)), "{:?}", m.series(FAILURES));
    daemon.stop();
}
