//! A scrape's read: the `View` of everything `/metrics` and `/api/v1/snapshot` show.

use std::{
    collections::{HashMap, HashSet},
    sync::atomic::Ordering,
    time::Duration,
};

use serde::Serialize;
use timewait_common::{AggKey, EADDRINUSE, LIFETIME_BUCKETS_NS, LIFETIME_REASONS, LIFETIME_SLOTS, RemoteKey, SynCounts, counter};

use super::{Collector, clock_monotonic_ns, schedule::Estimate};
use crate::{
    kernel::{load::Probes, maps::read_all, procfs},
    model::{
        aggregate::{AggOptions, Series, aggregate},
        ratios::{InboundRatio, Worst, worst_ratios},
        syn_ledger::{SynSeries, syn_delta},
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

/// NAT allocation failures per destination (`--nat`, where the kernel
/// serves them): cumulative, never decreasing.
#[derive(Debug, Clone, Default, Serialize)]
pub struct NatFailures {
    pub by_destination: Vec<NatFailure>,
    /// Drops no destination could be given to (the kernel's table full,
    /// headers unreadable, a protocol without ports).
    pub unattributed: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct NatFailure {
    /// With `--all-netns` only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub netns: Option<u32>,
    #[serde(flatten)]
    pub destination: crate::nat::Destination,
    pub count: u64,
}

/// Folds the kernel's keys into series: per namespace only with
/// `per_netns`; keys without a destination into `unattributed`.
pub fn nat_failures(raw: Vec<(timewait_common::NatDropKey, u64)>, unattributed: u64, per_netns: bool) -> NatFailures {
    let mut by: std::collections::BTreeMap<(Option<u32>, crate::nat::Destination), u64> = Default::default();
    let mut other = unattributed;
    for (k, n) in raw {
        match crate::kernel::nat_drops::destination(&k) {
            Some((netns, d)) => *by.entry((per_netns.then_some(netns), d)).or_default() += n,
            None => other += n,
        }
    }
    NatFailures {
        by_destination: by.into_iter().map(|((netns, destination), count)| NatFailure { netns, destination, count }).collect(),
        unattributed: other,
    }
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
    /// The NAT side (conntrack), or why it is not watched (`state`); None
    /// before the daemon started its reader, and in `snapshot` read
    /// straight from the kernel.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nat: Option<crate::nat::reader::NatView>,
    /// None when NAT failures are not counted (`--nat`, the kernel).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nat_failures: Option<NatFailures>,
}

/// Per errno, the process names with the most errors that keep a series of
/// their own; the rest are shown as `comm="other"`.
pub const TOP_COMMS: usize = 20;

impl Collector {
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
        let nat_failures = probes.nat_drops(&self.read_errors).map(|(raw, other)| nat_failures(raw, other, opts.per_netns));
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
            nat: None,
            nat_failures,
        }
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
}
