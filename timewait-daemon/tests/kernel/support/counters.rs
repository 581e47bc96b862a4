//! Counters never go back (issue 25): each scrape is held against the same daemon's previous one.
//!
//! So each test of the suite, on every kernel and path, also checks that no
//! counter or histogram sample decreased. A series may stop (and then be
//! absent); it may not fall.

use std::collections::BTreeMap;

use crate::support::metrics::Metrics;

/// The counter and histogram samples of the last scrape, by name and labels.
#[derive(Default)]
pub struct Seen {
    last: BTreeMap<(String, BTreeMap<String, String>), f64>,
    scrapes: u64,
}

/// The family a sample belongs to and whether it must only grow: every
/// sample of a counter, the `_bucket`, `_count` and `_sum` of a histogram.
fn monotonic(m: &Metrics, name: &str) -> bool {
    if m.types.get(name).is_some_and(|t| t == "counter") {
        return true;
    }
    ["_bucket", "_count", "_sum"].iter().any(|suffix| {
        name.strip_suffix(suffix).is_some_and(|family| m.types.get(family).is_some_and(|t| t == "histogram"))
    })
}

impl Seen {
    /// Takes scrape `m`; an error names every sample that went back.
    pub fn advance(&mut self, m: &Metrics) -> Result<(), String> {
        let mut now = BTreeMap::new();
        let mut back = Vec::new();
        for (name, labels, v) in m.all() {
            if !monotonic(m, name) {
                continue;
            }
            let key = (name.to_string(), labels.clone());
            if let Some(before) = self.last.get(&key)
                && v < *before
            {
                back.push(format!("{name}{labels:?}: {before} -> {v}"));
            }
            now.insert(key, v);
        }
        self.scrapes += 1;
        // Series that stopped are forgotten: one that comes back may start
        // again (the daemon drops long-idle SYN series; README).
        self.last = now;
        if back.is_empty() {
            Ok(())
        } else {
            Err(format!("counters went back between scrapes {} and {}: {}", self.scrapes - 1, self.scrapes, back.join("; ")))
        }
    }
}

#[test]
fn a_counter_that_falls_is_caught_and_a_gauge_is_not() {
    let text = |syn: u64, gauge: u64, bucket: u64| {
        format!(
            "# TYPE timewait_syn_total counter\ntimewait_syn_total{{remote=\"other\"}} {syn}\n\
             # TYPE timewait_sockets gauge\ntimewait_sockets{{remote=\"a\"}} {gauge}\n\
             # TYPE timewait_lifetime_seconds histogram\ntimewait_lifetime_seconds_bucket{{le=\"1\"}} {bucket}\n"
        )
    };
    let mut seen = Seen::default();
    seen.advance(&Metrics::parse(&text(6, 9, 1))).expect("first scrape");
    seen.advance(&Metrics::parse(&text(6, 2, 1))).expect("a gauge may fall");
    let e = seen.advance(&Metrics::parse(&text(4, 2, 1))).expect_err("6 -> 4 must be caught");
    assert!(e.contains("timewait_syn_total") && e.contains("6 -> 4"), "{e}");
    let e = seen.advance(&Metrics::parse(&text(4, 2, 0))).expect_err("a bucket that falls");
    assert!(e.contains("timewait_lifetime_seconds_bucket"), "{e}");
}
