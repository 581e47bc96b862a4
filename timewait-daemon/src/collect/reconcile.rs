//! Reconciliation: walks of the kernel's socket tables that follow what the programs missed and remove what they lost.

use std::{
    collections::{HashMap, HashSet},
    sync::atomic::Ordering,
};

use timewait_common::{AggKey, IndexKey, IndexVal, TwEntry, counter};

use super::{Collector, clock_monotonic_ns};
use crate::kernel::maps::for_each_entry;

/// What a reconciliation walk left unmarked: entries older than the walk.
struct Unseen {
    tw: HashSet<u64>,
    conns: HashSet<u64>,
}

impl Collector {
    /// One walk of the kernel's socket tables (the eBPF crate's `iter.rs`): follows what the
    /// programs missed and marks what they follow; returns the entries it
    /// did not find that are older than the walk.
    /// The walk itself holds only the walker's lock: scrapes and drains go
    /// on meanwhile.
    fn walk(&self) -> Result<Unseen, crate::kernel::LoadError> {
        let mut walker = self.walker.lock().unwrap_or_else(|e| e.into_inner());
        let (walk, all_netns) = {
            let mut probes = self.lock();
            let walk = probes.epoch.get(&timewait_common::EPOCH_WALK, 0).unwrap_or(0).wrapping_add(1);
            probes
                .epoch
                .set(timewait_common::EPOCH_WALK, walk, 0)
                .map_err(|e| crate::kernel::LoadError::Map("EPOCH", e.to_string()))?;
            (walk, probes.all_netns)
        };
        let began = clock_monotonic_ns();
        let iter = walker.reconcile;
        let Some(ebpf) = walker.ebpf.as_mut() else {
            return Ok(Unseen { tw: HashSet::new(), conns: HashSet::new() });
        };
        crate::kernel::load::run_iter(ebpf, iter)?;
        let looked = match all_netns {
            None => None,
            Some(own) => {
                let mut looked = crate::kernel::netns::Walked::own(own);
                for ns in crate::kernel::netns::other_namespaces(own) {
                    use std::os::unix::fs::MetadataExt as _;
                    // Gone meanwhile: it has no sockets left to find.
                    let Ok(inode) = std::fs::metadata(&ns).map(|m| m.ino() as u32) else { continue };
                    looked.listed.insert(inode);
                    match crate::kernel::netns::in_netns(&ns, || crate::kernel::load::run_iter(ebpf, iter)) {
                        Ok(()) => {
                            looked.walked.insert(inode);
                        }
                        Err(e) => {
                            looked.complete = false;
                            tracing::debug!(netns = %ns.display(), error = %e, "namespace not walked: its entries are kept");
                        }
                    }
                }
                if !looked.complete {
                    self.reconcile.lock().unwrap_or_else(|e| e.into_inner()).netns_skipped += 1;
                }
                Some(looked)
            }
        };
        // Only entries of namespaces this walk looked into (or that are
        // gone) may be taken for ended: one it could not enter keeps them.
        let removable = |netns: u32| looked.as_ref().is_none_or(|w| w.may_remove(netns));
        // Read through the walker's own handles where it has them: reading a
        // million entries takes a while, and scrapes need the probes lock.
        // Only what this walk did not see is kept.
        let (mut tw, mut conns) = (HashSet::new(), HashSet::new());
        let mut read = |t: &aya::maps::HashMap<aya::maps::MapData, u64, TwEntry>,
                        c: &aya::maps::HashMap<aya::maps::MapData, u64, timewait_common::ConnEntry>| {
            for_each_entry(t, &self.read_errors, |timer, e| {
                if e.seen != walk && e.created_ns < began && removable(e.key.netns) {
                    tw.insert(timer);
                }
            });
            for_each_entry(c, &self.read_errors, |sk, e| {
                if e.seen != walk && e.created_ns < began && removable(e.key.netns) {
                    conns.insert(sk);
                }
            });
        };
        match (&walker.tw_socks, &walker.conns) {
            (Some(t), Some(c)) => read(t, c),
            _ => {
                let probes = self.lock();
                read(&probes.tw_socks, &probes.conns);
            }
        }
        drop(walker);
        Ok(Unseen { tw, conns })
    }

    /// Reconciles the per-socket tables with the kernel's own socket tables,
    /// socket by socket: a walk follows every minisocket and active open the
    /// programs missed (a lost creation: counted at once), and an entry that
    /// neither that walk nor a second one right after it found, though it
    /// existed before both began, is one whose end was lost: it is removed
    /// (closed as `other`). Churn cannot fool it: a socket created or gone
    /// during a walk is left alone. Cost: two walks of the namespace's TCP
    /// sockets when something is unseen, one otherwise (BENCHMARKS.md).
    pub fn reconcile(&self) -> Result<u64, crate::kernel::LoadError> {
        let start = std::time::Instant::now();
        let found_before = self.kernel_counter(&self.lock(), counter::RECONCILE_FOUND);
        let result = (|| {
            let first = self.walk()?;
            if first.tw.is_empty() && first.conns.is_empty() {
                return Ok(0);
            }
            let second = self.walk()?;
            let mut probes = self.lock();
            let mut removed = 0;
            let mut t = self.totals.lock().unwrap_or_else(|e| e.into_inner());
            // Removal is the claim (as in the programs' `close`): what we
            // removed, we uncount, directly in the drained gauges.
            for timer in first.tw.intersection(&second.tw) {
                if let Ok(e) = probes.tw_socks.get(timer, 0)
                    && probes.tw_socks.remove(timer).is_ok()
                {
                    if e.counted == 1 {
                        uncount(&mut t.gauges, e.key);
                    }
                    unindex(&mut probes.tw_index, *timer, &e);
                    self.swept[counter::CLOSED_OTHER as usize].fetch_add(1, Ordering::Relaxed);
                    removed += 1;
                }
            }
            for sk in first.conns.intersection(&second.conns) {
                if let Ok(c) = probes.conns.get(sk, 0)
                    && probes.conns.remove(sk).is_ok()
                {
                    uncount(&mut t.gauges, c.key);
                    removed += 1;
                }
            }
            Ok(removed)
        })();
        let found = self.kernel_counter(&self.lock(), counter::RECONCILE_FOUND).saturating_sub(found_before);
        let mut r = self.reconcile.lock().unwrap_or_else(|e| e.into_inner());
        r.runs += 1;
        r.last_micros = start.elapsed().as_micros() as u64;
        match result {
            Ok(removed) => {
                r.corrections += removed + found;
                Ok(removed + found)
            }
            Err(e) => {
                r.errors += 1;
                Err(e)
            }
        }
    }

    /// Whether an event was lost since the last look (a full table, or a
    /// program run the kernel skipped): then reconcile at once.
    pub fn lost_since_last_look(&self) -> bool {
        let probes = self.lock();
        let lost = self.kernel_counter(&probes, counter::LOST);
        let misses: u64 = probes
            .programs
            .iter()
            .filter_map(|(_, fd)| {
                use std::os::fd::AsFd as _;
                crate::kernel::load::recursion_misses(fd.as_fd())
            })
            .sum();
        drop(probes);
        let mut r = self.reconcile.lock().unwrap_or_else(|e| e.into_inner());
        let grew = lost > r.last_lost || misses > r.last_misses;
        if grew {
            tracing::debug!(lost, misses, was_lost = r.last_lost, was_missed = r.last_misses, "events lost: reconciling");
        }
        (r.last_lost, r.last_misses) = (lost, misses);
        grew
    }
}

/// Removes the `TW_INDEX` entry of an entry the reconciliation closed, if it
/// is still that minisocket's (as `unindex` in the eBPF crate's `tw.rs`).
fn unindex(index: &mut aya::maps::HashMap<aya::maps::MapData, IndexKey, IndexVal>, timer: u64, e: &TwEntry) {
    if e.indexed == 0 {
        return;
    }
    let key = e.index_key();
    if index.get(&key, 0).is_ok_and(|v| v.timer == timer && v.created_ns == e.created_ns) {
        let _ = index.remove(&key);
    }
}

/// Takes one away from the drained gauge of `key`.
fn uncount(gauges: &mut HashMap<AggKey, i64>, key: AggKey) {
    let slot = gauges.entry(key).or_default();
    *slot -= 1;
    if *slot == 0 {
        gauges.remove(&key);
    }
}
