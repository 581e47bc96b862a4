//! Reads the kernel's maps at scrape time, and resolves kills that nothing in
//! the kernel resolved (the sweeper).

use std::{
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use serde::Serialize;
use timewait_common::{TW_CANCELLED, TwEntry, counter};
use tracing::warn;

use crate::{
    aggregate::{AggOptions, Series, aggregate},
    loader::Probes,
};

/// Reasons a minisocket ends, in the order of `counter::CLOSED_*`.
pub const REASONS: [(&str, u32); 5] = [
    ("expired", counter::CLOSED_EXPIRED),
    ("reused_by_syn", counter::CLOSED_REUSED_BY_SYN),
    ("reused_by_connect", counter::CLOSED_REUSED_BY_CONNECT),
    ("reset", counter::CLOSED_RESET),
    ("other", counter::CLOSED_OTHER),
];

/// How long after a timer cancel with no re-arm and no expiry following it the
/// sweeper calls it a kill. A re-arm's start follows its cancel inside one
/// locked section and an expiry's handler within the same softirq, i.e.
/// microseconds: this is a bound on scheduling, not a guess at the reason.
pub const KILL_GRACE: Duration = Duration::from_millis(100);

#[derive(Debug, Clone, Default, Serialize)]
pub struct Counters {
    pub created_inbound: u64,
    pub created_outbound: u64,
    /// By reason, as in `REASONS`.
    pub closed: [u64; 5],
    pub lost: u64,
    pub snapshot: u64,
    pub snapshot_listeners: u64,
    pub substate_changes: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct View {
    pub series: Vec<Series>,
    pub counters: Counters,
}

pub struct Collector {
    probes: Mutex<Probes>,
    /// Closes the sweeper resolved, by `counter::CLOSED_*` index.
    swept: [AtomicU64; counter::COUNT as usize],
    /// Map reads that failed (a kernel error, not a lost event).
    pub read_errors: AtomicU64,
}

fn clock_monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: ts is a valid timespec to write; CLOCK_MONOTONIC is the clock of
    // bpf_ktime_get_ns().
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64
}

impl Collector {
    pub fn new(probes: Probes) -> Self {
        Self {
            probes: Mutex::new(probes),
            swept: std::array::from_fn(|_| AtomicU64::new(0)),
            read_errors: AtomicU64::new(0),
        }
    }

    pub fn hooks(&self) -> Vec<(&'static str, bool)> {
        self.lock().hooks.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Probes> {
        // A panic while holding the lock leaves maps that are still valid.
        self.probes.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// One consistent read of everything the metrics show.
    pub fn read(&self, opts: &AggOptions) -> View {
        let probes = self.lock();
        let mut raw = Vec::new();
        for item in probes.counts.iter() {
            match item {
                Ok(kv) => raw.push(kv),
                // A key deleted between get_next_key and lookup: harmless.
                Err(aya::maps::MapError::KeyNotFound) => {}
                Err(_) => {
                    self.read_errors.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        let sum = |idx: u32| -> u64 {
            let kernel = match probes.counters.get(&idx, 0) {
                Ok(values) => values.iter().sum::<u64>(),
                Err(_) => {
                    self.read_errors.fetch_add(1, Ordering::Relaxed);
                    0
                }
            };
            kernel + self.swept[idx as usize].load(Ordering::Relaxed)
        };
        let counters = Counters {
            created_inbound: sum(counter::CREATED_INBOUND),
            created_outbound: sum(counter::CREATED_OUTBOUND),
            closed: REASONS.map(|(_, idx)| sum(idx)),
            lost: sum(counter::LOST),
            snapshot: sum(counter::SNAPSHOT),
            snapshot_listeners: sum(counter::SNAPSHOT_LISTENERS),
            substate_changes: sum(counter::SUBSTATE_CHANGES),
        };
        drop(probes);
        View { series: aggregate(raw, opts), counters }
    }

    /// Resolves cancels that neither a re-arm, an expiry nor a reuse of the
    /// memory followed within `KILL_GRACE`: the minisocket was killed. Removal
    /// from TW_SOCKS is the claim, so a kernel program resolving the same
    /// minisocket at the same moment cannot make it count twice.
    pub fn sweep(&self) -> usize {
        let mut probes = self.lock();
        let now = clock_monotonic_ns();
        let grace = KILL_GRACE.as_nanos() as u64;
        let due: Vec<(u64, u64)> = probes
            .pending
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, at)| now.saturating_sub(*at) >= grace)
            .collect();
        let mut resolved = 0;
        for (timer, cancelled_at) in due {
            let entry: Option<TwEntry> = probes.tw_socks.get(&timer, 0).ok();
            if let Some(e) = entry
                && e.state == TW_CANCELLED
                && e.cancel_ns == cancelled_at
                && probes.tw_socks.remove(&timer).is_ok()
            {
                let reason = if e.hint == timewait_common::HINT_RESET {
                    counter::CLOSED_RESET
                } else {
                    counter::CLOSED_OTHER
                };
                self.swept[reason as usize].fetch_add(1, Ordering::Relaxed);
                resolved += 1;
            }
            // Only if it is still this cancel: a re-arm and a new cancel may
            // have replaced it meanwhile.
            if probes.pending.get(&timer, 0).ok() == Some(cancelled_at)
                && let Err(e) = probes.pending.remove(&timer)
                && !matches!(e, aya::maps::MapError::KeyNotFound)
            {
                warn!(error = %e, "removing a resolved pending cancel failed");
            }
        }
        resolved
    }
}
