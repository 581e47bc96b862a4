//! Draining the kernel's delta tables every second: flip the epoch, wait a grace period, move the counts.

use std::{sync::atomic::Ordering, time::Duration};

use tracing::warn;

use super::{Collector, clock_monotonic_ns};
use crate::{
    kernel::maps::read_all,
    model::syn_ledger::{fold_smallest, syn_delta},
};

impl Collector {
    /// Moves the gauge changes and per-remote SYN counts out of the kernel:
    /// flip the pair of tables the programs write, wait until none still
    /// writes the old pair (an RCU grace period, `kernel/rcu.rs`), then read the old
    /// tables and delete their keys. Nothing writes them any more, so the
    /// deletes lose no increment, and a key stays in the kernel about a
    /// second at most. Beyond `--max-series` / 2 remotes, the smallest SYN
    /// totals fold into `other`.
    pub fn drain(&self) {
        let Some(grace) = &self.grace else { return };
        let mut probes = self.lock();
        let epoch = probes.epoch.get(&timewait_common::EPOCH_TABLES, 0).unwrap_or(0);
        let current = (epoch & 1) as usize;
        // Nothing written since the last drain: nothing to do (a look all
        // the same: the drain is not behind).
        if probes.counts[current].keys().next().is_none() && probes.syns[current].keys().next().is_none() {
            self.drained_ns.store(clock_monotonic_ns(), Ordering::Relaxed);
            return;
        }
        if let Err(e) = probes.epoch.set(timewait_common::EPOCH_TABLES, epoch.wrapping_add(1), 0) {
            warn!(error = %e, "flipping the kernel's tables failed");
            return;
        }
        // Not under the lock: the grace period takes milliseconds, and a
        // scrape meanwhile reads the totals and both tables, whose changes
        // have not moved yet (only drains move them, one at a time, from the
        // tick task). Reconciliations only take from the totals.
        drop(probes);
        let waited = grace.wait();
        let mut probes = self.lock();
        if let Err(e) = waited {
            // Not drained this time; the other pair gets drained next time
            // only once this wait has succeeded: flip back.
            warn!(error = %e, "waiting for running programs failed; the tables are drained at the next tick");
            let _ = probes.epoch.set(timewait_common::EPOCH_TABLES, epoch, 0);
            return;
        }
        let counts = read_all(&probes.counts[current], &self.read_errors);
        let syns = read_all(&probes.syns[current], &self.read_errors);
        let mut t = self.totals.lock().unwrap_or_else(|e| e.into_inner());
        for (k, d) in &counts {
            let slot = t.gauges.entry(*k).or_default();
            *slot += d;
            if *slot == 0 {
                t.gauges.remove(k);
            }
        }
        // What a read already put in the ledger is not pending again.
        let mut seen = std::mem::take(&mut t.syn_seen[current]);
        for (k, v) in &syns {
            let d = syn_delta(*v, seen.remove(k).unwrap_or_default());
            let slot = t.syn_pending.entry(*k).or_default();
            slot.total += d.total;
            slot.rejected += d.rejected;
        }
        // Only now that they are counted: the kernel's copies go.
        for (k, _) in &counts {
            if let Err(e) = probes.counts[current].remove(k)
                && !matches!(e, aya::maps::MapError::KeyNotFound)
            {
                self.read_errors.fetch_add(1, Ordering::Relaxed);
            }
        }
        for (k, _) in &syns {
            if let Err(e) = probes.syns[current].remove(k)
                && !matches!(e, aya::maps::MapError::KeyNotFound)
            {
                self.read_errors.fetch_add(1, Ordering::Relaxed);
            }
        }
        t.drains += 1;
        self.drained_ns.store(clock_monotonic_ns(), Ordering::Relaxed);
        let bound = crate::kernel::load::syn_capacity(self.max_series as u32) as usize;
        if t.syn_pending.len() > bound {
            fold_smallest(&mut t.syn_pending, bound * 3 / 4);
        }
    }

    /// How long ago the last drain finished looking at the kernel's tables;
    /// None when they are never drained (no map-in-map: nothing can fall
    /// behind).
    pub fn last_drain_age(&self) -> Option<Duration> {
        self.grace.as_ref()?;
        let at = self.drained_ns.load(Ordering::Relaxed);
        Some(Duration::from_nanos(clock_monotonic_ns().saturating_sub(at)))
    }

    /// Test knob (`TIMEWAITD_TEST_STALL_DRAIN`, run.rs): holds the lock a
    /// drain holds for `d`, as a drain stuck in a map syscall would.
    pub fn stall_holding_lock(&self, d: Duration) {
        let _probes = self.lock();
        std::thread::sleep(d);
    }
}
