//! Issue 4, test 1: outbound port exhaustion toward one destination, and the
//! `connect()` / `bind()` errors it causes.

use std::collections::BTreeMap;
use std::net::{SocketAddrV4, TcpStream};
use std::time::Duration;

use crate::support::{Daemon, NetNs, bound_socket, quiet_equal, require_root, v4, wait_until};
use crate::support::ports::{
    Dest, assert_ratio, connect_errors, exhaustion_ratio, gauge, lo4, metric_in_use,
    set_port_range, ss_outbound_in_use, thread_comm,
};

const LO: u16 = 40000;
const HI: u16 = 40099;
/// The destination whose ports run out (outside the ephemeral range, so the
/// listener itself takes none of the 100 ports).
const PORT_A: u16 = 5000;
/// A second destination port on the same address: TIME_WAIT toward it.
const PORT_B: u16 = 5001;
/// A third destination, another address: one connection kept open.
const PORT_C: u16 = 5002;

const COUNTER_WAIT: Duration = Duration::from_secs(10);

/// 100-port range, 100 client-first closes toward 127.0.0.1:5000: ports in use
/// 100, ratio 1.0; the next `connect()` fails with EADDRNOTAVAIL, counted
/// once under this thread's comm; other destinations get their own series.
#[test]
fn outbound_exhaustion_100_ports() {
    if !require_root("exhaustion::outbound_exhaustion_100_ports") {
        return;
    }
    let ns = NetNs::new();
    set_port_range(&ns, LO, HI);
    // Loopback TIME_WAIT reuse (the default 2) would let connect() take a
    // TIME_WAIT port after a second: the range must really run out.
    ns.sysctl("net.ipv4.tcp_tw_reuse", "0");
    let listener_a = ns.listen(lo4(PORT_A));
    let listener_b = ns.listen(lo4(PORT_B));
    let listener_c = ns.listen(std::net::SocketAddr::new(v4(127, 0, 0, 2), PORT_C));
    let daemon = Daemon::start(&ns, &[]);

    let m = daemon.scrape();
    assert_eq!(
        gauge(&m, "timewait_local_port_range_size"),
        100.0,
        "timewait_local_port_range_size for {LO}-{HI}"
    );

    ns.client_closes_first(&listener_a, None, 100);
    let a: Dest = ("127.0.0.1".into(), PORT_A);
    let expected: BTreeMap<Dest, u64> = [(a.clone(), 100)].into();
    let agreed = quiet_equal(
        "outbound ports in use after 100 client-first closes",
        || ss_outbound_in_use(&ns, LO, HI),
        || metric_in_use(&daemon.scrape()),
    );
    assert_eq!(
        agreed, expected,
        "ss and the daemon agree, but not on 100 toward {a:?}"
    );
    let m = daemon.scrape();
    assert_ratio(
        "timewait_port_exhaustion_ratio{127.0.0.1, 5000} with all 100 ports held",
        exhaustion_ratio(&m, "127.0.0.1", PORT_A),
        1.0,
    );

    // The next connect() toward the same destination finds no port.
    let before = daemon.scrape();
    let (comm, res) = ns.run(|| (thread_comm(), TcpStream::connect(lo4(PORT_A))));
    match res {
        Err(e) if e.raw_os_error() == Some(libc::EADDRNOTAVAIL) => {}
        Err(e) => {
            panic!("connect 127.0.0.1:{PORT_A} with the range exhausted: {e}, not EADDRNOTAVAIL")
        }
        Ok(s) => panic!(
            "connect 127.0.0.1:{PORT_A} succeeded from {:?} with all 100 ports in TIME_WAIT; ss: {:?}",
            s.local_addr(),
            ss_outbound_in_use(&ns, LO, HI)
        ),
    }
    let base = connect_errors(&before, "EADDRNOTAVAIL", &comm);
    eprintln!("EADDRNOTAVAIL from comm {comm:?}; counter before: {base}");
    let mut last = base;
    wait_until(
        COUNTER_WAIT,
        &format!(
            "timewait_connect_errors_total{{errno=\"EADDRNOTAVAIL\",comm=\"{comm}\"}} to rise from {base}"
        ),
        || {
            last = connect_errors(&daemon.scrape(), "EADDRNOTAVAIL", &comm);
            last > base
        },
    );
    assert_eq!(
        last,
        base + 1,
        "one failed connect() must count once (errno=EADDRNOTAVAIL, comm={comm:?}); all series: {:?}",
        daemon.scrape().series("timewait_connect_errors_total")
    );

    // Other destinations: same address, another port (the bound ports are
    // free for another 4-tuple), and another address with a connection kept
    // open (every state counts).
    ns.client_closes_first(&listener_b, None, 3);
    let kept = ns
        .run(|| TcpStream::connect((v4(127, 0, 0, 2), PORT_C)))
        .unwrap_or_else(|e| panic!("connect 127.0.0.2:{PORT_C}: {e}"));
    let (server_c, _) = listener_c.accept().expect("accept 127.0.0.2:5002");
    let b: Dest = ("127.0.0.1".into(), PORT_B);
    let c: Dest = ("127.0.0.2".into(), PORT_C);
    let expected: BTreeMap<Dest, u64> = [(a.clone(), 100), (b, 3), (c, 1)].into();
    let agreed = quiet_equal(
        "outbound ports in use per destination",
        || ss_outbound_in_use(&ns, LO, HI),
        || metric_in_use(&daemon.scrape()),
    );
    assert_eq!(agreed, expected, "separate series per destination");
    let m = daemon.scrape();
    assert_ratio(
        "ratio toward 127.0.0.1:5000",
        exhaustion_ratio(&m, "127.0.0.1", PORT_A),
        1.0,
    );
    assert_ratio(
        "ratio toward 127.0.0.1:5001",
        exhaustion_ratio(&m, "127.0.0.1", PORT_B),
        0.03,
    );
    assert_ratio(
        "ratio toward 127.0.0.2:5002",
        exhaustion_ratio(&m, "127.0.0.2", PORT_C),
        0.01,
    );
    assert_eq!(
        connect_errors(&m, "EADDRNOTAVAIL", &comm),
        base + 1,
        "EADDRNOTAVAIL counter moved without a failed connect()"
    );

    drop(kept);
    drop(server_c);
    drop((listener_a, listener_b));
    daemon.stop();
}

/// Two plain `bind()`s (without the SO_REUSEADDR std's listeners set) to
/// one address:port in `ns`: the second fails with EADDRINUSE. Returns the
/// calling thread's comm and the socket holding the port.
fn bind_twice(ns: &NetNs, addr: SocketAddrV4) -> (String, std::os::fd::OwnedFd) {
    let (comm, first, second) = ns.run(|| {
        let first = bound_socket(addr.into(), false);
        let second = bound_socket(addr.into(), false);
        (thread_comm(), first, second)
    });
    let first = first.unwrap_or_else(|e| panic!("first bind {addr}: {e}"));
    match second {
        Err(e) if e.raw_os_error() == Some(libc::EADDRINUSE) => {}
        Err(e) => panic!("second bind {addr}: {e}, not EADDRINUSE"),
        Ok(_) => panic!("second bind {addr} without SO_REUSEADDR succeeded"),
    }
    (comm, first)
}

/// `bind()` to an address:port another socket holds (no `SO_REUSEADDR`)
/// fails with EADDRINUSE, counted once under this thread's comm (on the
/// tracepoint path with `--syscall-tracepoints`, which it needs there).
#[test]
fn bind_conflict_counts_eaddrinuse() {
    if !require_root("exhaustion::bind_conflict_counts_eaddrinuse") {
        return;
    }
    let ns = NetNs::new();
    let daemon = Daemon::start(&ns, &["--syscall-tracepoints"]);
    let addr = SocketAddrV4::new([127, 0, 0, 1].into(), 6000);

    let before = daemon.scrape();
    let (comm, _first) = bind_twice(&ns, addr);
    let base = connect_errors(&before, "EADDRINUSE", &comm);
    eprintln!("EADDRINUSE from comm {comm:?}; counter before: {base}");
    let mut last = base;
    wait_until(
        COUNTER_WAIT,
        &format!(
            "timewait_connect_errors_total{{errno=\"EADDRINUSE\",comm=\"{comm}\"}} to rise from {base}"
        ),
        || {
            last = connect_errors(&daemon.scrape(), "EADDRINUSE", &comm);
            last > base
        },
    );
    let m = daemon.scrape();
    assert_eq!(
        (last, connect_errors(&m, "EADDRINUSE", &comm)),
        (base + 1, base + 1),
        "one failed bind() must count once (errno=EADDRINUSE, comm={comm:?}); all series: {:?}",
        m.series("timewait_connect_errors_total")
    );
    assert_eq!(
        connect_errors(&m, "EADDRNOTAVAIL", &comm),
        0,
        "a bind() failure counted as EADDRNOTAVAIL"
    );
    daemon.stop();
}

/// Without `--syscall-tracepoints`, the tracepoint path attaches no syscall
/// tracepoint (`/metrics` says bind errors are off) and counts no bind()
/// error; the fentry path counts them regardless (`fexit/inet_bind`). Either
/// way connect() errors need no syscall tracepoint (the other tests here).
#[test]
fn bind_errors_need_syscall_tracepoints_only_on_the_tracepoint_path() {
    if !require_root("exhaustion::bind_errors_need_syscall_tracepoints_only_on_the_tracepoint_path") {
        return;
    }
    let ns = NetNs::new();
    // Daemon::start asserts timewait_probe_path{signal="bind_errors"}: "off"
    // on the tracepoint path, "fentry" with the fentry sockets hooks.
    let daemon = Daemon::start(&ns, &[]);
    let counted = crate::support::expected_bind_errors_path(false) != "off";
    let before = daemon.scrape();
    let (comm, _first) = bind_twice(&ns, SocketAddrV4::new([127, 0, 0, 1].into(), 6001));
    let base = connect_errors(&before, "EADDRINUSE", &comm);
    if counted {
        wait_until(COUNTER_WAIT, "the fentry path to count the failed bind()", || {
            connect_errors(&daemon.scrape(), "EADDRINUSE", &comm) == base + 1
        });
    } else {
        // A program that counted it would have run inside bind(), and a
        // scrape reads the error table itself: no wait is needed.
        assert_eq!(connect_errors(&daemon.scrape(), "EADDRINUSE", &comm), base, "bind errors are off, yet one counted");
    }
    daemon.stop();
}
