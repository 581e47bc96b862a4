//! Issue 4, test 3: one remote (a NAT load balancer) with 30,000 of its
//! source ports parked in our TIME_WAIT: `timewait_inbound_remote_port_ratio`.

use std::net::{Ipv4Addr, SocketAddr};
use std::ops::RangeInclusive;
use std::time::{Duration, Instant};

use crate::support::{Daemon, NetNs, quiet_equal, require_root, v4};
use crate::support::ports::{assert_ratio, diag, server_closes_first_from_ports, set_port_range};

const N: u64 = 30_000;
const REMOTE: &str = "127.0.0.9";
const PORT: u16 = 5000;
/// 30,000 distinct client ports, clear of the listener's and the daemon's.
const CLIENT_PORTS: RangeInclusive<u16> = 30000..=59999;
const DEFAULT_REMOTE_RANGE: f64 = 64512.0;
/// TIME_WAIT lasts 60 s: everything after the workload must be done before
/// the first of its sockets expires.
const TW_LIFETIME: Duration = Duration::from_secs(60);

/// 30,000 inbound TIME_WAIT from 127.0.0.9: the ratio is 30000/64512 with the
/// default `--remote-port-range-size`, and 1.0 with `--remote-port-range-size
/// 30000` (a second daemon, which finds them in its start-up snapshot).
#[test]
fn inbound_ratio_30000_from_one_remote() {
    if !require_root("inbound_ratio::inbound_ratio_30000_from_one_remote") {
        return;
    }
    let ns = NetNs::new();
    // The widest range, as on a host tuned for many connections (the
    // clients below bind their ports explicitly, one port each).
    set_port_range(&ns, 1024, 65535);
    // RFC 1337: a TIME_WAIT socket ignores RSTs. Under load a late duplicate
    // ACK can reach a client port that has just closed, whose RST would then
    // kill one of the 30,000 (seen once: both ss and the daemon at 29,999).
    ns.sysctl("net.ipv4.tcp_rfc1337", "1");
    let listener = ns.listen(SocketAddr::new(v4(127, 0, 0, 1), PORT));
    // 30,000 creations while other tests load both CPUs: the kernel may skip
    // a program run that an interrupt nested inside another (counted in
    // timewait_events_lost_total); reconciliation is what makes the count
    // exact again, so run it often here.
    let daemon = Daemon::start(&ns, &["--reconcile-interval", "1"]);

    let start = Instant::now();
    ns.run(|| server_closes_first_from_ports(&listener, Ipv4Addr::new(127, 0, 0, 9), CLIENT_PORTS));
    ns.wait_settled();
    let took = start.elapsed();
    eprintln!("{N} server-first closes from {REMOTE} in {took:?}");

    let ss_from_remote = || -> u64 {
        ns.ss("time-wait")
            .iter()
            .filter(|s| s.peer.ip() == v4(127, 0, 0, 9) && s.local.port() == PORT)
            .count() as u64
    };
    let inbound_from_remote = |d: &Daemon| -> u64 {
        d.scrape().count(
            "timewait_sockets",
            &[("direction", "inbound"), ("remote", REMOTE)],
        )
    };
    let check_alive = |what: &str| {
        assert!(
            start.elapsed() + Duration::from_secs(2) < TW_LIFETIME,
            "{what}: {:?} since the workload began; its first TIME_WAIT sockets are expiring, \
             so the counts below no longer mean 30,000 (workload took {took:?})",
            start.elapsed()
        );
    };

    eprintln!("after the workload: {}", diag(&ns, &daemon.scrape()));
    let n = quiet_equal(
        "inbound TIME_WAIT from 127.0.0.9: ss vs timewait_sockets",
        ss_from_remote,
        || inbound_from_remote(&daemon),
    );
    eprintln!("first daemon agreed: {}", diag(&ns, &daemon.scrape()));
    check_alive("first daemon");
    assert_eq!(
        n, N,
        "ss and the daemon agree on {n} TIME_WAIT from {REMOTE}, not {N}"
    );
    let m = daemon.scrape();
    let ratio = m
        .get("timewait_inbound_remote_port_ratio", &[("remote", REMOTE)])
        .unwrap_or_else(|| {
            panic!(
                "no timewait_inbound_remote_port_ratio{{remote=\"{REMOTE}\"}}; series: {:?}",
                m.series("timewait_inbound_remote_port_ratio")
            )
        });
    eprintln!("timewait_inbound_remote_port_ratio{{remote=\"{REMOTE}\"}} = {ratio}");
    assert_ratio(
        "inbound ratio with the default --remote-port-range-size",
        ratio,
        N as f64 / DEFAULT_REMOTE_RANGE,
    );
    daemon.stop();

    // Same sockets, a daemon told that one remote has 30,000 ports.
    let daemon = Daemon::start(&ns, &["--remote-port-range-size", "30000"]);
    eprintln!("second daemon ready: {}", diag(&ns, &daemon.scrape()));
    let n = quiet_equal(
        "inbound TIME_WAIT from 127.0.0.9 after restart: ss vs timewait_sockets",
        ss_from_remote,
        || inbound_from_remote(&daemon),
    );
    check_alive("second daemon");
    assert_eq!(
        n, N,
        "after the restart ss and the daemon agree on {n}, not {N}"
    );
    let m = daemon.scrape();
    let ratio = m
        .get("timewait_inbound_remote_port_ratio", &[("remote", REMOTE)])
        .unwrap_or_else(|| {
            panic!(
                "no timewait_inbound_remote_port_ratio{{remote=\"{REMOTE}\"}} with \
                 --remote-port-range-size 30000; series: {:?}",
                m.series("timewait_inbound_remote_port_ratio")
            )
        });
    eprintln!("with --remote-port-range-size 30000: ratio = {ratio}");
    assert_ratio(
        "inbound ratio with --remote-port-range-size 30000",
        ratio,
        1.0,
    );
    daemon.stop();
    drop(listener);
}
