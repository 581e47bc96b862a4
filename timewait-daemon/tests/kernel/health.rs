//! Issue 25 part 5: a hung daemon must not look healthy.
//!
//! How the drain is made to stall: the daemon reads a test-only variable,
//! `TIMEWAITD_TEST_STALL_DRAIN=SECS`, once at start; its first drain then
//! takes the lock a drain holds (the probes lock, which `/metrics` needs
//! too) and sleeps SECS seconds with it, as a drain stuck in a map syscall
//! would. Nothing else changes: the tick task is really blocked, no drain or
//! walk runs meanwhile. `/healthz` must then fail with its reason once the
//! last drain is over 30 s old, `GET /` must still answer at once (it used
//! to wait for that lock on the 2-thread runtime), and all must be well
//! again when the drain goes on.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::support::{Daemon, NetNs, WEB_ADDR, http_get, require_root, wait_until};

/// How long the knob stalls the first drain: past /healthz's 30 s limit.
const STALL_SECS: u64 = 40;

#[test]
fn stalled_drain_fails_healthz() {
    if !require_root("stalled_drain_fails_healthz") {
        return;
    }
    let ns = NetNs::new();
    // --probe-path given: Daemon::start then checks the paths with no
    // scrape, which the stall (from 1 s after ready) would block.
    let path = crate::support::test_probe_path();
    let d = Daemon::start_with_env(
        &ns,
        &["--probe-path", &path],
        &[("TIMEWAITD_TEST_STALL_DRAIN", &STALL_SECS.to_string())],
    );
    let log = std::fs::read_to_string(&d.log).unwrap_or_default();
    if log.contains("no map-in-map") {
        // Without map-in-map nothing is drained, and /healthz never fails on it.
        eprintln!("SKIPPED stalled_drain_fails_healthz: this kernel has no map-in-map, so no drains to stall");
        let (code, _) = d.get("/healthz");
        assert_eq!(code, 200, "without drains /healthz stays 200");
        return;
    }
    let addr: SocketAddr = WEB_ADDR.parse().unwrap();
    let timed = |path: &str| {
        let t = Instant::now();
        let r = ns.run(|| http_get(addr, path)).unwrap_or_else(|e| panic!("GET {path}: {e}\n{}", d.log_tail()));
        (r.0, r.1, t.elapsed())
    };
    assert_eq!(timed("/healthz").0, 200, "healthy right after start");

    // The stall starts at the first tick (1 s after ready); /healthz fails
    // once the last drain is more than 30 s old.
    let started = Instant::now();
    let mut unhealthy = String::new();
    wait_until(Duration::from_secs(STALL_SECS), "/healthz to fail while the drain is stalled", || {
        let (code, body, _) = timed("/healthz");
        unhealthy = body;
        code == 503
    });
    eprintln!("/healthz failed {:?} into the stall: {}", started.elapsed(), unhealthy.trim());
    assert!(
        unhealthy.contains("last drained") && unhealthy.contains("stuck") && unhealthy.trim().lines().count() == 1,
        "one line saying why: {unhealthy:?}"
    );

    // Meanwhile (the drain still holds its lock) the landing page, /healthz
    // and /readyz answer at once.
    for path in ["/", "/healthz", "/readyz", "/"] {
        let (code, body, took) = timed(path);
        eprintln!("GET {path} during the stall: {code} in {took:?}");
        assert!(took < Duration::from_secs(1), "GET {path} took {took:?} while the drain was stalled");
        match path {
            "/" => assert!(code == 200 && body.contains("timewaitd") && body.contains("attached"), "{code} {body}"),
            "/healthz" => assert_eq!(code, 503, "{body}"),
            _ => assert_eq!(code, 200, "{body}"),
        }
    }

    // The drain goes on: healthy again, and the age is small.
    wait_until(Duration::from_secs(STALL_SECS), "/healthz to recover once the drain goes on", || {
        timed("/healthz").0 == 200
    });
    eprintln!("/healthz recovered {:?} after the stall began", started.elapsed());
    let m = d.scrape();
    let age = m.get("timewait_last_drain_age_seconds", &[]).expect("timewait_last_drain_age_seconds exported");
    assert!(age < 5.0, "last drain {age} s ago after the stall ended");
    d.stop();
}
