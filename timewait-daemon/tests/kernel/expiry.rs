//! Issue 2, test 6: after TIME_WAIT's 60 s the gauges are 0 and
//! `timewait_closed_total{reason="expired"}` rose by the number that expired.

use std::time::Duration;

use crate::support::{Daemon, NetNs, quiet_equal, require_root, v4, wait_until};

const N: u64 = 50;

#[test]
fn expiry() {
    if !require_root("expiry") {
        return;
    }
    let ns = NetNs::new();
    let listener = ns.listen("127.0.0.1:8080".parse().unwrap());
    let peer = ns.listen("127.0.0.1:9090".parse().unwrap());
    let daemon = Daemon::start(&ns, &[]);

    ns.server_closes_first(&listener, &[(v4(127, 0, 0, 2), 30)]);
    ns.client_closes_first(&peer, None, 20);
    let total = quiet_equal(
        "sum(timewait_sockets) vs ss before expiry",
        || ns.ss_tw_total(),
        || daemon.scrape().count("timewait_sockets", &[]),
    );
    assert_eq!(total, N);
    let expired_before = daemon
        .scrape()
        .count("timewait_closed_total", &[("reason", "expired")]);

    // TIME_WAIT lasts 60 s; the timer wheel may fire a few seconds late.
    wait_until(
        Duration::from_secs(75),
        "ss shows no TIME_WAIT left",
        || ns.ss_tw_total() == 0,
    );

    let (sum, expired) = quiet_equal(
        "gauges 0 and expired counter after expiry",
        || (ns.ss_tw_total(), expired_before + N),
        || {
            let m = daemon.scrape();
            (
                m.count("timewait_sockets", &[]),
                m.count("timewait_closed_total", &[("reason", "expired")]),
            )
        },
    );
    assert_eq!(sum, 0);
    assert_eq!(
        expired - expired_before,
        N,
        "timewait_closed_total{{reason=\"expired\"}} rose by {N}"
    );
    let m = daemon.scrape();
    assert_eq!(m.count("timewait_fin_wait2_orphans", &[]), 0);
    assert_eq!(
        m.count("timewait_events_lost_total", &[]),
        0,
        "no events lost"
    );
    for reason in ["reused_by_syn", "reused_by_connect", "reset", "other"] {
        assert_eq!(
            m.count("timewait_closed_total", &[("reason", reason)]),
            0,
            "nothing closed for reason {reason}"
        );
    }
}
