//! Issue 4, test 4: changing `ip_local_port_range` while the daemon runs
//! changes the exhaustion ratio's denominator within one scrape.

use std::collections::BTreeMap;

use crate::support::{Daemon, NetNs, quiet_equal, require_root};
use crate::support::ports::{
    Dest, assert_ratio, exhaustion_ratio, gauge, lo4, metric_in_use, set_port_range,
    ss_outbound_in_use,
};

const PORT: u16 = 5000;
const N: u64 = 10;

#[test]
fn port_range_change_next_scrape() {
    if !require_root("port_range_change::port_range_change_next_scrape") {
        return;
    }
    let ns = NetNs::new();
    set_port_range(&ns, 40000, 40099);
    ns.sysctl("net.ipv4.tcp_tw_reuse", "0");
    let listener = ns.listen(lo4(PORT));
    let daemon = Daemon::start(&ns, &[]);

    ns.client_closes_first(&listener, None, N as usize);
    let dest: Dest = ("127.0.0.1".into(), PORT);
    let agreed = quiet_equal(
        "outbound ports in use",
        // The widest range the test sets: ss counts every port it may use.
        || ss_outbound_in_use(&ns, 40000, 40199),
        || metric_in_use(&daemon.scrape()),
    );
    assert_eq!(
        agreed,
        BTreeMap::from([(dest, N)]),
        "ports held toward 127.0.0.1:{PORT}"
    );

    let m = daemon.scrape();
    assert_eq!(
        gauge(&m, "timewait_local_port_range_size"),
        100.0,
        "range 40000-40099"
    );
    assert_ratio(
        "ratio with 100 ports",
        exhaustion_ratio(&m, "127.0.0.1", PORT),
        0.1,
    );

    // Each change must show on the very next scrape: no retry.
    for (lo, hi, size) in [(40000u16, 40199u16, 200u64), (40000, 40049, 50)] {
        set_port_range(&ns, lo, hi);
        let m = daemon.scrape();
        let got = gauge(&m, "timewait_local_port_range_size");
        let ratio = exhaustion_ratio(&m, "127.0.0.1", PORT);
        eprintln!("range {lo}-{hi}: first scrape says size {got}, ratio {ratio}");
        assert_eq!(
            got, size as f64,
            "timewait_local_port_range_size on the first scrape after setting {lo} {hi}"
        );
        assert_ratio(
            &format!("ratio on the first scrape after setting {lo} {hi}"),
            ratio,
            N as f64 / size as f64,
        );
        assert_eq!(
            m.count(
                "timewait_outbound_ports_in_use",
                &[("remote", "127.0.0.1"), ("port", "5000")]
            ),
            N,
            "ports in use must not change with the range"
        );
    }

    drop(listener);
    daemon.stop();
}
