//! `timewait_fin_wait2_orphans`: the server closes first and the client does
//! not close, so the server's socket is a minisocket in substate FIN_WAIT2
//! (`ss state fin-wait-2`, not `state time-wait`). When the clients close, the
//! minisockets move to TIME_WAIT; both gauges must follow.

use std::time::{Duration, Instant};

use crate::support::{
    Daemon, NetNs, assert_maps_equal, quiet_equal, require_root, server_closes_first_clients_stay,
    v4,
};

/// Below this since the first orphan none of them can have expired
/// (tcp_fin_timeout is 60 s).
const FIN_TIMEOUT_MARGIN: Duration = Duration::from_secs(50);

#[test]
fn fin_wait2_orphans() {
    if !require_root("fin_wait2_orphans") {
        return;
    }
    let ns = NetNs::new();
    let listener = ns.listen("127.0.0.1:8080".parse().unwrap());
    let daemon = Daemon::start(&ns, &[]);

    let started = Instant::now();
    let clients = ns.run(|| server_closes_first_clients_stay(&listener, &[(v4(127, 0, 0, 2), 40)]));
    eprintln!("fin_wait2_orphans: 40 orphans made in {:?}", started.elapsed());

    let fw2 = quiet_equal(
        "timewait_fin_wait2_orphans vs ss state fin-wait-2 (minisockets)",
        || ns.ss_fw2_orphan_series(&[8080]),
        || daemon.scrape().series_map("timewait_fin_wait2_orphans"),
    );
    // Every connection is in FIN_WAIT2, most as minisockets. The kernel keeps
    // a few as full sockets: when the peer's ACK of our FIN is processed
    // while close() still owns the socket (its backlog, on loopback), the
    // FIN_WAIT1 -> FIN_WAIT2 step cannot hand over to a minisocket and arms
    // the keepalive timer instead (`tcp_rcv_state_process`, "Bad case").
    // ci13 and ci19 (6.12 guest) read 39 minisockets of 40, the daemon
    // agreeing; that this is the cause is read from the kernel source, and
    // the 40 in all below is what would show it wrong.
    let minisockets = fw2.values().sum::<u64>();
    let all_fw2 = ns.ss("fin-wait-2").len() as u64;
    eprintln!("fin_wait2_orphans: {minisockets} minisockets, {} full sockets in FIN_WAIT2", all_fw2.saturating_sub(minisockets));
    // An orphan lives tcp_fin_timeout (60 s, and it cannot be raised without
    // making the orphans full sockets first: tcp_close); under an emulated,
    // loaded guest the first ones could expire before this point.
    if started.elapsed() < FIN_TIMEOUT_MARGIN {
        assert_eq!(all_fw2, 40, "ss shows 40 FIN-WAIT-2 in all (minisockets and full sockets)");
        assert!(minisockets >= 30, "most of the 40 are minisockets: {minisockets}");
    } else {
        eprintln!("fin_wait2_orphans: {:?} since the first orphan, so some may have expired: not asserting 40", started.elapsed());
    }
    let n = minisockets;
    let expected_fw2: std::collections::BTreeMap<_, u64> =
        [(("inbound".to_string(), "127.0.0.2".to_string(), 8080), n)].into();
    assert_maps_equal("FIN_WAIT2 orphans", &expected_fw2, &fw2);
    // After the FIN every one of the 40 is a minisocket in TIME_WAIT.
    let expected_tw: std::collections::BTreeMap<_, u64> =
        [(("inbound".to_string(), "127.0.0.2".to_string(), 8080), 40)].into();
    let tw = quiet_equal(
        "timewait_sockets vs ss while the peers are open",
        || ns.ss_tw_total(),
        || daemon.scrape().count("timewait_sockets", &[]),
    );
    assert_eq!(tw, 0, "FIN_WAIT2 minisockets are not TIME_WAIT");

    // The clients close: each minisocket takes their FIN and enters TIME_WAIT.
    let dropped_after = started.elapsed();
    drop(clients);
    ns.wait_settled();
    let fw2 = quiet_equal(
        "timewait_fin_wait2_orphans after the peers closed",
        || ns.ss_fw2_orphan_series(&[8080]),
        || daemon.scrape().series_map("timewait_fin_wait2_orphans"),
    );
    assert!(fw2.is_empty(), "no FIN_WAIT2 left: {fw2:?}");
    let tw = quiet_equal(
        "timewait_sockets after the peers closed",
        || ns.ss_tw_series(&[8080]),
        || daemon.scrape().series_map("timewait_sockets"),
    );
    // Every orphan alive when its client closed is now TIME_WAIT.
    if dropped_after < FIN_TIMEOUT_MARGIN {
        assert_maps_equal("TIME_WAIT after FIN", &expected_tw, &tw);
    } else {
        eprintln!("fin_wait2_orphans: clients closed {dropped_after:?} after the first orphan: TIME_WAIT asserted against ss only");
    }
    let m = daemon.scrape();
    assert_eq!(
        m.count("timewait_created_total", &[]),
        40,
        "one minisocket per connection: FIN_WAIT2 -> TIME_WAIT is the same one"
    );
}
