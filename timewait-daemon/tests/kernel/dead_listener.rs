//! Issue 12: a server that stopped. Its TIME_WAIT sockets outlive its
//! listener; a daemon started then must still label them inbound on the
//! server's port (not outbound by each client's ephemeral port, one series
//! per socket), and the client-side ones outbound on the remote's port: the
//! port-range rule for minisockets the daemon did not see created.

use crate::support::{Daemon, NetNs, assert_maps_equal, quiet_equal, require_root, v4};

#[test]
fn dead_listener_keeps_direction() {
    if !require_root("dead_listener_keeps_direction") {
        return;
    }
    let ns = NetNs::new();
    let began = std::time::Instant::now();
    let server = ns.listen("127.0.0.1:8080".parse().unwrap());
    let peer = ns.listen("127.0.0.1:9090".parse().unwrap());
    // Few sockets: what is tested is their labels (20 client ports of one
    // remote labelled per port would be 20 series), and in an emulated guest
    // beside other tests the whole test must end well inside the 60 s these
    // TIME_WAIT live (with 150 it once took over a minute there).
    ns.server_closes_first(&server, &[(v4(127, 0, 0, 2), 20), (v4(127, 0, 0, 3), 10)]);
    ns.client_closes_first(&peer, None, 10);
    // Both servers stop: no listener is left in the namespace.
    drop(server);
    drop(peer);
    assert_eq!(ns.ss_tw_total(), 40, "ss shows the sockets the stopped servers left");

    eprintln!("dead_listener: 40 TIME_WAIT made in {:?}", began.elapsed());
    let daemon = Daemon::start(&ns, &[]);
    eprintln!("dead_listener: daemon ready {:?} after the first TIME_WAIT", began.elapsed());
    // ss grouped as the rule says: local port 8080 (outside the ephemeral
    // range) is the service port; the client ends' ephemeral ports are not.
    let series = quiet_equal(
        "TIME_WAIT of stopped servers vs ss",
        || ns.ss_tw_series(&[8080]),
        || daemon.scrape().series_map("timewait_sockets"),
    );
    assert_maps_equal(
        "dead-listener series",
        &[
            (("inbound".to_string(), "127.0.0.2".to_string(), 8080), 20),
            (("inbound".to_string(), "127.0.0.3".to_string(), 8080), 10),
            (("outbound".to_string(), "127.0.0.1".to_string(), 9090), 10),
        ]
        .into(),
        &series,
    );
    assert_eq!(daemon.scrape().series("timewait_sockets").len(), 3, "a handful of series, none per ephemeral port");
    eprintln!("dead_listener: compared {:?} after the first TIME_WAIT", began.elapsed());
}
