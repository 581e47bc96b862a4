//! The walk of the per-socket tables for the time-to-exhaustion estimates, and the estimates a scrape shows.

use std::{
    collections::{HashMap, HashSet},
    time::Duration,
};

use serde::Serialize;
use timewait_common::{AggKey, TwEntry};

use super::{Collector, clock_monotonic_ns};
use crate::{
    kernel::maps::for_each_entry,
    model::aggregate::{AggOptions, Series},
};

/// A walk for the schedule takes at most this share of one core (at
/// 100,000 minisockets a walk reads them all; most ticks then skip it).
const SCHEDULE_SPACING: u32 = 100;
/// However long a walk takes, the schedule is never older than this (the
/// rates would otherwise lag a ramp by more than its window).
const MAX_SCHEDULE_AGE: Duration = Duration::from_secs(5);

/// Time to exhaustion of one outbound series (`model::exhaustion`).
/// Also what `timewaitd top` reads back from the JSON API: every field
/// defaults, so an older or newer daemon still renders.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize)]
#[serde(default)]
pub struct Estimate {
    pub remote: String,
    pub port: u16,
    /// Seconds until the range toward it is used up; `None`: never at this
    /// rate (`+Inf` in the metrics).
    pub seconds_left: Option<f64>,
    /// Ports taken toward it per second lately (`Schedule::rate`).
    pub rate: f64,
    /// Ports its TIME_WAIT free within 10 s and within 60 s.
    pub freed_10s: u64,
    pub freed_60s: u64,
}

impl Collector {
    /// Walks the per-socket tables for the time-to-exhaustion estimates:
    /// when each outbound TIME_WAIT ends, and how many ports were taken
    /// toward each destination lately. Skipped while nothing outbound is
    /// held, and spaced so that it takes at most 1 % of a core.
    pub fn refresh_schedule(&self) {
        let now = clock_monotonic_ns();
        {
            let s = self.schedule.lock().unwrap_or_else(|e| e.into_inner());
            let spacing =
                s.cost.saturating_mul(SCHEDULE_SPACING).clamp(Duration::from_millis(900), MAX_SCHEDULE_AGE);
            if s.at_ns != 0 && Duration::from_nanos(now.saturating_sub(s.at_ns)) < spacing {
                return;
            }
        }
        let outbound = |k: &AggKey| k.direction == timewait_common::DIRECTION_OUTBOUND;
        let any = self.totals.lock().unwrap_or_else(|e| e.into_inner()).gauges.keys().any(outbound);
        let mut cost = Duration::ZERO;
        let mut by_key: HashMap<AggKey, crate::model::exhaustion::Schedule> = HashMap::new();
        if any {
            let window = crate::model::exhaustion::RATE_WINDOW.min(Duration::from_nanos(now.saturating_sub(self.started_ns)));
            let age = |created: u64| Duration::from_nanos(now.saturating_sub(created));
            let dest = |k: &AggKey| AggKey { substate: 0, cgroup: 0, ..*k };
            let walker = self.walker.lock().unwrap_or_else(|e| e.into_inner());
            // The cost is the read's, not the wait for a reconciliation
            // holding the walker (seconds in an emulated guest): counted
            // with it, the spacing grew to minutes and the rates went stale.
            let began = std::time::Instant::now();
            let mut read = |t: &aya::maps::HashMap<aya::maps::MapData, u64, TwEntry>,
                            c: &aya::maps::HashMap<aya::maps::MapData, u64, timewait_common::ConnEntry>| {
                for_each_entry(t, &self.read_errors, |_, e| {
                    if e.counted != 1 || !outbound(&e.key) {
                        return;
                    }
                    let slot = by_key.entry(dest(&e.key)).or_default();
                    // Found by a walk: its creation is unknown, so it is not new.
                    let w = if e.from_snapshot == 1 { Duration::ZERO } else { window };
                    if e.key.substate == timewait_common::TCP_TIME_WAIT {
                        slot.time_wait(age(e.created_ns), w);
                    } else {
                        // FIN_WAIT2: keeps its port until TIME_WAIT follows.
                        slot.connection(age(e.created_ns), w);
                    }
                });
                for_each_entry(c, &self.read_errors, |_, e| {
                    let w = if e.created_ns < self.started_ns { Duration::ZERO } else { window };
                    by_key.entry(dest(&e.key)).or_default().connection(age(e.created_ns), w);
                });
            };
            match (&walker.tw_socks, &walker.conns) {
                (Some(t), Some(c)) => read(t, c),
                _ => {
                    let probes = self.lock();
                    read(&probes.tw_socks, &probes.conns);
                }
            }
            cost = began.elapsed();
        }
        let mut s = self.schedule.lock().unwrap_or_else(|e| e.into_inner());
        (s.at_ns, s.cost, s.by_key) = (now, cost, by_key);
    }

    /// The estimates of the outbound series of this namespace (none without
    /// its port range, or before the first walk). Each real destination
    /// gets its own time to exhaustion (its ports, its rate, its expiry
    /// schedule, against the whole range); a series shows the soonest of
    /// its destinations, and the sums of their rates and expiries.
    pub(super) fn estimates(
        &self,
        counts: &HashMap<AggKey, i64>,
        series: &[Series],
        fold: &crate::model::aggregate::Fold,
        range: Option<u64>,
        opts: &AggOptions,
    ) -> Vec<Estimate> {
        use crate::model::aggregate::{Direction, remote_addr, remote_label};
        let Some(range) = range else { return Vec::new() };
        if opts.per_netns {
            return Vec::new();
        }
        let s = self.schedule.lock().unwrap_or_else(|e| e.into_inner());
        if s.at_ns == 0 {
            return Vec::new();
        }
        let age = Duration::from_nanos(clock_monotonic_ns().saturating_sub(s.at_ns));
        let dest = |k: &AggKey| AggKey { substate: 0, cgroup: 0, ..*k };
        let mut in_use: HashMap<AggKey, u64> = HashMap::new();
        for (k, n) in counts.iter().filter(|(k, _)| k.direction == timewait_common::DIRECTION_OUTBOUND) {
            *in_use.entry(dest(k)).or_default() += u64::try_from(*n).unwrap_or(0);
        }
        // The series that hold ports now get an estimate.
        let mut out: std::collections::BTreeMap<(String, u16), Estimate> = std::collections::BTreeMap::new();
        for x in series.iter().filter(|x| x.direction == Some(Direction::Outbound) && x.netns.is_none()) {
            if x.ports_in_use() > 0 {
                out.entry((x.remote.clone(), x.port)).or_insert_with(|| Estimate {
                    remote: x.remote.clone(),
                    port: x.port,
                    seconds_left: None,
                    rate: 0.0,
                    freed_10s: 0,
                    freed_60s: 0,
                });
            }
        }
        let empty = crate::model::exhaustion::Schedule::default();
        let keys: HashSet<AggKey> = in_use.keys().chain(s.by_key.keys()).copied().collect();
        for k in keys {
            let label = remote_label(remote_addr(&k), opts);
            let Some(e) = out.get_mut(&fold.series_of(None, Direction::Outbound, label, k.port)) else { continue };
            let sched = s.by_key.get(&k).unwrap_or(&empty);
            let rate = sched.rate();
            e.rate += rate;
            e.freed_10s += sched.freed_within(age, 10);
            e.freed_60s += sched.freed_within(age, 60);
            let n = in_use.get(&k).copied().unwrap_or(0);
            if n > 0 {
                let left = crate::model::exhaustion::seconds_left(n, range, rate, sched, age);
                if left.is_finite() {
                    e.seconds_left = Some(e.seconds_left.map_or(left, |l: f64| l.min(left)));
                }
            }
        }
        out.into_values().collect()
    }
}
