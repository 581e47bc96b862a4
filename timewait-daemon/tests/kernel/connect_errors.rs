//! Issue 25, part 3: `timewait_connect_errors_total` counts TCP's port
//! exhaustion only, and no local user can blind it or make it go backwards.
//! Any user can fail a UDP `bind()` under any name (a comm is per thread,
//! `prctl(PR_SET_NAME)`), and fill the kernel's error table with names: the
//! first must count nothing, the second must leave a later real
//! EADDRNOTAVAIL counted (under its name or `comm="other"`).

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::time::Duration;

use crate::support::{Daemon, Metrics, NetNs, bound_socket, require_root, wait_until};
use crate::support::ports::{connect_errors, lo4, set_port_range, thread_comm};

const COUNTER_WAIT: Duration = Duration::from_secs(10);
const FAMILY: &str = "timewait_connect_errors_total";
/// A 10-port range: 10 open connections toward one destination exhaust it.
const LO: u16 = 41000;
const HI: u16 = 41009;

/// Every `*_total` series of a scrape, by name and labels.
fn counters(m: &Metrics) -> BTreeMap<String, f64> {
    m.all().filter(|(name, _, _)| name.ends_with("_total")).map(|(n, l, v)| (format!("{n}{l:?}"), v)).collect()
}

/// Panics when a counter series present in both scrapes went down.
#[track_caller]
fn assert_no_decrease(before: &BTreeMap<String, f64>, after: &BTreeMap<String, f64>) {
    for (series, v) in after {
        if let Some(b) = before.get(series) {
            assert!(v >= b, "{series} went down from {b} to {v}");
        }
    }
}

/// Runs `f` on `n` threads of `ns`, thread `i` named `name(i)` (its comm,
/// at most 15 bytes), one after another; returns their results in order.
fn on_named_threads<T: Send>(ns: &NetNs, n: usize, name: impl Fn(usize) -> String + Sync, f: impl Fn() -> T + Sync) -> Vec<T> {
    ns.run(|| {
        (0..n)
            .map(|i| {
                // Threads of this one share its network namespace.
                std::thread::scope(|s| {
                    std::thread::Builder::new()
                        .name(name(i))
                        .spawn_scoped(s, || {
                            assert_eq!(thread_comm(), name(i), "the thread's comm");
                            f()
                        })
                        .expect("spawn a named thread")
                        .join()
                        .expect("named thread panicked")
                })
            })
            .collect()
    })
}

/// Holds all `HI - LO + 1` ports of the namespace's range toward `listener`
/// with open connections (and their accepted ends), so that the next
/// `connect()` toward it fails with EADDRNOTAVAIL.
fn fill_range(ns: &NetNs, listener: &TcpListener) -> Vec<TcpStream> {
    let to = listener.local_addr().expect("listener address");
    let mut held = Vec::new();
    for _ in LO..=HI {
        held.push(ns.run(|| TcpStream::connect(to)).unwrap_or_else(|e| panic!("connect {to} while filling the range: {e}")));
        held.push(listener.accept().expect("accept").0);
    }
    held
}

/// A TCP connect() toward `to` from a thread named `comm`: must fail with
/// EADDRNOTAVAIL (the range is full).
fn connect_fails(ns: &NetNs, comm: &str, to: SocketAddr) {
    let res = on_named_threads(ns, 1, |_| comm.to_string(), || TcpStream::connect(to).map(drop));
    match &res[0] {
        Err(e) if e.raw_os_error() == Some(libc::EADDRNOTAVAIL) => {}
        other => panic!("connect {to} with the range full: {other:?}, not EADDRNOTAVAIL"),
    }
}

/// Sum of every `timewait_connect_errors_total` series of `errno`.
fn errno_total(m: &Metrics, errno: &str) -> u64 {
    m.sum(FAMILY, &[("errno", errno)]) as u64
}

/// Every counter series seen so far at its last value: a series that
/// stopped (a name that left the busiest) keeps what it showed.
#[derive(Default)]
struct Seen {
    last: BTreeMap<String, f64>,
}

impl Seen {
    /// Takes a scrape: panics when a series went down since it was last seen.
    #[track_caller]
    fn take(&mut self, m: &Metrics) {
        let now = counters(m);
        assert_no_decrease(&self.last, &now);
        self.last.extend(now);
    }

    /// What every `timewait_connect_errors_total` series of `errno` ever
    /// shown holds: the errors counted.
    fn errors(&self, errno: &str) -> u64 {
        let quoted = format!("\"{errno}\"");
        self.last.iter().filter(|(k, _)| k.starts_with(FAMILY) && k.contains(&quoted)).map(|(_, v)| *v).sum::<f64>() as u64
    }
}

/// 300 threads with distinct names fail a UDP bind() with EADDRINUSE:
/// nothing is counted, no series appears. Then a TCP connect() that finds
/// no port (EADDRNOTAVAIL) and a TCP bind() to a held port (EADDRINUSE) are
/// each counted once under their thread's name.
#[test]
fn udp_bind_errors_are_not_counted_tcp_ones_are() {
    if !require_root("connect_errors::udp_bind_errors_are_not_counted_tcp_ones_are") {
        return;
    }
    let ns = NetNs::new();
    set_port_range(&ns, LO, HI);
    ns.sysctl("net.ipv4.tcp_tw_reuse", "0");
    // bind() errors on the tracepoint path need the syscall tracepoints.
    let daemon = Daemon::start(&ns, &["--syscall-tracepoints"]);
    let start = daemon.scrape();
    // The reserved series exist from the start, at 0.
    for errno in ["EADDRINUSE", "EADDRNOTAVAIL"] {
        assert_eq!(start.get(FAMILY, &[("errno", errno), ("comm", "other")]), Some(0.0), "{errno} other at start: {:?}", start.series(FAMILY));
    }

    let udp_addr = lo4(7000);
    let _udp = ns.run(|| UdpSocket::bind(udp_addr)).unwrap_or_else(|e| panic!("bind UDP {udp_addr}: {e}"));
    let results = on_named_threads(&ns, 300, |i| format!("udp-{i:03}"), || UdpSocket::bind(udp_addr).map(drop));
    for (i, r) in results.iter().enumerate() {
        match r {
            Err(e) if e.raw_os_error() == Some(libc::EADDRINUSE) => {}
            other => panic!("UDP bind {udp_addr} from udp-{i:03}: {other:?}, not EADDRINUSE"),
        }
    }
    // A program that counted them ran inside each bind(), and a scrape reads
    // the kernel's table itself: no wait is needed to see nothing.
    let m = daemon.scrape();
    assert_eq!(m.sum(FAMILY, &[]), 0.0, "300 failed UDP bind() counted: {:?}", m.series(FAMILY));
    assert_eq!(m.series(FAMILY).len(), 2, "only the two reserved series: {:?}", m.series(FAMILY));

    // A real port exhaustion: the range full, the next connect() fails.
    let listener = ns.listen(lo4(5000));
    let held = fill_range(&ns, &listener);
    connect_fails(&ns, "tcp-connect", lo4(5000));
    wait_until(COUNTER_WAIT, "the EADDRNOTAVAIL of tcp-connect to count", || {
        connect_errors(&daemon.scrape(), "EADDRNOTAVAIL", "tcp-connect") == 1
    });

    // A TCP bind() to a held address:port.
    let bind_addr = lo4(7001);
    let _first = ns.run(|| bound_socket(bind_addr, false)).unwrap_or_else(|e| panic!("bind TCP {bind_addr}: {e}"));
    let r = on_named_threads(&ns, 1, |_| "tcp-bind".to_string(), || bound_socket(bind_addr, false).map(drop));
    match &r[0] {
        Err(e) if e.raw_os_error() == Some(libc::EADDRINUSE) => {}
        other => panic!("second TCP bind {bind_addr}: {other:?}, not EADDRINUSE"),
    }
    wait_until(COUNTER_WAIT, "the EADDRINUSE of tcp-bind to count", || {
        connect_errors(&daemon.scrape(), "EADDRINUSE", "tcp-bind") == 1
    });
    let m = daemon.scrape();
    assert_eq!(
        (errno_total(&m, "EADDRNOTAVAIL"), errno_total(&m, "EADDRINUSE")),
        (1, 1),
        "exactly the two TCP errors: {:?}",
        m.series(FAMILY)
    );
    assert_no_decrease(&counters(&start), &counters(&m));
    drop(held);
    daemon.stop();
}

/// 1,111 names (more than the kernel's 1,024-key table) fail a TCP bind()
/// with EADDRINUSE, some of them many times, in batches with scrapes in
/// between, so that the busiest names change: every failure is counted
/// (under its name while among the 20 busiest, else `comm="other"`), at
/// most 20 names per errno have a series at a time, no counter series ever goes down,
/// nothing is lost, and a real EADDRNOTAVAIL afterwards is still counted.
#[test]
fn a_thousand_names_cannot_blind_the_table() {
    if !require_root("connect_errors::a_thousand_names_cannot_blind_the_table") {
        return;
    }
    let ns = NetNs::new();
    set_port_range(&ns, LO, HI);
    ns.sysctl("net.ipv4.tcp_tw_reuse", "0");
    let daemon = Daemon::start(&ns, &["--syscall-tracepoints"]);
    let bind_addr = lo4(7002);
    let _held = ns.run(|| bound_socket(bind_addr, false)).unwrap_or_else(|e| panic!("bind TCP {bind_addr}: {e}"));
    let fail_bind = || match bound_socket(bind_addr, false) {
        Err(e) if e.raw_os_error() == Some(libc::EADDRINUSE) => {}
        other => panic!("TCP bind {bind_addr}: {:?}, not EADDRINUSE", other.map(drop)),
    };

    let first = daemon.scrape();
    let lost = first.sum("timewait_events_lost_total", &[]);
    let mut seen = Seen::default();
    seen.take(&first);
    let mut failed = 0u64;
    for batch in 0..11usize {
        // 100 names once each, and one name failing batch + 2 times: it
        // climbs into the busiest 20, pushing a name of before out.
        on_named_threads(&ns, 100, |i| format!("b{batch:02}-{i:02}"), fail_bind);
        on_named_threads(&ns, batch + 2, |_| format!("hot-{batch:02}"), fail_bind);
        failed += 100 + batch as u64 + 2;
        let m = daemon.scrape();
        seen.take(&m);
        let names = m.series(FAMILY).into_iter().filter(|(l, _)| l.get("comm").map(String::as_str) != Some("other")).count();
        assert!(names <= 20, "more than 20 names for one errno: {:?}", m.series(FAMILY));
    }
    // Counted inside each bind(), read by each scrape: no wait needed. Every
    // one is in a series shown at some point (a name that left the busiest
    // 20 keeps, stopped, what it had; its later errors go to "other").
    assert_eq!(seen.errors("EADDRINUSE"), failed, "{:?}", daemon.scrape().series(FAMILY));
    let m = daemon.scrape();
    seen.take(&m);
    assert!(connect_errors(&m, "EADDRINUSE", "other") > 0, "1,111 names fit a 1,024-key table? {:?}", m.series(FAMILY));
    for batch in 0..10usize {
        // The busiest names (2 to 11 failures) keep their own series; the
        // last one (hot-10) came after the table was full: "other".
        assert_eq!(connect_errors(&m, "EADDRINUSE", &format!("hot-{batch:02}")), batch as u64 + 2, "{:?}", m.series(FAMILY));
    }
    assert_eq!(m.sum("timewait_events_lost_total", &[]), lost, "errors counted as lost");

    // The table is full; a real port exhaustion is still counted.
    let listener = ns.listen(lo4(5000));
    let held = fill_range(&ns, &listener);
    connect_fails(&ns, "real-service", lo4(5000));
    wait_until(COUNTER_WAIT, "the EADDRNOTAVAIL of real-service to count", || {
        let m = daemon.scrape();
        seen.take(&m);
        errno_total(&m, "EADDRNOTAVAIL") == 1
    });
    let m = daemon.scrape();
    seen.take(&m);
    assert_eq!(
        connect_errors(&m, "EADDRNOTAVAIL", "real-service") + connect_errors(&m, "EADDRNOTAVAIL", "other"),
        1,
        "{:?}",
        m.series(FAMILY)
    );
    assert_eq!(seen.errors("EADDRINUSE"), failed, "EADDRINUSE moved without a bind()");
    drop(held);
    daemon.stop();
}
