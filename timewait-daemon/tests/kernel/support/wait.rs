//! Bounded waits, and the "same quiet moment" comparison of what `ss` shows with what the daemon says.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::thread;
use std::time::{Duration, Instant};

use crate::support::matrix::emulated;

/// How long the "same quiet moment" comparison keeps retrying.
pub const QUIET_TIMEOUT: Duration = Duration::from_secs(20);

/// A wait bound, 3x wider in an emulated guest of the kernel matrix (TCG
/// runs the workloads 10-30x slower; seen: 25 loopback connections not in
/// TIME_WAIT within 10 s on a loaded host).
pub fn scaled(d: Duration) -> Duration {
    if emulated() { d * 3 } else { d }
}

/// Polls `cond` every 50 ms until it holds; panics with `what` after `timeout`.
#[track_caller]
pub fn wait_until(timeout: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let timeout = scaled(timeout);
    let start = Instant::now();
    loop {
        if cond() {
            return;
        }
        if start.elapsed() >= timeout {
            panic!("timed out after {timeout:?} waiting for: {what}");
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// The "same quiet moment" comparison: read `ss`, read the metrics, read `ss`
/// again; accept when both `ss` readings agree and equal the metric reading.
/// Retries for [`QUIET_TIMEOUT`], then panics printing both sides. Returns the
/// agreed value.
#[track_caller]
pub fn quiet_equal<T: PartialEq + Debug>(
    what: &str,
    from_ss: impl FnMut() -> T,
    from_metrics: impl FnMut() -> T,
) -> T {
    quiet_equal_within(what, scaled(QUIET_TIMEOUT), from_ss, from_metrics).0
}

/// [`quiet_equal`] with its own time bound; also returns how long it took.
/// A failure message shows each map cut to 3,000 characters (a daemon that
/// made one series per socket would print tens of thousands).
#[track_caller]
pub fn quiet_equal_within<T: PartialEq + Debug>(
    what: &str,
    timeout: Duration,
    mut from_ss: impl FnMut() -> T,
    mut from_metrics: impl FnMut() -> T,
) -> (T, Duration) {
    let start = Instant::now();
    let mut tries = 0u32;
    // When the last disagreement was printed: the first one, then one every
    // 5 s, so a slow agreement shows in the log what the two sides said.
    let mut shown: Option<Instant> = None;
    loop {
        tries += 1;
        let before = from_ss();
        let metric = from_metrics();
        let after = from_ss();
        if before != metric && shown.is_none_or(|t| t.elapsed() >= Duration::from_secs(5)) {
            shown = Some(Instant::now());
            eprintln!(
                "quiet_equal {what}: reading {tries} at {:?} differs: ss {} / metrics {}",
                start.elapsed(),
                cut(&before, 400),
                cut(&metric, 400)
            );
        }
        if before == after && before == metric {
            eprintln!(
                "quiet_equal {what}: agreed after {tries} reading(s), {:?}: {}",
                start.elapsed(),
                cut(&metric, 400)
            );
            return (metric, start.elapsed());
        }
        if start.elapsed() >= timeout {
            panic!(
                "{what}: ss and metrics never agreed at a quiet moment in {timeout:?} \
                 ({tries} readings)\n  ss before: {}\n  metrics:   {}\n  \
                 ss after:  {}",
                cut(&before, 3000),
                cut(&metric, 3000),
                cut(&after, 3000)
            );
        }
        thread::sleep(Duration::from_millis(200));
    }
}

fn cut<T: Debug>(v: &T, at: usize) -> String {
    let s = format!("{v:?}");
    if s.len() > at { format!("{}... ({} chars)", &s[..at], s.len()) } else { s }
}

/// Panics listing exactly which keys differ between two count maps.
#[track_caller]
pub fn assert_maps_equal<K: Ord + Debug>(
    what: &str,
    expected: &BTreeMap<K, u64>,
    actual: &BTreeMap<K, u64>,
) {
    if expected == actual {
        return;
    }
    let mut diff = String::new();
    for (k, e) in expected {
        match actual.get(k) {
            Some(a) if a == e => {}
            other => diff.push_str(&format!("\n  {k:?}: expected {e}, got {other:?}")),
        }
    }
    for (k, a) in actual {
        if !expected.contains_key(k) {
            diff.push_str(&format!("\n  {k:?}: expected nothing, got {a}"));
        }
    }
    panic!("{what}: maps differ:{diff}");
}
