//! Pure aggregation: raw kernel keys into labelled series, CIDR blocks and the top-K-plus-`other` bound.
//!
//! No I/O: unit-tested here. `Fold` says where a raw key went.

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use serde::Serialize;
use timewait_common::{AF_INET, AggKey, DIRECTION_INBOUND, SUBSTATE_CONNECTION, TCP_FIN_WAIT2};

/// The remote label of series folded beyond the top K.
pub const OTHER: &str = "other";

/// `Series::port` of the ports folded beyond the top K of their remote:
/// labelled `port="other"` (no TCP service listens on or connects to port 0).
pub const PORT_OTHER: u16 = 0;

/// The `port` label of a series.
pub fn port_label(port: u16) -> String {
    if port == PORT_OTHER { OTHER.to_string() } else { port.to_string() }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    Inbound,
    Outbound,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Inbound => "inbound",
            Self::Outbound => "outbound",
        }
    }
}

#[derive(Debug, Clone)]
pub struct AggOptions {
    /// Remotes beyond the N busiest are summed into `remote="other"`.
    pub top_remotes: usize,
    /// Per remote (and direction), ports beyond the N busiest are summed
    /// into `port="other"`.
    pub top_ports: usize,
    /// Fold IPv4 remotes into blocks of this prefix length (32: no folding).
    pub ipv4_prefix: u8,
    /// Fold IPv6 remotes into blocks of this prefix length (128: no folding).
    pub ipv6_prefix: u8,
    /// Source ports one remote can use (denominator of the inbound ratio).
    pub remote_port_range_size: u64,
    /// Keep network namespaces apart (`--all-netns`): series carry `netns`.
    pub per_netns: bool,
    /// With `--attribute-cgroups`: cgroups beyond the N busiest are summed
    /// into `cgroup="other"`.
    pub top_cgroups: usize,
}

pub const DEFAULT_REMOTE_PORT_RANGE_SIZE: u64 = 64_512;
pub const DEFAULT_TOP_PORTS: usize = 10;
pub const DEFAULT_TOP_CGROUPS: usize = 20;

impl Default for AggOptions {
    fn default() -> Self {
        Self {
            top_remotes: 100,
            top_ports: DEFAULT_TOP_PORTS,
            ipv4_prefix: 32,
            ipv6_prefix: 128,
            remote_port_range_size: DEFAULT_REMOTE_PORT_RANGE_SIZE,
            per_netns: false,
            top_cgroups: DEFAULT_TOP_CGROUPS,
        }
    }
}

/// One (direction, remote, port) series.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Series {
    /// Network namespace inode, with `--all-netns` only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub netns: Option<u32>,
    pub direction: Option<Direction>,
    pub remote: String,
    pub port: u16,
    /// The owning cgroup's label, with `--attribute-cgroups` only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<String>,
    /// Minisockets in substate TIME_WAIT.
    pub time_wait: u64,
    /// Minisockets in substate FIN_WAIT2.
    pub fin_wait2: u64,
    /// Full sockets we opened toward remote:port (outbound only), any state.
    pub connections: u64,
}

impl Series {
    /// Local ports held toward remote:port: connections and minisockets.
    pub fn ports_in_use(&self) -> u64 {
        self.connections + self.time_wait + self.fin_wait2
    }
}

/// The remote address of a key; IPv4-mapped IPv6 addresses are shown as IPv4,
/// as a dual-stack listener's IPv4 peers are.
pub fn remote_addr(key: &AggKey) -> IpAddr {
    addr_of(key.family, key.remote)
}

pub fn addr_of(family: u16, remote: [u8; 16]) -> IpAddr {
    if family == AF_INET {
        let [a, b, c, d, ..] = remote;
        return IpAddr::V4(Ipv4Addr::new(a, b, c, d));
    }
    let v6 = Ipv6Addr::from(remote);
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }
}

/// The label of `addr` once folded into its CIDR block.
pub fn remote_label(addr: IpAddr, opts: &AggOptions) -> String {
    match addr {
        IpAddr::V4(a) if opts.ipv4_prefix < 32 => {
            let mask = u32::MAX.checked_shl(32 - u32::from(opts.ipv4_prefix)).unwrap_or(0);
            format!("{}/{}", Ipv4Addr::from(u32::from(a) & mask), opts.ipv4_prefix)
        }
        IpAddr::V6(a) if opts.ipv6_prefix < 128 => {
            let mask = u128::MAX.checked_shl(128 - u32::from(opts.ipv6_prefix)).unwrap_or(0);
            format!("{}/{}", Ipv6Addr::from(u128::from(a) & mask), opts.ipv6_prefix)
        }
        a => a.to_string(),
    }
}

/// Turns the kernel's per-key gauges into series: fold CIDRs, keep the
/// `top_remotes` busiest remotes (by all their minisockets; ties broken by
/// label so the choice is stable) and sum the rest into `remote="other"`,
/// then per (direction, remote) keep the `top_ports` busiest ports and sum
/// the rest into `port="other"`. So there are at most `top_remotes + 1`
/// times `top_ports + 1` series per direction, whatever the sockets: a port
/// that is a client's ephemeral port by accident cannot make a series per
/// socket. Sums are preserved exactly. Non-positive values are skipped.
pub fn aggregate(raw: impl IntoIterator<Item = (AggKey, i64)>, opts: &AggOptions) -> Vec<Series> {
    aggregate_with(raw, opts, |_| None)
}

/// [`aggregate`] with the owning cgroup as one more dimension: `cgroup`
/// names a key's cgroup id (None: no such label, attribution off). The
/// `top_cgroups` busiest names keep theirs, the rest are summed into
/// `cgroup="other"`, before the remotes and ports are folded.
pub fn aggregate_with(
    raw: impl IntoIterator<Item = (AggKey, i64)>,
    opts: &AggOptions,
    mut cgroup: impl FnMut(u64) -> Option<String>,
) -> Vec<Series> {
    let mut by_series: BTreeMap<SeriesKey, Counts> = BTreeMap::new();
    let mut names: HashMap<u64, Option<String>> = HashMap::new();
    for (key, n) in raw {
        let Ok(n) = u64::try_from(n) else { continue };
        if n == 0 {
            continue;
        }
        let direction = if key.direction == DIRECTION_INBOUND {
            Direction::Inbound
        } else {
            Direction::Outbound
        };
        let remote = remote_label(remote_addr(&key), opts);
        let netns = opts.per_netns.then_some(key.netns);
        let owner = names.entry(key.cgroup).or_insert_with(|| cgroup(key.cgroup)).clone();
        let slot = by_series.entry((netns, direction, remote, key.port, owner)).or_default();
        match key.substate {
            TCP_FIN_WAIT2 => slot.1 += n,
            SUBSTATE_CONNECTION => slot.2 += n,
            _ => slot.0 += n,
        }
    }

    let total = |c: &Counts| c.0 + c.1 + c.2;
    let kept_cgroups = top_remotes(
        by_series.iter().filter_map(|(k, c)| Some((k.4.as_deref()?, total(c)))),
        opts.top_cgroups,
    );
    let kept = top_remotes(by_series.iter().map(|(k, c)| (k.2.as_str(), total(c))), opts.top_remotes);

    let mut folded: BTreeMap<SeriesKey, Counts> = BTreeMap::new();
    for ((netns, d, remote, port, owner), c) in by_series {
        let remote = if kept.contains(&remote) { remote } else { OTHER.to_string() };
        let owner = owner.map(|o| if kept_cgroups.contains(&o) { o } else { OTHER.to_string() });
        add(folded.entry((netns, d, remote, port, owner)).or_default(), c);
    }
    let folded = fold_ports(folded, opts.top_ports);
    folded
        .into_iter()
        .map(|((netns, direction, remote, port, cgroup), (time_wait, fin_wait2, connections))| Series {
            netns,
            direction: Some(direction),
            remote,
            port,
            cgroup,
            time_wait,
            fin_wait2,
            connections,
        })
        .collect()
}

/// (netns, direction, remote, port, cgroup).
type SeriesKey = (Option<u32>, Direction, String, u16, Option<String>);
/// (TIME_WAIT, FIN_WAIT2, connections).
type Counts = (u64, u64, u64);

fn add(slot: &mut Counts, c: Counts) {
    slot.0 += c.0;
    slot.1 += c.1;
    slot.2 += c.2;
}

/// Per (netns, direction, remote), the `n` busiest ports (over all their
/// cgroups; ties broken by port number) keep their series, the rest are
/// summed into `PORT_OTHER`.
fn fold_ports(by_series: BTreeMap<SeriesKey, Counts>, n: usize) -> BTreeMap<SeriesKey, Counts> {
    let mut per_owner: BTreeMap<(Option<u32>, Direction, &str), BTreeMap<u16, u64>> = BTreeMap::new();
    for ((netns, d, remote, port, _), (tw, fw, c)) in &by_series {
        *per_owner.entry((*netns, *d, remote.as_str())).or_default().entry(*port).or_default() += tw + fw + c;
    }
    let mut kept: std::collections::HashSet<(Option<u32>, Direction, String, u16)> = std::collections::HashSet::new();
    for ((netns, d, remote), ports) in per_owner {
        let mut ports: Vec<(u16, u64)> = ports.into_iter().collect();
        ports.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        for (port, _) in ports.into_iter().take(n) {
            kept.insert((netns, d, remote.to_string(), port));
        }
    }
    let mut out: BTreeMap<SeriesKey, Counts> = BTreeMap::new();
    for ((netns, d, remote, port, owner), c) in by_series {
        let port = if kept.contains(&(netns, d, remote.clone(), port)) { port } else { PORT_OTHER };
        add(out.entry((netns, d, remote, port, owner)).or_default(), c);
    }
    out
}

/// The `n` busiest remotes (ties broken by label, so the choice is stable).
fn top_remotes<'a>(weights: impl Iterator<Item = (&'a str, u64)>, n: usize) -> std::collections::HashSet<String> {
    let mut per_remote: BTreeMap<&str, u64> = BTreeMap::new();
    for (r, w) in weights {
        *per_remote.entry(r).or_default() += w;
    }
    let mut ranked: Vec<(&str, u64)> = per_remote.into_iter().collect();
    ranked.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    ranked.into_iter().take(n).map(|(r, _)| r.to_string()).collect()
}

/// Where raw keys went when a set of series was folded: which remote labels
/// kept their own series, and which ports kept theirs per (netns, direction,
/// remote). Built from the series themselves, so a raw key maps onto the
/// series that holds its count.
pub struct Fold {
    remotes: std::collections::HashSet<String>,
    ports: std::collections::HashSet<(Option<u32>, Direction, String, u16)>,
}

impl Fold {
    pub fn of(series: &[Series]) -> Self {
        let mut remotes = std::collections::HashSet::new();
        let mut ports = std::collections::HashSet::new();
        for s in series {
            let Some(d) = s.direction else { continue };
            if s.remote != OTHER {
                remotes.insert(s.remote.clone());
            }
            if s.port != PORT_OTHER {
                ports.insert((s.netns, d, s.remote.clone(), s.port));
            }
        }
        Self { remotes, ports }
    }

    /// The remote label a remote (already CIDR-folded) is shown under.
    pub fn remote(&self, label: String) -> String {
        if self.remotes.contains(&label) { label } else { OTHER.to_string() }
    }

    /// The (remote, port) labels of a raw key's series.
    pub fn series_of(&self, netns: Option<u32>, direction: Direction, label: String, port: u16) -> (String, u16) {
        let remote = self.remote(label);
        let kept = self.ports.contains(&(netns, direction, remote.clone(), port));
        (remote, if kept { port } else { PORT_OTHER })
    }
}

#[cfg(test)]
mod tests {
    use timewait_common::{AF_INET6, DIRECTION_OUTBOUND, TCP_TIME_WAIT};

    use super::*;

    fn v4(a: [u8; 4], port: u16, dir: u8, sub: u8) -> AggKey {
        let mut k = AggKey { family: AF_INET, port, direction: dir, substate: sub, ..Default::default() };
        k.remote[..4].copy_from_slice(&a);
        k
    }

    #[test]
    fn sums_substates_and_skips_nonpositive() {
        let raw = [
            (v4([10, 0, 0, 1], 80, DIRECTION_INBOUND, TCP_TIME_WAIT), 5),
            (v4([10, 0, 0, 1], 80, DIRECTION_INBOUND, TCP_FIN_WAIT2), 2),
            (v4([10, 0, 0, 2], 443, DIRECTION_OUTBOUND, TCP_TIME_WAIT), 0),
            (v4([10, 0, 0, 3], 443, DIRECTION_OUTBOUND, TCP_TIME_WAIT), -1),
        ];
        let s = aggregate(raw, &AggOptions::default());
        assert_eq!(s.len(), 1);
        assert_eq!((s[0].time_wait, s[0].fin_wait2, s[0].connections), (5, 2, 0));
        assert_eq!(s[0].remote, "10.0.0.1");
        assert_eq!(s[0].direction, Some(Direction::Inbound));
    }

    #[test]
    fn top_k_folds_rest_into_other_preserving_sum() {
        let raw: Vec<_> = (1..=20u8)
            .map(|i| (v4([10, 0, 0, i], 80, DIRECTION_INBOUND, TCP_TIME_WAIT), i64::from(i)))
            .collect();
        let total: u64 = (1..=20).sum();
        let opts = AggOptions { top_remotes: 5, ..Default::default() };
        let s = aggregate(raw, &opts);
        assert_eq!(s.len(), 6);
        assert_eq!(s.iter().map(|x| x.time_wait).sum::<u64>(), total);
        let other = s.iter().find(|x| x.remote == OTHER).expect("other");
        assert_eq!(other.time_wait, (1..=15).sum::<u64>());
        for x in s.iter().filter(|x| x.remote != OTHER) {
            assert!(x.time_wait >= 16, "{x:?} should not be kept");
        }
    }

    #[test]
    fn per_netns_keeps_namespaces_apart() {
        let mut a = v4([10, 0, 0, 1], 80, DIRECTION_INBOUND, TCP_TIME_WAIT);
        let mut b = a;
        a.netns = 1;
        b.netns = 2;
        assert_eq!(aggregate([(a, 1), (b, 2)], &AggOptions::default()).len(), 1);
        let s = aggregate([(a, 1), (b, 2)], &AggOptions { per_netns: true, ..Default::default() });
        assert_eq!(s.iter().map(|x| (x.netns, x.time_wait)).collect::<Vec<_>>(), [(Some(1), 1), (Some(2), 2)]);
    }

    #[test]
    fn cgroups_are_one_more_dimension_folded_beyond_the_top() {
        let key = |cg: u64, n: i64| {
            let mut k = v4([10, 0, 0, 9], 5432, DIRECTION_OUTBOUND, SUBSTATE_CONNECTION);
            k.cgroup = cg;
            (k, n)
        };
        let raw = [key(1, 5), key(2, 3), key(3, 1), key(4, 1)];
        let opts = AggOptions { top_cgroups: 2, ..Default::default() };
        let name = |id: u64| Some(format!("cg{id}"));
        let s = aggregate_with(raw, &opts, name);
        let got: Vec<(Option<&str>, u64)> = s.iter().map(|x| (x.cgroup.as_deref(), x.connections)).collect();
        assert_eq!(got, [(Some("cg1"), 5), (Some("cg2"), 3), (Some("other"), 2)]);
        // Off: one series, no label, the same sum.
        let s = aggregate(raw, &opts);
        assert_eq!(s.iter().map(|x| (x.cgroup.clone(), x.connections)).collect::<Vec<_>>(), [(None, 10)]);
    }

    #[test]
    fn connections_count_toward_ports_in_use() {
        let raw = [
            (v4([10, 0, 0, 9], 5432, DIRECTION_OUTBOUND, TCP_TIME_WAIT), 3),
            (v4([10, 0, 0, 9], 5432, DIRECTION_OUTBOUND, SUBSTATE_CONNECTION), 4),
            (v4([10, 0, 0, 9], 5432, DIRECTION_OUTBOUND, TCP_FIN_WAIT2), 1),
        ];
        let s = aggregate(raw, &AggOptions::default());
        assert_eq!(s.len(), 1);
        assert_eq!((s[0].time_wait, s[0].connections, s[0].ports_in_use()), (3, 4, 8));
    }

    #[test]
    fn ports_fold_per_remote_preserving_sum() {
        // One remote with 300 ephemeral-looking ports (a stopped server's
        // clients seen as outbound) and a second with two real ones.
        let mut raw: Vec<_> =
            (0..300u16).map(|i| (v4([10, 0, 0, 1], 40_000 + i, DIRECTION_OUTBOUND, TCP_TIME_WAIT), 1)).collect();
        raw.push((v4([10, 0, 0, 1], 443, DIRECTION_OUTBOUND, TCP_TIME_WAIT), 50));
        raw.push((v4([10, 0, 0, 2], 80, DIRECTION_INBOUND, TCP_TIME_WAIT), 7));
        raw.push((v4([10, 0, 0, 2], 81, DIRECTION_INBOUND, TCP_TIME_WAIT), 3));
        let s = aggregate(raw, &AggOptions { top_ports: 3, ..Default::default() });
        assert_eq!(s.iter().map(|x| x.time_wait).sum::<u64>(), 360);
        let of = |r: &str| s.iter().filter(|x| x.remote == r).map(|x| (x.port, x.time_wait)).collect::<Vec<_>>();
        // 443 first, two ephemeral ones (lowest number on ties), the rest in other.
        assert_eq!(of("10.0.0.1"), [(PORT_OTHER, 298), (443, 50), (40_000, 1), (40_001, 1)]);
        assert_eq!(of("10.0.0.2"), [(80, 7), (81, 3)]);
        assert_eq!(port_label(PORT_OTHER), "other");
    }

    #[test]
    fn cidr_folding_and_mapped_addresses() {
        let opts = AggOptions { ipv4_prefix: 24, ipv6_prefix: 64, ..Default::default() };
        assert_eq!(remote_label("10.1.2.3".parse().unwrap(), &opts), "10.1.2.0/24");
        assert_eq!(remote_label("2001:db8::1".parse().unwrap(), &opts), "2001:db8::/64");
        let zero = AggOptions { ipv4_prefix: 0, ..Default::default() };
        assert_eq!(remote_label("10.1.2.3".parse().unwrap(), &zero), "0.0.0.0/0");
        let mut k = AggKey { family: AF_INET6, ..Default::default() };
        k.remote = "::ffff:127.0.0.9".parse::<Ipv6Addr>().unwrap().octets();
        assert_eq!(remote_addr(&k).to_string(), "127.0.0.9");
        k.remote = Ipv6Addr::LOCALHOST.octets();
        assert_eq!(remote_addr(&k).to_string(), "::1");
    }
}
