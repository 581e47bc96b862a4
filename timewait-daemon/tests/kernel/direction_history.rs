//! Issue 12: direction from the connection's own history. A server whose
//! listener closes while its accepted connections are still open (a stop
//! or a restart that drains) closes them first afterwards: their TIME_WAIT
//! sockets are created with no listener on the port. The listener table
//! alone would call them outbound, one series per client port; the daemon
//! saw them accepted, so they are inbound on the server's port.

use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use crate::support::{Daemon, NetNs, assert_maps_equal, connect_from, quiet_equal, require_root, v4, wait_eof, wait_until};

const N: usize = 40;

#[test]
fn listener_gone_before_the_close() {
    if !require_root("listener_gone_before_the_close") {
        return;
    }
    let ns = NetNs::new();
    let daemon = Daemon::start(&ns, &[]);
    let addr: SocketAddr = "127.0.0.1:8080".parse().unwrap();
    let listener = ns.listen(addr);
    let pairs: Vec<(TcpStream, TcpStream)> = ns.run(|| {
        (0..N)
            .map(|i| {
                let client = connect_from(Some(v4(127, 0, 0, 2)), addr)
                    .unwrap_or_else(|e| panic!("connection {i}: {e}"));
                let (server, _) = listener.accept().expect("accept");
                (client, server)
            })
            .collect()
    });
    let m0 = daemon.scrape();
    let before = m0.sum("timewait_direction_from_history_total", &[]);
    let created = |m: &crate::support::Metrics, d: &str| m.sum("timewait_created_total", &[("direction", d)]);
    // The server stops listening, then closes what it had accepted. The
    // listener is gone when ss says so: another test thread's fork (ss, a
    // daemon) holds every fd of the process until it execs, so the close
    // may land a moment after the drop, and a connection closed before it
    // would find 8080 still listening (inbound anyway, but not from history).
    drop(listener);
    wait_until(Duration::from_secs(10), "the listener on 8080 closed", || {
        ns.exec(&["ss", "-Htln", "sport = :8080"]).trim().is_empty()
    });
    for (client, server) in pairs {
        drop(server);
        wait_eof(&client);
        drop(client);
    }
    ns.wait_settled();
    let series = quiet_equal(
        "TIME_WAIT of a server that stopped listening first, vs ss",
        || ns.ss_tw_series(&[8080]),
        || daemon.scrape().series_map("timewait_sockets"),
    );
    assert_maps_equal(
        "inbound on the server's port, not one series per client port",
        &[(("inbound".to_string(), "127.0.0.2".to_string(), 8080), N as u64)].into(),
        &series,
    );
    let fixed = daemon.scrape().sum("timewait_direction_from_history_total", &[]) - before;
    assert_eq!(fixed, N as f64, "each of them got its direction from its history, against the listener table");
    let m1 = daemon.scrape();
    assert_eq!(
        (created(&m1, "inbound") - created(&m0, "inbound"), created(&m1, "outbound") - created(&m0, "outbound")),
        (N as f64, 0.0),
        "created_total counts them inbound too"
    );
    // A remote that holds TIME_WAIT has its SYN series before its first SYN
    // (at 0), so a rule's increase() sees the first one.
    if crate::support::expected_paths().1 != "unavailable" {
        for name in ["timewait_syn_total", "timewait_syn_rejected_total"] {
            assert_eq!(m1.get(name, &[("remote", "127.0.0.2")]), Some(0.0), "{name} for a remote holding TIME_WAIT");
        }
    }
    daemon.stop();
}
