//! The collect room: the `Collector` and its locks; one file per job it does on the kernel's maps.
//!
//! - `drain`: every second, moves the delta tables' counts into the totals
//!   (epoch flip, grace period).
//! - `reconcile`: walks of the kernel's socket tables that follow what the
//!   programs missed and remove what they lost.
//! - `schedule`: the walk of the per-socket tables for the time to
//!   exhaustion.
//! - `view`: a scrape's read, the `View` that `http` exposes.
//!
//! Locks: `probes` (the maps) before `totals`, never the reverse; `walker`
//! alone, never with `probes` held. /metrics, drains and walks share these;
//! `/healthz` and the landing page need none of them.

mod drain;
mod reconcile;
pub mod schedule;
pub mod view;

use std::{
    collections::HashMap,
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use timewait_common::{AggKey, ErrKey, LIFETIME_REASONS, LIFETIME_SLOTS, RemoteKey, SynCounts, TwEntry, counter};
use tracing::warn;

use crate::{
    kernel::{load::Probes, maps::second_handle},
    model::syn_ledger::SynLedger,
};

pub struct Collector {
    probes: Mutex<Probes>,
    /// The object, whose iterator programs the reconciliation runs (None:
    /// no walks). Locked alone, never with `probes` held.
    walker: Mutex<Walker>,
    /// Closes the reconciliation made, by `counter::CLOSED_*` index.
    swept: [AtomicU64; counter::COUNT as usize],
    /// Lifetimes of the closes the reconciliation made (layout of `LIFETIME`).
    swept_lifetime: Vec<AtomicU64>,
    /// Map reads that failed (a kernel error, not a lost event).
    pub read_errors: AtomicU64,
    reconcile: Mutex<Reconcile>,
    /// Gauges and per-remote SYN totals drained from the kernel's tables.
    /// Locked after `probes`, never before.
    totals: Mutex<Totals>,
    /// Waits for running programs before a SYN table is drained (None when
    /// the kernel refused the map-in-map: SYN tables are then read in place
    /// and never drained).
    grace: Option<crate::kernel::rcu::GracePeriod>,
    /// Bound of `syns` (`--max-series`).
    max_series: usize,
    /// The expiry schedule and recent ports per outbound destination, from
    /// the last walk of the per-socket tables (`refresh_schedule`).
    schedule: Mutex<Schedules>,
    /// When the collector took over (after the start-up snapshot): sockets
    /// recorded before are not counted as new ports.
    started_ns: u64,
    /// Cgroup names, with `--attribute-cgroups`.
    cgroups: Option<Mutex<crate::model::cgroups::Names>>,
    /// Copies of what the loader attached: they never change after load, so
    /// the landing page and /metrics read them without the probes lock
    /// (which a stuck drain may hold).
    hooks: Vec<(String, bool)>,
    signals: Vec<crate::kernel::paths::SignalPath>,
    /// `clock_monotonic_ns()` of the last drain that looked at the kernel's
    /// tables and finished (moving something or finding nothing to move).
    drained_ns: AtomicU64,
    /// What of each `CONNECT_ERRORS` key each connect-errors series shows.
    error_ledger: Mutex<crate::model::error_ledger::Ledger<ErrKey, ErrLabel>>,
}

/// Labels of a `timewait_connect_errors_total` series: errno, comm, cgroup
/// (with attribution), remote and port (of a connect(), with attribution).
type ErrLabel = (&'static str, String, Option<String>, String, u16);

/// The last walk for the time-to-exhaustion estimates.
#[derive(Default)]
struct Schedules {
    /// `clock_monotonic_ns()` at the walk; 0 before the first.
    at_ns: u64,
    /// What the walk took: the next one waits `SCHEDULE_SPACING` times that.
    cost: Duration,
    /// Per raw key of an outbound destination (substate ignored).
    by_key: HashMap<AggKey, crate::model::exhaustion::Schedule>,
}

/// State of the reconciliation against the kernel's socket tables.
#[derive(Default)]
struct Reconcile {
    runs: u64,
    errors: u64,
    corrections: u64,
    last_micros: u64,
    /// `counter::LOST` and the programs' recursion misses at the last look:
    /// when either grows, an event was lost and a reconciliation runs at once.
    last_lost: u64,
    last_misses: u64,
    /// Walks (with `--all-netns`) that could not enter some namespace.
    netns_skipped: u64,
}

/// What the drains moved out of the kernel: the gauges (keys at 0 are
/// dropped) and the per-remote SYN counts, which go to the ledger at the
/// next read.
#[derive(Default)]
struct Totals {
    gauges: HashMap<AggKey, i64>,
    /// SYNs drained and not yet in the ledger (beyond the bound, the
    /// smallest fold into `other`).
    syn_pending: HashMap<RemoteKey, SynCounts>,
    /// Per SYN table (by index): what of each key's count a read has
    /// already put in the ledger. Cleared when that table is drained.
    syn_seen: [HashMap<RemoteKey, SynCounts>; 2],
    /// The SYN counter series (`SynLedger`: they never go back).
    ledger: SynLedger,
    drains: u64,
}

fn clock_monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: ts is a valid timespec to write; CLOCK_MONOTONIC is the clock of
    // bpf_ktime_get_ns().
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64
}

/// What the reconciliation walks use, apart from the probes: the object
/// (its iterator programs) and handles of their own on the per-socket tables.
struct Walker {
    ebpf: Option<aya::Ebpf>,
    /// The reconciliation iterator of the lifecycle attached.
    reconcile: &'static str,
    tw_socks: Option<aya::maps::HashMap<aya::maps::MapData, u64, TwEntry>>,
    conns: Option<aya::maps::HashMap<aya::maps::MapData, u64, timewait_common::ConnEntry>>,
}

impl Collector {
    pub fn new(mut probes: Probes, max_series: u32) -> Self {
        let cgroups = probes.attribute_cgroups.then(|| {
            let names = crate::model::cgroups::Names::new();
            if names.root().is_none() {
                warn!("no cgroup2 hierarchy found (/proc/self/mountinfo, /proc/1/mountinfo): cgroups are shown by id");
            }
            Mutex::new(names)
        });
        let walker = Mutex::new(Walker {
            ebpf: probes.ebpf.take(),
            reconcile: probes.walks.reconcile,
            tw_socks: second_handle(&probes.tw_socks),
            conns: second_handle(&probes.conns),
        });
        let grace = match crate::kernel::rcu::GracePeriod::new() {
            Ok(g) => Some(g),
            Err(e) => {
                warn!(error = %e, "no map-in-map: the kernel's gauge and SYN tables are not drained and can fill");
                None
            }
        };
        let (hooks, signals) = (probes.hooks.clone(), probes.signals.clone());
        Self {
            probes: Mutex::new(probes),
            walker,
            swept: std::array::from_fn(|_| AtomicU64::new(0)),
            swept_lifetime: (0..LIFETIME_REASONS * LIFETIME_SLOTS).map(|_| AtomicU64::new(0)).collect(),
            read_errors: AtomicU64::new(0),
            reconcile: Mutex::new(Reconcile::default()),
            totals: Mutex::new(Totals::default()),
            grace,
            max_series: max_series as usize,
            schedule: Mutex::new(Schedules::default()),
            started_ns: clock_monotonic_ns(),
            cgroups,
            hooks,
            signals,
            drained_ns: AtomicU64::new(clock_monotonic_ns()),
            error_ledger: Mutex::new(crate::model::error_ledger::Ledger::default()),
        }
    }

    fn kernel_counter(&self, probes: &Probes, idx: u32) -> u64 {
        match probes.counters.get(&0, 0) {
            Ok(per_cpu) => per_cpu.iter().map(|c| c[idx as usize]).sum(),
            Err(_) => {
                self.read_errors.fetch_add(1, Ordering::Relaxed);
                0
            }
        }
    }

    pub fn hooks(&self) -> &[(String, bool)] {
        &self.hooks
    }

    pub fn signals(&self) -> &[crate::kernel::paths::SignalPath] {
        &self.signals
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Probes> {
        // A panic while holding the lock leaves maps that are still valid.
        self.probes.lock().unwrap_or_else(|e| e.into_inner())
    }
}
