//! Issue 27: the balancer's side. The daemon runs on a router namespace that
//! masquerades clients onto a small port range; what it shows per (NAT
//! address, destination, protocol) must equal `conntrack -L` in the router
//! at a quiet moment, its ratios must use the range the kernel's ruleset
//! gives, and conntrack's stats must equal `/proc/net/stat/nf_conntrack`.
//! Topology and oracle: `support/nat/router.rs`.

use std::io::{Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream, UdpSocket};
use std::time::Duration;

use crate::support::nat::{
    CLIENT, NAT_ADDRESS, Nat, Router, conntrack_l, conntrack_stat, from_metrics, have, oracle, udp_send,
};
use crate::support::{Daemon, Metrics, daemon_bin, quiet_equal, require_root, scaled, wait_until};

const DAEMON_ARGS: &[&str] = &["--nat", "on", "--nat-interval", "1"];

fn tools_present(test: &str) -> bool {
    for (cmd, pkg) in [("iptables", "iptables"), ("nft", "nftables"), ("conntrack", "conntrack")] {
        assert!(have(cmd), "{test} needs `{cmd}` (Debian package {pkg}; `cargo xtask test` installs it)");
    }
    true
}

#[track_caller]
fn assert_exact(what: &str, lab: &Router, daemon: &Daemon, nat: &[Ipv4Addr]) -> std::collections::BTreeMap<crate::support::nat::NatKey, (u64, u64)> {
    quiet_equal(what, || oracle(&conntrack_l(&lab.r), nat), || from_metrics(&daemon.scrape(), nat))
}

fn ratio(m: &Metrics, nat: &str, remote: &str, port: &str, protocol: &str) -> Option<f64> {
    m.get(
        "timewait_nat_port_exhaustion_ratio",
        &[("nat_address", nat), ("remote", remote), ("port", port), ("protocol", protocol)],
    )
}

fn path(m: &Metrics, signal: &str) -> Option<String> {
    m.series("timewait_probe_path").into_iter().find(|(l, _)| l.get("signal").map(String::as_str) == Some(signal)).and_then(|(l, _)| l.get("path").cloned())
}

/// UDP, more flows than ports: 9 client sockets toward one destination
/// through 8 NAT ports. The router keeps 8 entries (`conntrack -L`), the
/// ninth datagram is dropped (insert_failed +1, the server gets 8); the
/// daemon shows exactly the 8, ratio 1 of the 8-port range it read from
/// the ruleset, and conntrack's stats as the kernel has them.
#[test]
fn nat_udp_more_flows_than_ports() {
    if !require_root("nat_udp_more_flows_than_ports") || !tools_present("nat_udp_more_flows_than_ports") {
        return;
    }
    let lab = Router::new(Nat::IptablesMasquerade { protocols: &["udp", "tcp"], ports: "40000-40007" }, 1);
    let server = Router::server(5000);
    let sock: UdpSocket = lab.s.run(|| UdpSocket::bind(SocketAddr::V4(server))).expect("bind the UDP server");
    sock.set_read_timeout(Some(Duration::from_millis(500))).expect("read timeout");
    let daemon = Daemon::start(&lab.r, DAEMON_ARGS);
    let failed_before = conntrack_stat(&lab.r, "insert_failed");
    for _ in 0..9 {
        udp_send(&lab.c, CLIENT, server);
    }
    let mut received = 0;
    let mut buf = [0u8; 16];
    while sock.recv_from(&mut buf).is_ok() {
        received += 1;
    }
    let failed = conntrack_stat(&lab.r, "insert_failed") - failed_before;
    eprintln!("nat_udp: server received {received} of 9, insert_failed +{failed}");
    assert_eq!(received, 8, "8 NAT ports: 8 datagrams through");
    assert_eq!(failed, 1, "the ninth datagram found no port");

    let agreed = assert_exact("udp ports in use", &lab, &daemon, &[NAT_ADDRESS]);
    let key = (NAT_ADDRESS.to_string(), server.ip().to_string(), "5000".to_string(), "udp".to_string());
    assert_eq!(agreed.get(&key), Some(&(8, 0)), "{agreed:?}");
    let m = daemon.scrape();
    assert_eq!(ratio(&m, &key.0, &key.1, "5000", "udp"), Some(1.0));
    assert_eq!(path(&m, "nat_port_range").as_deref(), Some("nftables"), "the ruleset was read");
    let size = m.get("timewait_nat_port_range_size", &[("nat_address", &key.0), ("protocol", "udp")]);
    assert_eq!(size, Some(8.0), "the range comes from the iptables-nft rule");
    assert!(m.series("timewait_nat_port_range_size").iter().any(|(l, _)| l.get("source").map(String::as_str) == Some("nftables")));
    assert_eq!(path(&m, "nat_ports").as_deref(), Some("ctnetlink"));
    assert_eq!(path(&m, "conntrack_stats").as_deref(), Some("procfs"));
    let shown = m.get("timewait_conntrack_stat_total", &[("stat", "insert_failed")]).expect("insert_failed shown");
    assert_eq!(shown as u64, conntrack_stat(&lab.r, "insert_failed"));
    // The router's table also holds the scrapes' own loopback connections,
    // made and closed around each read: those churn between the daemon's
    // read of the count and this one.
    let shown = m.get("timewait_conntrack_entries", &[]).expect("conntrack entries shown") as usize;
    let lines = conntrack_l(&lab.r);
    let not_loopback = lines.iter().filter(|l| !l.reply_src.is_loopback()).count();
    eprintln!("nat_udp: timewait_conntrack_entries {shown}; conntrack -L {} ({not_loopback} not loopback)", lines.len());
    assert!(shown >= not_loopback && shown <= lines.len() + 50, "entries {shown}: conntrack -L {} ({not_loopback} not loopback)", lines.len());
    assert!(m.get("timewait_conntrack_limit", &[]).is_some_and(|l| l > 0.0));
    daemon.stop();
}

/// One connection through the NAT that the server closes first; the client
/// reads to EOF and closes, so conntrack moves to TIME_WAIT (120 s).
fn server_closed_connection(lab: &Router, from: Ipv4Addr, server: SocketAddrV4, timeout: Duration) -> std::io::Result<()> {
    lab.c.run(|| {
        let mut s = connect_from(from, server, timeout)?;
        s.set_read_timeout(Some(timeout))?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf)?;
        Ok(())
    })
}

/// connect() from `from` (any port) to `to`, given up after `timeout`
/// (SO_SNDTIMEO bounds a blocking connect).
fn connect_from(from: Ipv4Addr, to: SocketAddrV4, timeout: Duration) -> std::io::Result<TcpStream> {
    use std::os::fd::FromRawFd as _;
    let sin = |a: Ipv4Addr, port: u16| libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr { s_addr: u32::from(a).to_be() },
        sin_zero: [0; 8],
    };
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: a new descriptor, owned by the TcpStream at once (closed on every path).
    let stream = unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        TcpStream::from_raw_fd(fd)
    };
    use std::os::fd::AsRawFd as _;
    let fd = stream.as_raw_fd();
    let (local, remote) = (sin(from, 0), sin(*to.ip(), to.port()));
    let tv = libc::timeval { tv_sec: timeout.as_secs() as libc::time_t, tv_usec: 0 };
    // SAFETY: valid addresses and option value for a descriptor the stream owns.
    unsafe {
        if libc::bind(fd, (&raw const local).cast(), len) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_SNDTIMEO,
            (&raw const tv).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        );
        if libc::connect(fd, (&raw const remote).cast(), len) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(stream)
}

/// A server in s that answers every connection with a line and closes first.
fn closing_server(lab: &Router, port: u16) -> std::net::SocketAddrV4 {
    let addr = Router::server(port);
    let listener = lab.s.listen(SocketAddr::V4(addr));
    std::thread::spawn(move || {
        for mut conn in listener.incoming().flatten() {
            let _ = conn.write_all(b"bye\n");
        }
    });
    addr
}

/// A server in s that keeps every connection open (until the test ends).
fn holding_server(lab: &Router, port: u16) -> std::net::SocketAddrV4 {
    let addr = Router::server(port);
    let listener = lab.s.listen(SocketAddr::V4(addr));
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for conn in listener.incoming().flatten() {
            held.push(conn);
        }
    });
    addr
}

/// TCP: 8 connections the server closes first fill the router's 8 ports
/// with conntrack TIME_WAIT (before 6.5; from 6.5 later connections may
/// evict earlier TIME_WAIT entries, the test prints how many remain); the
/// daemon shows them exactly (in use and TIME_WAIT). Then a ninth
/// connection: where all 8 are held it finds no port, or the kernel evicts
/// one for it; the test says which happened, and the daemon is exact
/// against `conntrack -L` again.
#[test]
fn nat_tcp_time_wait_exact() {
    if !require_root("nat_tcp_time_wait_exact") || !tools_present("nat_tcp_time_wait_exact") {
        return;
    }
    let lab = Router::new(Nat::IptablesMasquerade { protocols: &["tcp"], ports: "40000-40007" }, 1);
    let server = closing_server(&lab, 80);
    let daemon = Daemon::start(&lab.r, DAEMON_ARGS);
    for i in 0..8 {
        server_closed_connection(&lab, CLIENT, server, scaled(Duration::from_secs(5)))
            .unwrap_or_else(|e| panic!("connection {i} of 8 through 8 free ports: {e}"));
    }
    let key = (NAT_ADDRESS.to_string(), server.ip().to_string(), "80".to_string(), "tcp".to_string());
    // Before 6.5 the 8 ports now hold 8 TIME_WAIT entries; from 6.5 a new
    // connection may evict a TIME_WAIT entry on a port it tries even while
    // another is free (nf_nat_used_tuple_harder), so there may be fewer.
    wait_until(Duration::from_secs(10), "every conntrack entry toward the server in TIME_WAIT", || {
        oracle(&conntrack_l(&lab.r), &[NAT_ADDRESS]).get(&key).is_some_and(|(n, tw)| n == tw)
    });
    let agreed = assert_exact("tcp TIME_WAIT through the NAT", &lab, &daemon, &[NAT_ADDRESS]);
    let (n, tw) = agreed.get(&key).copied().unwrap_or_default();
    eprintln!("nat_tcp: {n} of the 8 connections hold a port in conntrack TIME_WAIT ({} evicted by later ones)", 8 - n);
    assert!(n >= 1 && n == tw, "{agreed:?}");
    assert_eq!(ratio(&daemon.scrape(), &key.0, &key.1, "80", "tcp"), Some(n as f64 / 8.0));
    // Quiet now: once two dumps saw the same entries, nothing is heading
    // toward exhaustion (+Inf), unless the range is already full (0).
    let labels = [("nat_address", key.0.as_str()), ("remote", key.1.as_str()), ("port", "80"), ("protocol", "tcp")];
    let mut secs = None;
    wait_until(Duration::from_secs(10), "timewait_nat_port_exhaustion_seconds after two quiet dumps", || {
        secs = daemon.scrape().get("timewait_nat_port_exhaustion_seconds", &labels);
        secs.is_some_and(|s| s == f64::INFINITY || s == 0.0)
    });
    assert_eq!(secs, Some(if n == 8 { 0.0 } else { f64::INFINITY }));

    let failed_before = conntrack_stat(&lab.r, "insert_failed");
    let ninth = server_closed_connection(&lab, CLIENT, server, scaled(Duration::from_secs(3)));
    let failed = conntrack_stat(&lab.r, "insert_failed") - failed_before;
    match &ninth {
        Ok(()) => eprintln!("nat_tcp: the ninth connection went through: the kernel evicted a TIME_WAIT entry (6.5+); insert_failed +{failed}"),
        Err(e) => eprintln!("nat_tcp: the ninth connection found no port ({e}); insert_failed +{failed}"),
    }
    if ninth.is_err() {
        assert!(failed >= 1, "a connection that found no port moved insert_failed");
    }
    let agreed = assert_exact("tcp after the ninth connection", &lab, &daemon, &[NAT_ADDRESS]);
    assert!(agreed.get(&key).is_some_and(|(n, _)| *n <= 8), "at most 8 ports: {agreed:?}");
    daemon.stop();
}

/// Native nftables: `masquerade to :41000-41003` gives a 4-port range; an
/// SNAT pool of two addresses (`snat ip to A-B:40000-40007`) keeps each
/// client pinned to one address, and each address has its own series and
/// its own 8-port range.
#[test]
fn nat_nft_ranges_and_pool() {
    if !require_root("nat_nft_ranges_and_pool") || !tools_present("nat_nft_ranges_and_pool") {
        return;
    }
    let lab = Router::new(Nat::NftMasquerade { ports: "41000-41003" }, 1);
    let daemon = Daemon::start(&lab.r, DAEMON_ARGS);
    let server = Router::server(7000);
    let _sock = lab.s.run(|| UdpSocket::bind(SocketAddr::V4(server))).expect("bind");
    for _ in 0..2 {
        udp_send(&lab.c, CLIENT, server);
    }
    let agreed = assert_exact("nft masquerade", &lab, &daemon, &[NAT_ADDRESS]);
    assert_eq!(agreed.values().map(|v| v.0).sum::<u64>(), 2);
    let m = daemon.scrape();
    assert_eq!(ratio(&m, &NAT_ADDRESS.to_string(), &server.ip().to_string(), "7000", "udp"), Some(0.5), "2 of 4 ports");
    assert_eq!(path(&m, "nat_port_range").as_deref(), Some("nftables"));
    daemon.stop();
    drop(lab);

    let (first, last) = (Ipv4Addr::new(10, 98, 3, 10), Ipv4Addr::new(10, 98, 3, 11));
    let lab = Router::new(Nat::NftSnatPool { first, last, ports: "40000-40007" }, 4);
    let daemon = Daemon::start(&lab.r, DAEMON_ARGS);
    let servers = [Router::server(7001), Router::server(7002)];
    let _socks: Vec<UdpSocket> = servers.iter().map(|s| lab.s.run(|| UdpSocket::bind(SocketAddr::V4(*s))).expect("bind")).collect();
    for i in 0..4 {
        for s in servers {
            udp_send(&lab.c, Router::client(i), s);
        }
    }
    let agreed = assert_exact("snat pool", &lab, &daemon, &[first, last]);
    assert_eq!(agreed.values().map(|v| v.0).sum::<u64>(), 8, "every datagram found a port: {agreed:?}");
    let m = daemon.scrape();
    for ((nat, remote, port, proto), (n, _)) in &agreed {
        assert_eq!(ratio(&m, nat, remote, port, proto), Some(*n as f64 / 8.0), "per-address range of 8 for {nat}");
    }
    daemon.stop();
}

/// kill -9 and a restart while entries exist: the first scrape after
/// `/readyz` is exact (the start-up dump), no waiting.
#[test]
fn nat_restart_exact_at_once() {
    if !require_root("nat_restart_exact_at_once") || !tools_present("nat_restart_exact_at_once") {
        return;
    }
    let lab = Router::new(Nat::IptablesMasquerade { protocols: &["tcp"], ports: "40000-40015" }, 1);
    let server = holding_server(&lab, 81);
    let daemon = Daemon::start(&lab.r, DAEMON_ARGS);
    let held: Vec<TcpStream> = (0..6)
        .map(|_| lab.c.run(|| connect_from(CLIENT, server, scaled(Duration::from_secs(5)))).expect("connect through the NAT"))
        .collect();
    assert_exact("before the restart", &lab, &daemon, &[NAT_ADDRESS]);
    daemon.kill9();
    let daemon = Daemon::start(&lab.r, DAEMON_ARGS);
    let truth = oracle(&conntrack_l(&lab.r), &[NAT_ADDRESS]);
    let first = from_metrics(&daemon.scrape(), &[NAT_ADDRESS]);
    assert_eq!(first, truth, "the first scrape after a restart");
    assert_eq!(first.values().map(|v| v.0).sum::<u64>(), 6);
    drop(held);
    daemon.stop();
}

/// Without CAP_NET_ADMIN: `--nat on` is refused at start with one line;
/// `check` says what is missing and how to fix it. `--nat off`: no NAT
/// series, timewait_probe_path says `off`.
#[test]
fn nat_without_privilege_or_off() {
    if !require_root("nat_without_privilege_or_off") || !tools_present("nat_without_privilege_or_off") {
        return;
    }
    let out = std::process::Command::new("setpriv")
        .args(["--bounding-set", "-net_admin", "--"])
        .arg(daemon_bin())
        .args(["run", "--nat", "on", "--web.listen-address", "127.0.0.1:0"])
        .output()
        .expect("setpriv (util-linux) runs");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "exit code; stderr: {err}");
    assert_eq!(err.trim().lines().count(), 1, "one line, got: {err}");
    assert!(err.contains("CAP_NET_ADMIN"), "{err}");
    let out = std::process::Command::new("setpriv")
        .args(["--bounding-set", "-net_admin", "--"])
        .arg(daemon_bin())
        .args(["check"])
        .output()
        .expect("setpriv (util-linux) runs");
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().find(|l| l.starts_with("nat ")).unwrap_or_else(|| panic!("a nat line in check:\n{text}"));
    assert!(line.contains("partial") && line.contains("CAP_NET_ADMIN missing") && line.contains("nat.conf"), "{line}");

    let lab = Router::new(Nat::IptablesMasquerade { protocols: &["udp"], ports: "40000-40007" }, 1);
    let daemon = Daemon::start(&lab.r, &["--nat", "off"]);
    udp_send(&lab.c, CLIENT, Router::server(5000));
    let m = daemon.scrape();
    assert!(m.series("timewait_nat_ports_in_use").is_empty());
    assert!(m.series("timewait_conntrack_entries").is_empty());
    assert_eq!(path(&m, "nat_ports").as_deref(), Some("off"));
    daemon.stop();
}

/// `--all-netns`: two routers with the same NAT address in two namespaces;
/// the `netns` label keeps them apart, each exact against its own
/// `conntrack -L`.
#[test]
fn nat_all_netns_keeps_routers_apart() {
    if !require_root("nat_all_netns_keeps_routers_apart") || !tools_present("nat_all_netns_keeps_routers_apart") {
        return;
    }
    use std::os::unix::fs::MetadataExt as _;
    let a = Router::new(Nat::IptablesMasquerade { protocols: &["udp"], ports: "40000-40007" }, 1);
    let b = Router::new(Nat::IptablesMasquerade { protocols: &["udp"], ports: "40000-40007" }, 1);
    let server = Router::server(5000);
    let _sa = a.s.run(|| UdpSocket::bind(SocketAddr::V4(server))).expect("bind");
    let _sb = b.s.run(|| UdpSocket::bind(SocketAddr::V4(server))).expect("bind");
    let daemon = Daemon::start(&a.r, &["--nat", "on", "--nat-interval", "1", "--all-netns"]);
    for _ in 0..3 {
        udp_send(&a.c, CLIENT, server);
    }
    for _ in 0..5 {
        udp_send(&b.c, CLIENT, server);
    }
    let inode = |lab: &Router| std::fs::metadata(lab.r.path()).expect("stat the namespace").ino().to_string();
    let (ia, ib) = (inode(&a), inode(&b));
    let per_ns = |m: &Metrics, ns: &str| -> u64 {
        m.series("timewait_nat_ports_in_use")
            .iter()
            .filter(|(l, _)| l.get("netns").map(String::as_str) == Some(ns) && l.get("nat_address").map(String::as_str) == Some("10.98.3.1"))
            .map(|(_, v)| *v as u64)
            .sum()
    };
    let count = |lab: &Router| oracle(&conntrack_l(&lab.r), &[NAT_ADDRESS]).values().map(|v| v.0).sum::<u64>();
    let agreed = quiet_equal("two routers by netns", || (count(&a), count(&b)), || {
        let m = daemon.scrape();
        (per_ns(&m, &ia), per_ns(&m, &ib))
    });
    assert_eq!(agreed, (3, 5));
    daemon.stop();
}
