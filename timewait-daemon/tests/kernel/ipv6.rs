//! Issue 2, test 3: IPv6 TIME_WAIT sockets (`::1`) counted exactly; and an
//! IPv4 client of a dual-stack listener, which the kernel holds as an
//! IPv4-mapped IPv6 socket, labelled with the plain IPv4 address.

use crate::support::{
    Daemon, NetNs, V6_LOOPBACK, assert_maps_equal, quiet_equal, require_root, v4,
};

#[test]
fn ipv6() {
    if !require_root("ipv6") {
        return;
    }
    let ns = NetNs::new();
    let listener = ns.listen("[::1]:8080".parse().unwrap());
    let daemon = Daemon::start(&ns, &[]);
    ns.server_closes_first(&listener, &[(V6_LOOPBACK, 120)]);

    let series = quiet_equal(
        "timewait_sockets vs ss (IPv6 ::1)",
        || ns.ss_tw_series(&[8080]),
        || daemon.scrape().series_map("timewait_sockets"),
    );
    assert_maps_equal(
        "IPv6 series",
        &[(("inbound".to_string(), "::1".to_string(), 8080), 120)].into(),
        &series,
    );
    let m = daemon.scrape();
    assert_eq!(
        m.get(
            "timewait_sockets",
            &[
                ("direction", "inbound"),
                ("remote", "::1"),
                ("port", "8080")
            ]
        ),
        Some(120.0)
    );
}

#[test]
fn ipv4_mapped() {
    if !require_root("ipv4_mapped") {
        return;
    }
    let ns = NetNs::new();
    // An IPv6 wildcard listener takes IPv4 connections too (bindv6only=0).
    let listener = ns.listen("[::]:8081".parse().unwrap());
    let daemon = Daemon::start(&ns, &[]);
    ns.server_closes_first(&listener, &[(v4(127, 0, 0, 2), 40), (V6_LOOPBACK, 30)]);

    let raw = ns.exec(&["ss", "-Htan", "state", "time-wait"]);
    assert!(
        raw.contains("[::ffff:127.0.0.2]"),
        "the kernel holds them as IPv4-mapped:\n{raw}"
    );

    let series = quiet_equal(
        "timewait_sockets vs ss (IPv4-mapped)",
        || ns.ss_tw_series(&[8081]),
        || daemon.scrape().series_map("timewait_sockets"),
    );
    assert_maps_equal(
        "mapped series",
        &[
            (("inbound".to_string(), "127.0.0.2".to_string(), 8081), 40),
            (("inbound".to_string(), "::1".to_string(), 8081), 30),
        ]
        .into(),
        &series,
    );
}
