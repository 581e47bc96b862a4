//! Reads the kernel's maps at scrape time, and resolves kills that nothing in
//! the kernel resolved (the sweeper).

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
    AggKey, EADDRINUSE, LIFETIME_BUCKETS_NS, LIFETIME_REASONS, LIFETIME_SLOTS, TW_CANCELLED,
    TwEntry, counter, lifetime_slot,
};
use tracing::warn;

use crate::{
    kernel,
    aggregate::{AggOptions, Series, SynSeries, aggregate, aggregate_syns},
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
    /// Segments dropped by minisockets, as in `SEGMENT_KINDS`.
    pub segments: [u64; 5],
    pub reconcile_runs: u64,
    pub reconcile_errors: u64,
    /// Sum of |change| of the corrections applied.
    pub reconcile_corrections: u64,
    pub reconcile_last_micros: u64,
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

/// Failed connect()/bind() calls by errno and process name.
#[derive(Debug, Clone, Serialize)]
pub struct ConnectErrors {
    pub errno: &'static str,
    pub comm: String,
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
}



pub struct Collector {
    probes: Mutex<Probes>,
    /// Closes the sweeper resolved, by `counter::CLOSED_*` index.
    swept: [AtomicU64; counter::COUNT as usize],
    /// Lifetimes of the closes the sweeper resolved (layout of `LIFETIME`).
    swept_lifetime: Vec<AtomicU64>,
    /// Map reads that failed (a kernel error, not a lost event).
    pub read_errors: AtomicU64,
    reconcile: Mutex<Reconcile>,
}

/// State of the reconciliation against the kernel's socket list.
#[derive(Default)]
struct Reconcile {
    /// Added to the kernel's count of each key at read time.
    offsets: HashMap<AggKey, i64>,
    /// The difference seen in the previous round, per key.
    last_diff: HashMap<AggKey, i64>,
    runs: u64,
    errors: u64,
    corrections: u64,
    last_micros: u64,
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
            swept_lifetime: (0..LIFETIME_REASONS * LIFETIME_SLOTS).map(|_| AtomicU64::new(0)).collect(),
            read_errors: AtomicU64::new(0),
            reconcile: Mutex::new(Reconcile::default()),
        }
    }

    fn raw_counts(&self) -> HashMap<AggKey, i64> {
        use aya::maps::IterableMap as _;
        let probes = self.lock();
        if let Ok(all) = crate::batch::lookup_all::<AggKey, i64>(probes.counts.map()) {
            return all.into_iter().collect();
        }
        // Kernels before 5.6: two syscalls per entry.
        let mut raw = HashMap::new();
        for item in probes.counts.iter() {
            match item {
                Ok((k, v)) => {
                    raw.insert(k, v);
                }
                Err(aya::maps::MapError::KeyNotFound) => {}
                Err(_) => {
                    self.read_errors.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        raw
    }

    /// Compares the counts with the kernel's own socket list (a sock_diag
    /// dump, as `ss` does) and corrects what the programs could not count
    /// (full maps, lost events). A key's correction changes only when its
    /// kernel count held still across the dump and the difference was the
    /// same in two rounds in a row, so churn during a dump is never "fixed".
    /// Cost: one dump of the namespace's TCP sockets per call.
    pub fn reconcile(&self, netns: u32) -> Result<u64, crate::diag::DiagError> {
        let start = std::time::Instant::now();
        let before = self.raw_counts();
        let socks = match crate::diag::dump() {
            Ok(s) => s,
            Err(e) => {
                self.reconcile.lock().unwrap_or_else(|e| e.into_inner()).errors += 1;
                return Err(e);
            }
        };
        let after = self.raw_counts();
        let was_listening: HashSet<u16> = after
            .keys()
            .filter(|k| k.netns == netns && k.direction == timewait_common::DIRECTION_INBOUND)
            .map(|k| k.port)
            .collect();
        let expected = crate::diag::expected(&socks, netns, &was_listening);
        let mut r = self.reconcile.lock().unwrap_or_else(|e| e.into_inner());
        let keys: HashSet<AggKey> = after
            .keys()
            .filter(|k| k.netns == netns)
            .chain(expected.keys())
            .chain(r.offsets.keys())
            .copied()
            .collect();
        let mut diffs = HashMap::new();
        let mut corrected = 0;
        for key in keys {
            let (k1, k2) = (before.get(&key).copied().unwrap_or(0), after.get(&key).copied().unwrap_or(0));
            if k1 != k2 {
                continue;
            }
            let diff = expected.get(&key).copied().unwrap_or(0) - k2;
            let old = r.offsets.get(&key).copied().unwrap_or(0);
            if r.last_diff.get(&key).copied().unwrap_or(0) == diff && diff != old {
                corrected += diff.abs_diff(old);
                if diff == 0 {
                    r.offsets.remove(&key);
                } else {
                    r.offsets.insert(key, diff);
                }
            }
            if diff != 0 {
                diffs.insert(key, diff);
            }
        }
        r.last_diff = diffs;
        r.runs += 1;
        r.corrections += corrected;
        r.last_micros = start.elapsed().as_micros() as u64;
        Ok(corrected)
    }

    pub fn hooks(&self) -> Vec<(String, bool)> {
        self.lock().hooks.clone()
    }

    pub fn signals(&self) -> Vec<crate::loader::paths::SignalPath> {
        self.lock().signals.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Probes> {
        // A panic while holding the lock leaves maps that are still valid.
        self.probes.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// One consistent read of everything the metrics show.
    pub fn read(&self, opts: &AggOptions) -> View {
        let mut counts = self.raw_counts();
        let rec = {
            let r = self.reconcile.lock().unwrap_or_else(|e| e.into_inner());
            for (k, off) in &r.offsets {
                *counts.entry(*k).or_insert(0) += off;
            }
            (r.runs, r.errors, r.corrections, r.last_micros)
        };
        let raw: Vec<(AggKey, i64)> = counts.into_iter().collect();
        let probes = self.lock();
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
                Some((name.clone(), crate::loader::recursion_misses(fd.as_fd())?))
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
            segments: SEGMENT_KINDS.map(|(_, idx)| sum(idx)),
            reconcile_runs: rec.0,
            reconcile_errors: rec.1,
            reconcile_corrections: rec.2,
            reconcile_last_micros: rec.3,
            recursion_misses,
        };
        let syns: Vec<_> = {
            use aya::maps::IterableMap as _;
            crate::batch::lookup_all(probes.syns.map())
                .unwrap_or_else(|_| probes.syns.iter().filter_map(Result::ok).collect())
        };
        let mut connect_errors: Vec<ConnectErrors> = probes
            .connect_errors
            .iter()
            .filter_map(Result::ok)
            .map(|(k, n)| ConnectErrors {
                errno: if k.errno == EADDRINUSE { "EADDRINUSE" } else { "EADDRNOTAVAIL" },
                comm: String::from_utf8_lossy(k.comm.split(|b| *b == 0).next().unwrap_or_default()).into_owned(),
                count: u64::try_from(n).unwrap_or(0),
            })
            .collect();
        // The same name in several namespaces (--all-netns) is one series.
        connect_errors.sort_by(|a, b| (a.errno, &a.comm).cmp(&(b.errno, &b.comm)));
        connect_errors.dedup_by(|b, a| {
            let same = a.errno == b.errno && a.comm == b.comm;
            if same {
                a.count += b.count;
            }
            same
        });
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
            max_buckets: kernel::sysctl("net.ipv4.tcp_max_tw_buckets").and_then(|s| s.parse().ok()),
            local_port_range_size: kernel::local_port_range_size(),
            overflow: kernel::netstat("TcpExt", "TCPTimeWaitOverflow"),
        };
        View {
            series: aggregate(raw, opts),
            syns: aggregate_syns(syns, opts),
            counters,
            lifetimes,
            connect_errors,
            sysctls,
        }
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
                let reason = timewait_common::kill_reason(e.hint);
                self.swept[reason as usize].fetch_add(1, Ordering::Relaxed);
                if e.from_snapshot == 0 {
                    // The kill happened at the cancel, not now.
                    let ns = e.cancel_ns.saturating_sub(e.created_ns);
                    let base = (reason - counter::CLOSED_EXPIRED) * LIFETIME_SLOTS;
                    self.swept_lifetime[(base + lifetime_slot(ns)) as usize].fetch_add(1, Ordering::Relaxed);
                    self.swept_lifetime[(base + LIFETIME_SLOTS - 1) as usize].fetch_add(ns, Ordering::Relaxed);
                }
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
