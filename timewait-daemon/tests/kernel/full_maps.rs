//! Full maps and reconciliation (issue 7), and the `other` close reason.

use std::{net::IpAddr, os::unix::fs::MetadataExt as _, time::Duration};

use crate::support::{Daemon, NetNs, quiet_equal, require_root, wait_until};

/// Deliberately tiny maps: the daemon keeps running, counts what it lost, no
/// gauge goes negative, and reconciliation brings the counts back to exact.
#[test]
fn tiny_maps_reconcile_to_exact() {
    if !require_root("tiny_maps_reconcile_to_exact") {
        return;
    }
    let ns = NetNs::new();
    let d = Daemon::start(&ns, &["--max-tracked-sockets", "50", "--reconcile-interval", "1"]);
    let listener = ns.listen("127.0.0.1:8080".parse().unwrap());
    let from: IpAddr = "127.0.0.2".parse().unwrap();
    ns.server_closes_first(&listener, &[(from, 300)]);

    let m = d.scrape();
    let lost = m.sum("timewait_events_lost_total", &[]);
    assert!(lost >= 250.0, "300 minisockets into a table of 50: lost {lost}");
    assert!(
        m.series("timewait_sockets").iter().all(|(_, v)| *v >= 0.0),
        "no gauge may go negative"
    );
    let n = quiet_equal(
        "TIME_WAIT after reconciliation",
        || ns.ss_tw_total(),
        || d.scrape().get("timewait_sockets", &[("direction", "inbound"), ("remote", "127.0.0.2"), ("port", "8080")]).unwrap_or(0.0) as u64,
    );
    assert_eq!(n, 300);
    let m = d.scrape();
    let corrections = m.sum("timewait_reconcile_corrections_total", &[]);
    assert_eq!(corrections, 300.0 - 50.0, "it corrected exactly what the table could not hold");
    assert!(m.sum("timewait_reconcile_runs_total", &[]) >= 2.0);
    assert_eq!(m.sum("timewait_reconcile_errors_total", &[]), 0.0);
    d.stop();
}

/// With nothing lost, reconciliation corrects nothing, even during churn.
#[test]
fn reconcile_leaves_exact_counts_alone() {
    if !require_root("reconcile_leaves_exact_counts_alone") {
        return;
    }
    let ns = NetNs::new();
    let d = Daemon::start(&ns, &["--reconcile-interval", "1"]);
    let listener = ns.listen("127.0.0.1:8080".parse().unwrap());
    for i in 2..6u8 {
        ns.server_closes_first(&listener, &[(format!("127.0.0.{i}").parse().unwrap(), 100)]);
    }
    wait_until(Duration::from_secs(10), "three reconciliations", || {
        d.scrape().sum("timewait_reconcile_runs_total", &[]) >= 3.0
    });
    let m = d.scrape();
    assert_eq!(m.sum("timewait_reconcile_corrections_total", &[]), 0.0);
    assert_eq!(m.sum("timewait_events_lost_total", &[]), 0.0);
    quiet_equal("TIME_WAIT", || ns.ss_tw_total(), || d.scrape().sum("timewait_sockets", &[]) as u64);
    d.stop();
}

/// A network namespace torn down with TIME_WAIT sockets in it: they end with
/// reason="other" (seen by a daemon watching all namespaces).
#[test]
fn netns_teardown_is_other() {
    if !require_root("netns_teardown_is_other") {
        return;
    }
    let home = NetNs::new();
    let d = Daemon::start(&home, &["--all-netns"]);
    let doomed = NetNs::new();
    let inum = std::fs::metadata(format!("/var/run/netns/{}", doomed.name())).unwrap().ino().to_string();
    let listener = doomed.listen("127.0.0.1:8080".parse().unwrap());
    doomed.server_closes_first(&listener, &[("127.0.0.2".parse().unwrap(), 12)]);
    drop(listener);
    let in_doomed = |d: &Daemon| {
        d.scrape()
            .series("timewait_sockets")
            .into_iter()
            .filter(|(l, _)| l.get("netns") == Some(&inum))
            .map(|(_, v)| v as u64)
            .sum::<u64>()
    };
    wait_until(Duration::from_secs(10), "12 TIME_WAIT in the doomed namespace", || in_doomed(&d) == 12);
    let other_before = d.scrape().sum("timewait_closed_total", &[("reason", "other")]);
    drop(doomed); // ip netns del: the kernel purges its minisockets (inet_twsk_purge)
    wait_until(Duration::from_secs(30), "the purged minisockets to close as reason=other", || {
        d.scrape().sum("timewait_closed_total", &[("reason", "other")]) - other_before >= 12.0
    });
    assert_eq!(in_doomed(&d), 0);
    let m = d.scrape();
    // Other namespaces' teardowns may add to it meanwhile, never take away.
    assert!(m.sum("timewait_closed_total", &[("reason", "other")]) - other_before >= 12.0);
    d.stop();
}
