//! Issue 3, tests 4 and 5: a local `connect()` takes over the port of the
//! client's own TIME_WAIT minisocket (`tcp_tw_reuse`).
//!
//! In a namespace with `net.ipv4.tcp_tw_reuse = 1` and a one-port
//! `ip_local_port_range` (40000), a client connects to a server and closes
//! first: the client holds 127.0.0.1:40000 -> 127.0.0.1:8080 in TIME_WAIT.
//! A second `connect()` to the same destination has only that port and that
//! 4-tuple: `__inet_check_established` (net/ipv4/inet_hashtables.c) lets
//! `tcp_twsk_unique` take it over once `tcp_tw_reuse_delay` (ms, default
//! 1000) has passed since the minisocket was created, kills the minisocket
//! and counts `TcpExtTWRecycled`. So `closed_total{reason="reused_by_connect"}`
//! rises by 1, as does `TcpExtTWRecycled`.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use crate::support::{Daemon, NetNs, abortive_close, require_root};
use crate::support::syn::{
    in_time_wait, kdelta, kernel_line, nstat, sa4, wait_count, wait_eof, wait_only_time_wait,
    wait_tuple_gone, tw_created_delta};

/// `net.ipv4.tcp_tw_reuse_delay` in ms (1000 when the kernel has no such
/// sysctl: it then compares whole seconds, which 1 s + margin also covers).
pub fn tw_reuse_delay(ns: &NetNs) -> Duration {
    let out = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            ns.name(),
            "sysctl",
            "-n",
            "net.ipv4.tcp_tw_reuse_delay",
        ])
        .output()
        .expect("run sysctl");
    let ms = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(1000u64);
    Duration::from_millis(ms.max(1000))
}

/// Runs `f` while the namespace's only ephemeral port is 40000, then puts
/// the range back. Scrapes (each a connection from an ephemeral port, which
/// the daemon's side may still hold a moment after the scrape's RST) run
/// outside, with the full range.
pub fn with_one_port<T>(ns: &NetNs, f: impl FnOnce() -> T) -> T {
    let before = ns.exec(&["sysctl", "-n", "net.ipv4.ip_local_port_range"]);
    let before = before.split_whitespace().collect::<Vec<_>>().join(" ");
    ns.sysctl("net.ipv4.ip_local_port_range", "40000 40000");
    let out = f();
    ns.sysctl("net.ipv4.ip_local_port_range", &before);
    out
}

/// In a namespace whose only ephemeral port is 40000 (and `tcp_tw_reuse`
/// on): connects to `listener` (127.0.0.1) and closes first, so the client
/// holds 40000 -> listener in TIME_WAIT; waits out `tcp_tw_reuse_delay`;
/// connects again. Returns the second connection's two ends.
#[track_caller]
pub fn take_over_own_time_wait(ns: &NetNs, listener: &TcpListener) -> (TcpStream, TcpStream) {
    let server_end = match listener.local_addr().expect("listener address") {
        SocketAddr::V4(a) => a,
        other => panic!("IPv4 listener expected, got {other}"),
    };
    let client_end = sa4([127, 0, 0, 1], 40000);
    // First connection; the client closes first and keeps the TIME_WAIT.
    let first = ns.run(|| {
        let c = TcpStream::connect(SocketAddr::V4(server_end)).expect("first connect");
        let (s, _) = listener.accept().expect("accept");
        let local = c.local_addr().expect("local addr");
        drop(c);
        wait_eof(&s);
        drop(s);
        local
    });
    let tw_born = Instant::now();
    assert_eq!(
        first,
        SocketAddr::V4(client_end),
        "the only ephemeral port is 40000"
    );
    wait_only_time_wait(ns, client_end, server_end);
    assert!(
        in_time_wait(ns, client_end, server_end),
        "client holds {client_end} -> {server_end} in TIME_WAIT"
    );

    // tcp_twsk_unique only hands the port over once tcp_tw_reuse_delay has
    // passed since the minisocket was created: a property of the clock, not
    // of any state we could poll, hence a sleep (plus a margin).
    let delay = tw_reuse_delay(ns) + Duration::from_millis(300);
    if let Some(left) = delay.checked_sub(tw_born.elapsed()) {
        thread::sleep(left);
    }

    let (second, accepted) = ns.run(|| {
        let c = TcpStream::connect(SocketAddr::V4(server_end)).unwrap_or_else(|e| {
            panic!("second connect (should take over the TIME_WAIT port): {e}")
        });
        let (s, _) = listener.accept().expect("accept");
        (c, s)
    });
    (second, accepted)
}

#[test]
fn connect_reuse() {
    if !require_root("connect_reuse") {
        return;
    }
    let ns = NetNs::new();
    ns.sysctl("net.ipv4.tcp_tw_reuse", "1");
    let listener = ns.listen("127.0.0.1:8080".parse().unwrap());
    let daemon = Daemon::start(&ns, &[]);
    let client_end = sa4([127, 0, 0, 1], 40000);
    let server_end = sa4([127, 0, 0, 1], 8080);
    let reuse = [("reason", "reused_by_connect")];

    let m0 = daemon.scrape();
    let k0 = nstat(&ns);

    let (second, accepted) = with_one_port(&ns, || take_over_own_time_wait(&ns, &listener));
    assert_eq!(
        second.local_addr().expect("local addr"),
        SocketAddr::V4(client_end),
        "the second connection reuses port 40000"
    );
    let m = wait_count(
        &daemon,
        "timewait_closed_total",
        &reuse,
        m0.count("timewait_closed_total", &reuse) + 1,
    );
    let k1 = nstat(&ns);
    let d = |name: &str, f: &[(&str, &str)]| m.count(name, f) - m0.count(name, f);
    let reused = d("timewait_closed_total", &reuse);
    let recycled = kdelta(&k0, &k1, "TcpExtTWRecycled");
    let state = ns.exec(&[
        "ss",
        "-Htan",
        "state",
        "connected",
        "sport",
        "= :40000",
        "dport",
        "= :8080",
    ]);
    eprintln!(
        "connect_reuse: reused_by_connect+{reused} created+{} sockets now {}; ss 40000->8080: {:?}; kernel: {}",
        d("timewait_created_total", &[]),
        m.count("timewait_sockets", &[]),
        state.trim(),
        kernel_line(&k0, &k1)
    );
    assert_eq!(
        reused, 1,
        "closed_total{{reason=reused_by_connect}} rose by exactly 1"
    );
    assert_eq!(recycled, 1, "TcpExtTWRecycled rose by exactly 1");
    assert_eq!(reused, recycled, "reused_by_connect == TcpExtTWRecycled");
    assert_eq!(d("timewait_lifetime_seconds_count", &reuse), 1);
    for reason in ["expired", "reused_by_syn", "reset", "other"] {
        assert_eq!(
            d("timewait_closed_total", &[("reason", reason)]),
            0,
            "nothing closed for reason {reason}"
        );
    }
    assert!(
        !in_time_wait(&ns, client_end, server_end),
        "the TIME_WAIT is gone from ss"
    );
    assert!(
        state.starts_with("ESTAB"),
        "40000 -> 8080 is ESTABLISHED again: {state:?}"
    );
    assert_eq!(
        m.count("timewait_sockets", &[]),
        0,
        "timewait_sockets: none left"
    );
    assert_eq!(d("timewait_created_total", &[]), 1);
    if let Some(tw) = tw_created_delta(&k0, &k1) {
        assert_eq!(tw, 1, "created_total == TcpExtTW + TcpExtTWKilled");
    }

    abortive_close(second).expect("close");
    drop(accepted);
    wait_tuple_gone(&ns, client_end, server_end);
}
