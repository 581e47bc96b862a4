//! Issue 2, test 2: 200 distinct remotes with different counts, every remote
//! exact; then `--top-remotes 50` folds the rest into `remote="other"`.

use std::collections::BTreeMap;
use std::net::IpAddr;

use crate::support::{Daemon, NetNs, assert_maps_equal, quiet_equal, require_root, v4};

const REMOTES: usize = 200;

/// Remote i is 127.0.{1 + i/100}.{1 + i%100} and makes (i % 7) + 1 connections.
fn workload() -> Vec<(IpAddr, usize)> {
    (0..REMOTES)
        .map(|i| {
            (
                v4(127, 0, 1 + (i / 100) as u8, 1 + (i % 100) as u8),
                i % 7 + 1,
            )
        })
        .collect()
}

fn expected_by_remote() -> BTreeMap<String, u64> {
    workload()
        .into_iter()
        .map(|(ip, n)| (ip.to_string(), n as u64))
        .collect()
}

#[test]
fn many_remotes() {
    if !require_root("many_remotes") {
        return;
    }
    let total: u64 = expected_by_remote().values().sum();

    // Part 1: room for every remote (the default --top-remotes is 100).
    {
        let ns = NetNs::new();
        let listener = ns.listen("127.0.0.1:8080".parse().unwrap());
        let daemon = Daemon::start(&ns, &["--top-remotes", "1000"]);
        ns.server_closes_first(&listener, &workload());

        let by_remote = quiet_equal(
            "timewait_sockets by remote vs ss grouped by peer (200 remotes)",
            || ns.ss_tw_by_remote(),
            || daemon.scrape().tw_by_remote(),
        );
        assert_maps_equal("ss vs the workload", &expected_by_remote(), &by_remote);
        let series = quiet_equal(
            "timewait_sockets series vs ss",
            || ns.ss_tw_series(&[8080]),
            || daemon.scrape().series_map("timewait_sockets"),
        );
        assert_eq!(series.len(), REMOTES, "one series per remote");
        assert_eq!(series.values().sum::<u64>(), total);
    }

    // Part 2: same workload, another namespace, --top-remotes 50.
    let ns = NetNs::new();
    let listener = ns.listen("127.0.0.1:8080".parse().unwrap());
    let daemon = Daemon::start(&ns, &["--top-remotes", "50"]);
    ns.server_closes_first(&listener, &workload());

    // At a quiet moment: the sum equals ss, and the `other` series plus the
    // kept ones are exact against ss grouped by peer.
    let (ss_by_remote, metric_by_remote) = {
        let mut pair = None;
        quiet_equal(
            "sum(timewait_sockets) with --top-remotes 50 vs ss",
            || ns.ss_tw_total(),
            || {
                let m = daemon.scrape().tw_by_remote();
                let sum = m.values().sum();
                pair = Some(m);
                sum
            },
        );
        (ns.ss_tw_by_remote(), pair.expect("scraped"))
    };
    // The load's premise: ss shows the whole workload, or one short (seen
    // once in clean-clone CI, ss and the daemon agreeing on 793 of 794: the
    // kernel's one-off, as in netns_isolation and full_maps). The daemon is
    // held to ss exactly, below and at the quiet moment above.
    let shown = ss_by_remote.values().sum::<u64>();
    assert!(shown == total || shown + 1 == total, "ss shows the whole workload: {shown} of {total}");
    assert_eq!(
        metric_by_remote.values().sum::<u64>(),
        shown,
        "sum unchanged by folding"
    );

    let kept: BTreeMap<&String, u64> = metric_by_remote
        .iter()
        .filter(|(r, _)| *r != "other")
        .map(|(r, n)| (r, *n))
        .collect();
    assert_eq!(
        kept.len(),
        50,
        "exactly 50 remotes keep their own series; got {}: {kept:?}",
        kept.len()
    );
    let other = *metric_by_remote
        .get("other")
        .unwrap_or_else(|| panic!("no remote=\"other\" series: {metric_by_remote:?}"));

    for (r, n) in &kept {
        assert_eq!(
            ss_by_remote.get(*r),
            Some(n),
            "kept remote {r} exact against ss"
        );
    }
    let folded: BTreeMap<&String, u64> = ss_by_remote
        .iter()
        .filter(|(r, _)| !kept.contains_key(r))
        .map(|(r, n)| (r, *n))
        .collect();
    assert_eq!(folded.len(), REMOTES - 50);
    assert_eq!(
        other,
        folded.values().sum::<u64>(),
        "other = sum of the folded remotes"
    );

    let min_kept = kept.values().min().copied().unwrap();
    let max_folded = folded.values().max().copied().unwrap();
    assert!(
        min_kept >= max_folded,
        "the kept remotes are the busiest: smallest kept {min_kept} < largest folded {max_folded}"
    );

    // Every series is still (direction, remote, port)-labelled.
    let series = daemon.scrape().series_map("timewait_sockets");
    assert!(
        series.keys().all(|(d, _, p)| d == "inbound" && *p == 8080),
        "all inbound to 8080: {series:?}"
    );
    drop(listener);
}
