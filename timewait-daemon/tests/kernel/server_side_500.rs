//! Issue 2, test 1: 500 server-side TIME_WAIT sockets from one remote.

use crate::support::{
    Daemon, NetNs, assert_maps_equal, assert_scrape_leaves_no_timewait, quiet_equal, require_root,
    v4,
};

#[test]
fn server_side_500() {
    if !require_root("server_side_500") {
        return;
    }
    let ns = NetNs::new();
    let listener = ns.listen("127.0.0.1:8080".parse().unwrap());
    let daemon = Daemon::start(&ns, &[]);

    // The harness's own scrapes must not create TIME_WAIT, or every count
    // below would be off by the number of scrapes.
    assert_scrape_leaves_no_timewait(&ns, &daemon);

    let before = daemon.scrape();
    let created_before = before.count("timewait_created_total", &[("direction", "inbound")]);
    assert_eq!(
        before.count("timewait_sockets", &[]),
        0,
        "no TIME_WAIT before the workload"
    );

    ns.server_closes_first(&listener, &[(v4(127, 0, 0, 2), 500)]);

    let total = quiet_equal(
        "sum(timewait_sockets) vs ss -Htan state time-wait | wc -l",
        || ns.ss_tw_total(),
        || daemon.scrape().count("timewait_sockets", &[]),
    );
    assert_eq!(total, 500, "ss itself shows 500 TIME_WAIT");

    let by_remote = quiet_equal(
        "timewait_sockets by remote vs ss grouped by peer",
        || ns.ss_tw_by_remote(),
        || daemon.scrape().tw_by_remote(),
    );
    assert_maps_equal(
        "by remote",
        &[("127.0.0.2".to_string(), 500)].into(),
        &by_remote,
    );

    let m = daemon.scrape();
    let series = m.get(
        "timewait_sockets",
        &[
            ("direction", "inbound"),
            ("remote", "127.0.0.2"),
            ("port", "8080"),
        ],
    );
    assert_eq!(
        series,
        Some(500.0),
        "timewait_sockets{{inbound,127.0.0.2,8080}}"
    );
    assert_maps_equal(
        "full series",
        &ns.ss_tw_series(&[8080]),
        &m.series_map("timewait_sockets"),
    );

    let created = m.count("timewait_created_total", &[("direction", "inbound")]) - created_before;
    assert_eq!(
        created, 500,
        "timewait_created_total{{direction=\"inbound\"}} rose by 500"
    );
    assert_eq!(
        m.count("timewait_events_lost_total", &[]),
        0,
        "no events lost"
    );
    let info = m.series("timewait_build_info");
    assert_eq!(info.len(), 1, "one timewait_build_info series: {info:?}");
    assert!(
        info[0].0.contains_key("version") && info[0].0.contains_key("kernel") && info[0].1 == 1.0,
        "timewait_build_info{{version,kernel}} 1: {info:?}"
    );
    assert_eq!(daemon.get("/healthz").0, 200, "/healthz");

    daemon.stop();
    drop(listener);
}
