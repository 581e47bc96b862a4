//! Reads the kernel's maps at scrape time, and closes what the kernel side
//! lost (the reconciliation).

use std::{
    collections::{HashMap, HashSet},
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use serde::Serialize;
use timewait_common::{
    AggKey, EADDRINUSE, ErrKey, LIFETIME_BUCKETS_NS, LIFETIME_REASONS, LIFETIME_SLOTS, IndexKey, IndexVal, RemoteKey, SynCounts,
    TwEntry, counter,
};
use tracing::warn;

use crate::{
    model::{
        aggregate::{AggOptions, Series, aggregate},
        ratios::{InboundRatio, Worst, worst_ratios},
        syn_ledger::{SynLedger, SynSeries, fold_smallest, syn_delta},
    },
    kernel::{
        load::Probes,
        maps::{for_each_entry, read_all, second_handle},
        procfs,
    },
};

/// Reasons a minisocket ends, in the order of `counter::CLOSED_*`.
pub const REASONS: [(&str, u32); 5] = [
    ("expired", counter::CLOSED_EXPIRED),
    ("reused_by_syn", counter::CLOSED_REUSED_BY_SYN),
    ("reused_by_connect", counter::CLOSED_REUSED_BY_CONNECT),
    ("reset", counter::CLOSED_RESET),
    ("other", counter::CLOSED_OTHER),
];

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
    /// Minisockets whose direction the connection's history corrected.
    pub direction_from_history: u64,
    /// Minisockets told from another CPU's event before their creation was.
    pub out_of_order: u64,
    /// Segments dropped by minisockets, as in `SEGMENT_KINDS`.
    pub segments: [u64; 5],
    pub reconcile_runs: u64,
    pub reconcile_errors: u64,
    /// Sum of |change| of the corrections applied.
    pub reconcile_corrections: u64,
    pub reconcile_last_micros: u64,
    /// Walks that could not enter some network namespace (`--all-netns`):
    /// that namespace's entries were kept as they were.
    pub reconcile_netns_skipped: u64,
    /// What the last walk for the time-to-exhaustion schedule took.
    pub schedule_walk_micros: u64,
    /// Program runs the kernel skipped (recursion on a CPU), per program. Not
    /// in `lost`: most skipped runs are of hooks on unrelated timers and
    /// sockets; reconciliation heals the ones that mattered.
    pub recursion_misses: Vec<(String, u64)>,
}

/// Segment kinds, in the order of `counter::SEG_*`.
pub const SEGMENT_KINDS: [(&str, u32); 5] = [
    ("ack", counter::SEG_ACK),
    ("fin", counter::SEG_FIN),
    ("rst", counter::SEG_RST),
    ("syn", counter::SEG_SYN),
    ("data", counter::SEG_DATA),
];

/// One lifetime histogram: cumulative counts per `LIFETIME_BUCKETS_NS` bound.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Lifetime {
    pub reason: &'static str,
    pub cumulative: Vec<u64>,
    pub count: u64,
    pub sum_seconds: f64,
}

/// Failed connect()/bind() calls by errno and process name (and, with
/// `--attribute-cgroups`, cgroup and destination).
#[derive(Debug, Clone, Serialize)]
pub struct ConnectErrors {
    pub errno: &'static str,
    pub comm: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<String>,
    /// The destination of a failed connect() ("" for a bind(), or off).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub remote: String,
    pub port: u16,
    pub count: u64,
}

/// The namespace's own settings and counters, read at each scrape (so a
/// changed sysctl shows at the next one).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Sysctls {
    pub max_buckets: Option<u64>,
    pub local_port_range_size: Option<u64>,
    /// TcpExtTCPTimeWaitOverflow.
    pub overflow: Option<u64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct View {
    pub series: Vec<Series>,
    pub syns: Vec<SynSeries>,
    pub counters: Counters,
    pub lifetimes: Vec<Lifetime>,
    pub connect_errors: Vec<ConnectErrors>,
    pub sysctls: Sysctls,
    /// Time to exhaustion per outbound series of this namespace.
    pub estimates: Vec<Estimate>,
    /// Per outbound series of this namespace, the port-exhaustion ratio of
    /// its busiest real destination (never of the series' sum).
    pub ratios: Vec<Worst>,
    /// Per remote series (inbound), the inbound ratio of its busiest real
    /// remote address.
    pub inbound_ratios: Vec<InboundRatio>,
}

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

/// Per errno, the process names with the most errors that keep a series of
/// their own; the rest are shown as `comm="other"`.
pub const TOP_COMMS: usize = 20;

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

/// A walk for the schedule takes at most this share of one core (at
/// 100,000 minisockets a walk reads them all; most ticks then skip it).
const SCHEDULE_SPACING: u32 = 100;
/// However long a walk takes, the schedule is never older than this (the
/// rates would otherwise lag a ramp by more than its window).
const MAX_SCHEDULE_AGE: Duration = Duration::from_secs(5);

/// Time to exhaustion of one outbound series (`crate::exhaustion`).
#[derive(Debug, Clone, Serialize)]
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
    tw_socks: Option<aya::maps::HashMap<aya::maps::MapData, u64, TwEntry>>,
    conns: Option<aya::maps::HashMap<aya::maps::MapData, u64, timewait_common::ConnEntry>>,
}

/// What a reconciliation walk left unmarked: entries older than the walk.
struct Unseen {
    tw: HashSet<u64>,
    conns: HashSet<u64>,
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
    fn estimates(
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

    /// The gauges: what the drains moved out plus what both delta tables
    /// hold now. Called with the probes lock held, which a drain holds while
    /// it moves changes from a table into the totals: each change is seen
    /// exactly once.
    fn raw_counts(&self, probes: &Probes) -> HashMap<AggKey, i64> {
        let mut raw = self.totals.lock().unwrap_or_else(|e| e.into_inner()).gauges.clone();
        for table in &probes.counts {
            for (k, d) in read_all(table, &self.read_errors) {
                *raw.entry(k).or_default() += d;
            }
        }
        raw
    }

    /// One walk of the kernel's socket tables (`iter.rs`): follows what the
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
        let Some(ebpf) = walker.ebpf.as_mut() else {
            return Ok(Unseen { tw: HashSet::new(), conns: HashSet::new() });
        };
        crate::kernel::load::run_iter(ebpf, "iter_reconcile")?;
        let looked = match all_netns {
            None => None,
            Some(own) => {
                let mut looked = crate::kernel::netns::Walked::own(own);
                for ns in crate::kernel::netns::other_namespaces(own) {
                    use std::os::unix::fs::MetadataExt as _;
                    // Gone meanwhile: it has no sockets left to find.
                    let Ok(inode) = std::fs::metadata(&ns).map(|m| m.ino() as u32) else { continue };
                    looked.listed.insert(inode);
                    match crate::kernel::netns::in_netns(&ns, || crate::kernel::load::run_iter(ebpf, "iter_reconcile")) {
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

    fn kernel_counter(&self, probes: &Probes, idx: u32) -> u64 {
        match probes.counters.get(&0, 0) {
            Ok(per_cpu) => per_cpu.iter().map(|c| c[idx as usize]).sum(),
            Err(_) => {
                self.read_errors.fetch_add(1, Ordering::Relaxed);
                0
            }
        }
    }

    /// Moves the gauge changes and per-remote SYN counts out of the kernel:
    /// flip the pair of tables the programs write, wait until none still
    /// writes the old pair (an RCU grace period, `rcu.rs`), then read the old
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

    /// One consistent read of everything the metrics show.
    pub fn read(&self, opts: &AggOptions) -> View {
        let rec = {
            let r = self.reconcile.lock().unwrap_or_else(|e| e.into_inner());
            (r.runs, r.errors, r.corrections, r.last_micros, r.netns_skipped)
        };
        let probes = self.lock();
        let counts = self.raw_counts(&probes);
        // One per-CPU entry holds every counter: sum the CPUs' copies.
        let kernel: Vec<u64> = match probes.counters.get(&0, 0) {
            Ok(per_cpu) => (0..counter::COUNT as usize).map(|i| per_cpu.iter().map(|c| c[i]).sum()).collect(),
            Err(_) => {
                self.read_errors.fetch_add(1, Ordering::Relaxed);
                vec![0; counter::COUNT as usize]
            }
        };
        let sum = |idx: u32| -> u64 { kernel[idx as usize] + self.swept[idx as usize].load(Ordering::Relaxed) };
        let recursion_misses: Vec<(String, u64)> = probes
            .programs
            .iter()
            .filter_map(|(name, fd)| {
                use std::os::fd::AsFd as _;
                Some((name.clone(), crate::kernel::load::recursion_misses(fd.as_fd())?))
            })
            .collect();
        let counters = Counters {
            created_inbound: sum(counter::CREATED_INBOUND),
            created_outbound: sum(counter::CREATED_OUTBOUND),
            closed: REASONS.map(|(_, idx)| sum(idx)),
            lost: sum(counter::LOST),
            snapshot: sum(counter::SNAPSHOT),
            snapshot_listeners: sum(counter::SNAPSHOT_LISTENERS),
            substate_changes: sum(counter::SUBSTATE_CHANGES),
            direction_from_history: sum(counter::DIRECTION_FROM_HISTORY),
            out_of_order: sum(counter::OUT_OF_ORDER),
            segments: SEGMENT_KINDS.map(|(_, idx)| sum(idx)),
            reconcile_runs: rec.0,
            reconcile_errors: rec.1,
            reconcile_corrections: rec.2,
            reconcile_last_micros: rec.3,
            reconcile_netns_skipped: rec.4,
            schedule_walk_micros: self.schedule.lock().unwrap_or_else(|e| e.into_inner()).cost.as_micros() as u64,
            recursion_misses,
        };
        // The SYNs since the last read: what the drains moved out, and what
        // the tables gained, under the probes lock a drain holds while it
        // moves them: each SYN goes to the ledger exactly once.
        let mut syns: HashMap<RemoteKey, SynCounts> = HashMap::new();
        let mut totals = self.totals.lock().unwrap_or_else(|e| e.into_inner());
        let t = &mut *totals;
        for (k, v) in t.syn_pending.drain() {
            let slot = syns.entry(k).or_default();
            slot.total += v.total;
            slot.rejected += v.rejected;
        }
        for (i, table) in probes.syns.iter().enumerate() {
            for (k, v) in read_all(table, &self.read_errors) {
                let seen = t.syn_seen[i].entry(k).or_default();
                let d = syn_delta(v, *seen);
                *seen = v;
                let slot = syns.entry(k).or_default();
                slot.total += d.total;
                slot.rejected += d.rejected;
            }
        }
        drop(totals);
        let mut names = self.cgroups.as_ref().map(|m| m.lock().unwrap_or_else(|e| e.into_inner()));
        // Kernel keys are cumulative and never removed; the busiest
        // `TOP_COMMS` names per errno keep their own series, the rest (and
        // the reserved keys, counted once the table is full) go to
        // comm="other". Growth since the last read goes to where a key
        // belongs now, so no series ever decreases (`ledger`).
        let raw = read_all(&probes.connect_errors, &self.read_errors);
        let comm_of = |comm: &[u8; 16]| String::from_utf8_lossy(comm.split(|b| *b == 0).next().unwrap_or_default()).into_owned();
        let errno_of = |errno: u32| if errno == EADDRINUSE { "EADDRINUSE" } else { "EADDRNOTAVAIL" };
        let named = raw.iter().filter(|(k, _)| !k.is_fallback());
        let top = crate::model::error_ledger::busiest(named.map(|(k, n)| ((k.errno, k.comm), u64::try_from(*n).unwrap_or(0))), TOP_COMMS);
        let mut ledger = self.error_ledger.lock().unwrap_or_else(|e| e.into_inner());
        ledger.attribute(raw.iter().map(|(k, n)| (*k, u64::try_from(*n).unwrap_or(0))), |k| {
            if k.is_fallback() {
                let cgroup = names.is_some().then(|| crate::model::error_ledger::OTHER.to_string());
                return (errno_of(k.errno), crate::model::error_ledger::OTHER.to_string(), cgroup, String::new(), 0);
            }
            let comm = if top.contains(&(k.errno, k.comm)) { comm_of(&k.comm) } else { crate::model::error_ledger::OTHER.to_string() };
            let remote = if k.family == 0 {
                String::new()
            } else {
                let key = AggKey { remote: k.remote, family: k.family, ..AggKey::default() };
                crate::model::aggregate::remote_label(crate::model::aggregate::remote_addr(&key), opts)
            };
            (errno_of(k.errno), comm, names.as_deref_mut().map(|n| n.label(k.cgroup)), remote, k.port)
        });
        let shown: HashSet<(&str, String)> = top.iter().map(|(errno, comm)| (errno_of(*errno), comm_of(comm))).collect();
        let mut connect_errors: Vec<ConnectErrors> = ledger
            .shown()
            .filter(|((errno, comm, ..), _)| comm == crate::model::error_ledger::OTHER || shown.contains(&(*errno, comm.clone())))
            .map(|((errno, comm, cgroup, remote, port), count)| ConnectErrors {
                errno,
                comm: comm.clone(),
                cgroup: cgroup.clone(),
                remote: remote.clone(),
                port: *port,
                count,
            })
            .collect();
        drop(ledger);
        connect_errors.sort_by(|a, b| (a.errno, &a.comm, &a.cgroup, &a.remote, a.port).cmp(&(b.errno, &b.comm, &b.cgroup, &b.remote, b.port)));
        let per_cpu = probes.lifetime.get(&0, 0).ok();
        let mut slots = vec![0u64; (LIFETIME_REASONS * LIFETIME_SLOTS) as usize];
        for (i, slot) in slots.iter_mut().enumerate() {
            let kernel: u64 = per_cpu.as_ref().map_or(0, |v| v.iter().map(|c| c[i]).sum());
            *slot = kernel + self.swept_lifetime[i].load(Ordering::Relaxed);
        }
        drop(probes);
        let lifetimes = REASONS
            .iter()
            .enumerate()
            .map(|(r, (reason, _))| {
                let base = r * LIFETIME_SLOTS as usize;
                let nb = LIFETIME_BUCKETS_NS.len();
                let mut acc = 0;
                let cumulative = slots[base..base + nb]
                    .iter()
                    .map(|n| {
                        acc += n;
                        acc
                    })
                    .collect();
                Lifetime {
                    reason,
                    cumulative,
                    count: acc + slots[base + nb],
                    sum_seconds: slots[base + nb + 1] as f64 / 1e9,
                }
            })
            .collect();
        let sysctls = Sysctls {
            max_buckets: procfs::sysctl("net.ipv4.tcp_max_tw_buckets").and_then(|s| s.parse().ok()),
            local_port_range_size: procfs::local_port_range_size(),
            overflow: procfs::netstat("TcpExt", "TCPTimeWaitOverflow"),
        };
        let series = match names.as_deref_mut() {
            Some(n) => crate::model::aggregate::aggregate_with(counts.iter().map(|(k, v)| (*k, *v)), opts, |id| Some(n.label(id))),
            None => aggregate(counts.iter().map(|(k, v)| (*k, *v)), opts),
        };
        drop(names);
        let fold = crate::model::aggregate::Fold::of(&series);
        let range = sysctls.local_port_range_size.filter(|r| *r > 0);
        let estimates = self.estimates(&counts, &series, &fold, range, opts);
        let (ratios, inbound_ratios) = worst_ratios(&counts, &fold, range, opts);
        let kept: HashSet<String> =
            series.iter().filter(|s| s.remote != crate::model::aggregate::OTHER).map(|s| s.remote.clone()).collect();
        // A remote that holds minisockets has its SYN series from then on
        // (at 0), so `increase()` sees its first SYN.
        let holders: HashSet<(Option<u32>, String)> = counts
            .iter()
            .filter(|(k, n)| k.substate != timewait_common::SUBSTATE_CONNECTION && **n > 0)
            .map(|(k, _)| {
                (opts.per_netns.then_some(k.netns), crate::model::aggregate::remote_label(crate::model::aggregate::remote_addr(k), opts))
            })
            .collect();
        let now = Duration::from_nanos(clock_monotonic_ns());
        let syns = self.totals.lock().unwrap_or_else(|e| e.into_inner()).ledger.add(syns, opts, &kept, &holders, now);
        View {
            syns,
            ratios,
            inbound_ratios,
            series,
            counters,
            lifetimes,
            connect_errors,
            sysctls,
            estimates,
        }
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
