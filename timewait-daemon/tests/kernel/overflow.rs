//! Issue 4, test 2: `tcp_max_tw_buckets` full; closing sockets skip
//! TIME_WAIT and the kernel counts TcpExtTCPTimeWaitOverflow.

use std::collections::BTreeMap;

use crate::support::{Daemon, NetNs, quiet_equal, require_root};
use crate::support::ports::{
    Dest, gauge, lo4, metric_in_use, nstat, port_range, ss_outbound_in_use,
};

const MAX_BUCKETS: u64 = 10;
const CLOSES: usize = 50;
const PORT: u16 = 5000;

/// `tcp_max_tw_buckets` = 10, 50 client-first closes: 10 TIME_WAIT, and
/// `timewait_overflow_total` rises by what the namespace's
/// TcpExtTCPTimeWaitOverflow says (40).
#[test]
fn overflow_when_max_tw_buckets_full() {
    if !require_root("overflow::overflow_when_max_tw_buckets_full") {
        return;
    }
    let ns = NetNs::new();
    ns.sysctl("net.ipv4.tcp_max_tw_buckets", &MAX_BUCKETS.to_string());
    let listener = ns.listen(lo4(PORT));
    let daemon = Daemon::start(&ns, &[]);

    let m = daemon.scrape();
    assert_eq!(
        gauge(&m, "timewait_max_buckets"),
        MAX_BUCKETS as f64,
        "timewait_max_buckets after sysctl tcp_max_tw_buckets={MAX_BUCKETS}"
    );
    let metric_before = gauge(&m, "timewait_overflow_total");
    let kernel_before = nstat(&ns, "TcpExtTCPTimeWaitOverflow");
    assert_eq!(
        metric_before, kernel_before as f64,
        "timewait_overflow_total before the workload vs the namespace's TcpExtTCPTimeWaitOverflow"
    );

    ns.client_closes_first(&listener, None, CLOSES);

    // The counters, at a quiet moment: metric == the namespace's counter.
    let overflow = quiet_equal(
        "timewait_overflow_total vs nstat TcpExtTCPTimeWaitOverflow",
        || nstat(&ns, "TcpExtTCPTimeWaitOverflow"),
        || {
            let v = gauge(&daemon.scrape(), "timewait_overflow_total");
            assert!(
                v.fract() == 0.0 && v >= 0.0,
                "timewait_overflow_total = {v}"
            );
            v as u64
        },
    );
    let kernel_rise = overflow - kernel_before;
    let metric_rise = overflow as f64 - metric_before;
    eprintln!(
        "overflow: nstat {kernel_before} -> {overflow} (+{kernel_rise}), metric {metric_before} -> {overflow} (+{metric_rise})"
    );
    assert_eq!(
        kernel_rise,
        CLOSES as u64 - MAX_BUCKETS,
        "the namespace's TcpExtTCPTimeWaitOverflow rose by {kernel_rise}, not {} \
         ({CLOSES} closes, {MAX_BUCKETS} buckets): a kernel behaviour, the metric followed it",
        CLOSES as u64 - MAX_BUCKETS
    );

    // What did enter TIME_WAIT: 10, by ss and by the gauges.
    let tw = quiet_equal(
        "TIME_WAIT sockets: ss vs sum of timewait_sockets",
        || ns.ss_tw_total(),
        || daemon.scrape().count("timewait_sockets", &[]),
    );
    assert_eq!(
        tw, MAX_BUCKETS,
        "TIME_WAIT sockets with tcp_max_tw_buckets={MAX_BUCKETS}"
    );
    let dest: Dest = ("127.0.0.1".into(), PORT);
    // The namespace's default range; the listener's port is below it.
    let (lo, hi) = port_range(&ns);
    let in_use = quiet_equal(
        "outbound ports in use (TIME_WAIT only left)",
        || ss_outbound_in_use(&ns, lo, hi),
        || metric_in_use(&daemon.scrape()),
    );
    assert_eq!(
        in_use,
        BTreeMap::from([(dest, MAX_BUCKETS)]),
        "ports held toward 127.0.0.1:{PORT} after the overflowed closes"
    );
    assert_eq!(
        gauge(&daemon.scrape(), "timewait_max_buckets"),
        MAX_BUCKETS as f64,
        "timewait_max_buckets"
    );

    drop(listener);
    daemon.stop();
}
