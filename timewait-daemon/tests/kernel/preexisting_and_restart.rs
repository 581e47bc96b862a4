//! Issue 2, test 5: sockets already in TIME_WAIT when the daemon starts are
//! counted; a daemon killed mid-churn and started again is exact again at the
//! next quiet moment.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use crate::support::{
    Daemon, NetNs, assert_maps_equal, quiet_equal, require_root, server_closes_first, v4,
    wait_until,
};

#[test]
fn preexisting_and_restart() {
    if !require_root("preexisting_and_restart") {
        return;
    }
    let ns = NetNs::new();
    let listener = ns.listen("127.0.0.1:8080".parse().unwrap());

    // Before any daemon: 150 server-side and 60 client-side TIME_WAIT.
    let peer = ns.listen("127.0.0.1:9090".parse().unwrap());
    ns.server_closes_first(
        &listener,
        &[(v4(127, 0, 0, 2), 100), (v4(127, 0, 0, 3), 50)],
    );
    ns.client_closes_first(&peer, None, 60);
    assert_eq!(ns.ss_tw_total(), 210, "ss shows the pre-existing sockets");

    let daemon = Daemon::start(&ns, &[]);
    let series = quiet_equal(
        "pre-existing TIME_WAIT vs ss once ready",
        || ns.ss_tw_series(&[8080, 9090]),
        || daemon.scrape().series_map("timewait_sockets"),
    );
    assert_maps_equal(
        "pre-existing series",
        &[
            (("inbound".to_string(), "127.0.0.2".to_string(), 8080), 100),
            (("inbound".to_string(), "127.0.0.3".to_string(), 8080), 50),
            (("outbound".to_string(), "127.0.0.1".to_string(), 9090), 60),
        ]
        .into(),
        &series,
    );

    // Churn: server-side TIME_WAIT created continuously in the background.
    let listener = Arc::new(listener);
    let stop = Arc::new(AtomicBool::new(false));
    let made = Arc::new(AtomicUsize::new(0));
    let churn = {
        let (listener, stop, made) = (listener.clone(), stop.clone(), made.clone());
        ns.spawn(move || {
            let remotes = [
                (v4(127, 0, 0, 4), 10),
                (v4(127, 0, 0, 5), 5),
                (v4(127, 0, 0, 6), 5),
            ];
            while !stop.load(Ordering::Relaxed) {
                server_closes_first(&listener, &remotes);
                made.fetch_add(20, Ordering::Relaxed);
                // Rate limit (about 1,000 a second), not a readiness wait.
                thread::sleep(Duration::from_millis(20));
            }
        })
    };
    wait_until(Duration::from_secs(10), "churn under way", || {
        made.load(Ordering::Relaxed) >= 200
    });

    let killed_at = made.load(Ordering::Relaxed);
    daemon.kill9();
    let t = Instant::now();
    let daemon = Daemon::start(&ns, &[]);
    let restarted_at = made.load(Ordering::Relaxed);
    eprintln!(
        "restart took {:?}; churn made {} connections while no daemon ran",
        t.elapsed(),
        restarted_at - killed_at
    );
    // Keep churning a moment after the new daemon is ready.
    wait_until(Duration::from_secs(10), "churn after restart", || {
        made.load(Ordering::Relaxed) >= restarted_at + 300
    });
    stop.store(true, Ordering::Relaxed);
    churn.join().expect("churn thread");
    ns.wait_settled();
    eprintln!(
        "churn made {} connections in all",
        made.load(Ordering::Relaxed)
    );

    let series = quiet_equal(
        "after the restart mid-churn vs ss",
        || ns.ss_tw_series(&[8080, 9090]),
        || daemon.scrape().series_map("timewait_sockets"),
    );
    let total: u64 = series.values().sum();
    assert!(
        total >= 210 + 500,
        "ss shows the churn's sockets too ({total})"
    );
    let m = daemon.scrape();
    assert_eq!(
        m.count("timewait_events_lost_total", &[]),
        0,
        "no events lost"
    );
    daemon.stop();
}
