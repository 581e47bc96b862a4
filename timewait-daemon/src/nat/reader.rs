//! The NAT reader: a thread of its own that, per watched namespace, dumps conntrack, reads its stats and the NAT rules' ranges, and publishes a snapshot.
//!
//! Netlink I/O is synchronous and a dump of a million entries takes
//! seconds (RESEARCH.md §1.5), so it never runs on the runtime's workers
//! nor under the lock the drains and scrapes take. A round every
//! `--nat-interval` (10 s), stretched so that dumps take at most
//! [`CPU_SHARE`] of one core. The first round runs before `/readyz` says
//! ready, so a restarted daemon is exact at once.
//!
//! Nothing here touches netlink where conntrack is not loaded (`stats::loaded`):
//! a request to an absent subsystem makes the kernel load the module.

use std::{
    net::IpAddr,
    path::PathBuf,
    sync::{Arc, Condvar, Mutex, RwLock},
    time::{Duration, Instant},
};

use tracing::{info, warn};

use super::{
    PortRange, Protocol, RangeSource,
    ctnetlink::{Conntrack, CtError, DumpStats},
    fold::{Fold, Model, NatSeries, series},
    ruleset,
    stats::{self, ConntrackStats},
};
use crate::model::aggregate::AggOptions;

/// Dumps take at most this share of one core: the next round waits at
/// least the last dump's CPU time divided by it.
pub const CPU_SHARE: f64 = 0.02;

/// `--nat`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NatMode {
    /// Watch NAT where the daemon may read conntrack (CAP_NET_ADMIN).
    #[default]
    Auto,
    /// Watch NAT; refuse to start without CAP_NET_ADMIN.
    On,
    /// Never read conntrack or the ruleset.
    Off,
}

#[derive(Clone, Debug)]
pub struct NatOptions {
    pub mode: NatMode,
    pub interval: Duration,
    /// `--nat-port-range`: the range every NAT address is assumed to have.
    pub port_range: Option<PortRange>,
    pub max_destinations: usize,
    pub all_netns: bool,
}

/// What one round found in one namespace.
#[derive(Debug, Clone, Default)]
pub struct NsSnapshot {
    /// Inode of the namespace.
    pub netns: u32,
    /// Why nothing was read here (conntrack not loaded, no permission, ...).
    pub unavailable: Option<String>,
    pub stats: Option<ConntrackStats>,
    pub fold: Fold,
    /// The range of each (NAT address, protocol) seen, and where it came from.
    pub ranges: Vec<(IpAddr, Protocol, PortRange, RangeSource, bool)>,
    /// `check` lines: the NAT rules found and those whose range is unreadable.
    pub rules: Vec<String>,
    pub rules_unreadable: usize,
    pub rules_error: Option<String>,
    pub dump: DumpStats,
    pub dump_cpu: Duration,
    pub dump_wall: Duration,
    /// When the dump ended (None: no dump).
    pub dumped_at: Option<Instant>,
}

impl NsSnapshot {
    fn range_of(&self, nat: IpAddr, proto: Protocol) -> PortRange {
        self.ranges
            .iter()
            .find(|(a, p, ..)| *a == nat && *p == proto)
            .map_or(PortRange::KERNEL_DEFAULT, |(_, _, r, ..)| *r)
    }

    /// How long a new port is held at least: conntrack's TIME_WAIT timeout
    /// for TCP (120 s), its UDP timeout (30 s).
    fn hold_of(&self, proto: Protocol) -> u32 {
        let s = self.stats.as_ref();
        let secs = match proto {
            Protocol::Tcp => s.and_then(|s| s.tcp_time_wait_timeout).unwrap_or(120),
            Protocol::Udp => s.and_then(|s| s.udp_timeout).unwrap_or(30),
        };
        u32::try_from(secs).unwrap_or(u32::MAX)
    }
}

/// One round over every watched namespace.
#[derive(Debug, Clone)]
pub struct NatSnapshot {
    pub at: Instant,
    pub namespaces: Vec<NsSnapshot>,
}

/// What the exposition and `snapshot` show of the NAT side.
#[derive(Debug, Clone, serde::Serialize)]
pub struct NatView {
    /// `watched`, `off` (`--nat off`) or `unavailable` (no CAP_NET_ADMIN:
    /// `unavailable` says why).
    pub state: &'static str,
    pub series: Vec<NatSeries>,
    pub conntrack: Vec<NsConntrack>,
    /// Seconds since the last round ended.
    pub age_seconds: f64,
    pub dump_entries: u64,
    pub dump_seconds: f64,
    pub dump_cpu_seconds: f64,
    /// Entries toward destinations beyond `--nat-max-destinations`.
    pub over_limit_entries: u64,
    /// How the ranges are served: `nftables` (the ruleset was read), `flag`
    /// (`--nat-port-range`), `unavailable` (the ruleset could not be read).
    pub range_path: &'static str,
    /// Per (namespace, NAT address, protocol): the range and where it came from.
    pub ranges: Vec<NatRange>,
    pub unavailable: Option<String>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct NatRange {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub netns: Option<u32>,
    pub nat_address: IpAddr,
    pub protocol: Protocol,
    pub range: PortRange,
    pub source: RangeSource,
    /// Rules that apply disagree: the span of their ranges is used.
    pub conflict: bool,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct NsConntrack {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub netns: Option<u32>,
    #[serde(flatten)]
    pub stats: ConntrackStats,
}

/// Shared between the reader thread and the readers of its snapshot.
pub struct NatShared {
    snapshot: RwLock<Option<Arc<NatSnapshot>>>,
    /// The last view's series, by the snapshot and the aggregation settings
    /// they were folded from: scrapes between two dumps fold nothing again
    /// (65,536 destinations take tens of milliseconds to fold).
    folded: Mutex<Option<(Arc<NatSnapshot>, String, Arc<Vec<NatSeries>>)>>,
    /// The settings of the last view: the reader folds each new dump with
    /// them at once, off the scrape's path.
    last_agg: Mutex<Option<AggOptions>>,
    first: (Mutex<bool>, Condvar),
    stop: (Mutex<bool>, Condvar),
    pub opts: NatOptions,
}

impl NatShared {
    pub fn latest(&self) -> Option<Arc<NatSnapshot>> {
        self.snapshot.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Waits until the first round is published, at most `within`.
    pub fn wait_first(&self, within: Duration) -> bool {
        let (m, cv) = &self.first;
        let g = m.lock().unwrap_or_else(|e| e.into_inner());
        let (g, _) = cv.wait_timeout_while(g, within, |done| !*done).unwrap_or_else(|e| e.into_inner());
        *g
    }

    pub fn stop(&self) {
        let (m, cv) = &self.stop;
        *m.lock().unwrap_or_else(|e| e.into_inner()) = true;
        cv.notify_all();
    }

    /// The view at a scrape, folded with the running aggregation settings.
    pub fn view(&self, agg: &AggOptions) -> Option<NatView> {
        let snap = self.latest()?;
        let per_netns = self.opts.all_netns;
        let settings = format!("{agg:?}");
        *self.last_agg.lock().unwrap_or_else(|e| e.into_inner()) = Some(agg.clone());
        let cached = {
            let f = self.folded.lock().unwrap_or_else(|e| e.into_inner());
            f.as_ref().filter(|(s, a, _)| Arc::ptr_eq(s, &snap) && *a == settings).map(|(_, _, series)| series.clone())
        };
        let mut v = NatView {
            state: "watched",
            series: Vec::new(),
            conntrack: Vec::new(),
            age_seconds: snap.at.elapsed().as_secs_f64(),
            dump_entries: 0,
            dump_seconds: 0.0,
            dump_cpu_seconds: 0.0,
            over_limit_entries: 0,
            range_path: if self.opts.port_range.is_some() { "flag" } else { "nftables" },
            ranges: Vec::new(),
            unavailable: None,
        };
        for ns in &snap.namespaces {
            let netns = per_netns.then_some(ns.netns);
            if let Some(why) = &ns.unavailable {
                v.unavailable.get_or_insert_with(|| why.clone());
            }
            if let Some(s) = &ns.stats {
                v.conntrack.push(NsConntrack { netns, stats: s.clone() });
            }
            if cached.is_none() {
                let model = Model { range_of: |a, p| ns.range_of(a, p), hold_of: |p| ns.hold_of(p) };
                v.series.extend(series(netns, &ns.fold, agg, &model));
            }
            v.dump_entries += ns.dump.entries;
            v.dump_seconds += ns.dump_wall.as_secs_f64();
            v.dump_cpu_seconds += ns.dump_cpu.as_secs_f64();
            v.over_limit_entries += ns.fold.over_entries;
            if ns.rules_error.is_some() {
                v.range_path = "unavailable";
            }
            for (nat_address, protocol, range, source, conflict) in &ns.ranges {
                v.ranges.push(NatRange { netns, nat_address: *nat_address, protocol: *protocol, range: *range, source: *source, conflict: *conflict });
            }
        }
        match cached {
            Some(series) => v.series = (*series).clone(),
            None => {
                *self.folded.lock().unwrap_or_else(|e| e.into_inner()) =
                    Some((snap.clone(), settings, Arc::new(v.series.clone())));
            }
        }
        Some(v)
    }
}

impl NatView {
    /// The NAT side is not watched at all: `why` (`--nat off`, or a missing privilege).
    pub fn not_watched(why: String, off: bool) -> Self {
        Self {
            state: if off { "off" } else { "unavailable" },
            series: Vec::new(),
            conntrack: Vec::new(),
            age_seconds: 0.0,
            dump_entries: 0,
            dump_seconds: 0.0,
            dump_cpu_seconds: 0.0,
            over_limit_entries: 0,
            range_path: if off { "off" } else { "unavailable" },
            ranges: Vec::new(),
            unavailable: Some(why),
        }
    }
}

/// Whether this process holds CAP_NET_ADMIN (effective set).
pub fn has_net_admin() -> bool {
    const CAP_NET_ADMIN: u32 = 12;
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let hex = s.lines().find_map(|l| l.strip_prefix("CapEff:"))?.trim().to_string();
            u64::from_str_radix(&hex, 16).ok()
        })
        .is_some_and(|caps| caps & (1 << CAP_NET_ADMIN) != 0)
}

/// Why the NAT side cannot run at all (for `--nat on`: refused at start), or None.
pub fn unavailable(opts: &NatOptions) -> Option<String> {
    match opts.mode {
        NatMode::Off => Some("--nat off".into()),
        _ if !has_net_admin() => Some("CAP_NET_ADMIN missing (reading conntrack needs it; README: The load balancer's side)".into()),
        _ => None,
    }
}

/// Starts the reader thread (none with `--nat off`, or without CAP_NET_ADMIN
/// under `auto`: then `None` and the reason).
pub fn spawn(opts: NatOptions) -> Result<Arc<NatShared>, String> {
    if let Some(why) = unavailable(&opts) {
        return Err(why);
    }
    let shared = Arc::new(NatShared {
        snapshot: RwLock::new(None),
        folded: Mutex::new(None),
        last_agg: Mutex::new(None),
        first: (Mutex::new(false), Condvar::new()),
        stop: (Mutex::new(false), Condvar::new()),
        opts,
    });
    let s = shared.clone();
    std::thread::Builder::new()
        .name("nat-reader".into())
        .spawn(move || run(&s))
        .map_err(|e| format!("cannot start the NAT reader thread: {e}"))?;
    Ok(shared)
}

fn run(shared: &NatShared) {
    let opts = &shared.opts;
    let mut warned: Option<String> = None;
    loop {
        let started = Instant::now();
        let previous = shared.latest();
        let namespaces = round(opts, previous.as_deref());
        let cpu: Duration = namespaces.iter().map(|n| n.dump_cpu).sum();
        let problem = namespaces.iter().find_map(|n| n.unavailable.clone().or(n.rules_error.clone()));
        if problem != warned {
            match &problem {
                Some(p) => warn!(reason = %p, "NAT: conntrack not fully read"),
                None if warned.is_some() => info!("NAT: conntrack read again"),
                None => {}
            }
            warned = problem;
        }
        *shared.snapshot.write().unwrap_or_else(|e| e.into_inner()) =
            Some(Arc::new(NatSnapshot { at: Instant::now(), namespaces }));
        // Fold the new dump now, as the scrapes will want it.
        let agg = shared.last_agg.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if let Some(agg) = agg {
            let _ = shared.view(&agg);
        }
        {
            let (m, cv) = &shared.first;
            *m.lock().unwrap_or_else(|e| e.into_inner()) = true;
            cv.notify_all();
        }
        let wait = opts.interval.max(cpu.div_f64(CPU_SHARE)).saturating_sub(started.elapsed());
        let (m, cv) = &shared.stop;
        let g = m.lock().unwrap_or_else(|e| e.into_inner());
        let (g, _) = cv.wait_timeout_while(g, wait, |stop| !*stop).unwrap_or_else(|e| e.into_inner());
        if *g {
            return;
        }
    }
}

/// One read of the calling thread's namespace, for `timewaitd check`.
pub fn check_here(opts: &NatOptions) -> NsSnapshot {
    read_here(opts, crate::kernel::procfs::own_netns().unwrap_or(0), None)
}

/// One round: the daemon's namespace, then with `--all-netns` every other.
fn round(opts: &NatOptions, previous: Option<&NatSnapshot>) -> Vec<NsSnapshot> {
    let own = crate::kernel::procfs::own_netns().unwrap_or(0);
    let prev = |netns: u32| previous.and_then(|p| p.namespaces.iter().find(|n| n.netns == netns));
    let mut out = vec![read_here(opts, own, prev(own))];
    if opts.all_netns {
        for path in crate::kernel::netns::other_namespaces(own) {
            let Some(inode) = inode_of(&path) else { continue };
            if out.iter().any(|n| n.netns == inode) {
                continue;
            }
            match crate::kernel::netns::in_netns(&path, || Ok(read_here(opts, inode, prev(inode)))) {
                Ok(s) => out.push(s),
                Err(e) => warn!(netns = inode, error = %e, "NAT: cannot enter the namespace"),
            }
        }
    }
    out
}

fn inode_of(path: &PathBuf) -> Option<u32> {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata(path).ok().and_then(|m| u32::try_from(m.ino()).ok())
}

/// The addresses of the calling thread's namespace (its own connections
/// hold ports of these).
fn local_addresses() -> std::collections::HashSet<IpAddr> {
    let mut out = std::collections::HashSet::new();
    let mut ifap: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills a list it allocates, freed below.
    if unsafe { libc::getifaddrs(&mut ifap) } != 0 {
        return out;
    }
    let mut cur = ifap;
    while !cur.is_null() {
        // SAFETY: a node of the list getifaddrs returned, alive until freeifaddrs.
        let ifa = unsafe { &*cur };
        if !ifa.ifa_addr.is_null() {
            // SAFETY: ifa_addr points to a sockaddr of the family it names.
            match i32::from(unsafe { (*ifa.ifa_addr).sa_family }) {
                libc::AF_INET => {
                    // SAFETY: an AF_INET sockaddr is a sockaddr_in.
                    let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
                    out.insert(IpAddr::V4(std::net::Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr))));
                }
                libc::AF_INET6 => {
                    // SAFETY: an AF_INET6 sockaddr is a sockaddr_in6.
                    let sin6 = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in6) };
                    out.insert(IpAddr::V6(std::net::Ipv6Addr::from(sin6.sin6_addr.s6_addr)));
                }
                _ => {}
            }
        }
        cur = ifa.ifa_next;
    }
    // SAFETY: the list getifaddrs allocated, freed once.
    unsafe { libc::freeifaddrs(ifap) };
    out
}

fn thread_cpu() -> Duration {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: a valid timespec out-pointer; the clock id is a constant.
    if unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) } != 0 {
        return Duration::ZERO;
    }
    Duration::new(u64::try_from(ts.tv_sec).unwrap_or(0), u32::try_from(ts.tv_nsec).unwrap_or(0))
}

/// Reads the calling thread's namespace.
fn read_here(opts: &NatOptions, netns: u32, previous: Option<&NsSnapshot>) -> NsSnapshot {
    let mut snap = NsSnapshot { netns, ..NsSnapshot::default() };
    if !stats::loaded() {
        snap.unavailable = Some("conntrack is not loaded in this namespace (nothing to watch)".into());
        return snap;
    }
    snap.stats = stats::read();
    let mut fold = Fold::new(opts.max_destinations, local_addresses());
    let (cpu0, wall0) = (thread_cpu(), Instant::now());
    let dumped = Conntrack::open().and_then(|mut ct| ct.dump(|e| fold.add(e)));
    (snap.dump_cpu, snap.dump_wall) = (thread_cpu().saturating_sub(cpu0), wall0.elapsed());
    match dumped {
        Ok(d) => {
            snap.dump = d;
            let now = Instant::now();
            snap.dumped_at = Some(now);
            let prev = previous.and_then(|p| Some((&p.fold, now.duration_since(p.dumped_at?).as_secs_f64())));
            fold.finish(prev);
        }
        Err(e @ CtError::Permission) => {
            snap.unavailable = Some(e.to_string());
            return snap;
        }
        Err(e) => {
            snap.unavailable = Some(e.to_string());
            return snap;
        }
    }
    let rules = match opts.port_range {
        Some(_) => ruleset::Rules::empty(),
        None => match ruleset::read() {
            Ok(r) => r,
            Err(e) => {
                snap.rules_error = Some(e.to_string());
                ruleset::Rules::empty()
            }
        },
    };
    snap.rules = rules.describe();
    snap.rules_unreadable = rules.unreadable();
    let mut seen: Vec<(IpAddr, Protocol)> = fold.by_dest.keys().map(|d| (d.nat_address, d.protocol)).collect();
    seen.extend(fold.over.keys().copied());
    seen.sort();
    seen.dedup();
    for (addr, proto) in seen {
        let (range, source, conflict) = match opts.port_range {
            Some(r) => (r, RangeSource::Flag, false),
            None => match rules.range_for(addr, proto, &ruleset::interface_of) {
                Some(r) => (r.range, RangeSource::Nftables, r.conflict),
                None => (PortRange::KERNEL_DEFAULT, RangeSource::Default, false),
            },
        };
        snap.ranges.push((addr, proto, range, source, conflict));
    }
    snap.fold = fold;
    snap
}
