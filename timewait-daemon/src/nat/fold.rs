//! Pure: conntrack entries into counts per real destination, then into bounded, labelled series with each series' ratio of one real destination.
//!
//! An entry holds a source port of `nat_address` toward `remote:port` when
//! its reply tuple goes from `remote:port` to `nat_address` and it is
//! either a NATed flow (`IPS_SRC_NAT`: reply dst = the translated source)
//! or this host's own connection from one of its addresses (original
//! source = reply dst = a local address): both compete for the same ports.
//! Flows merely forwarded, and connections *to* this host, hold no port of
//! a local address and are left out (their reply dst is the client).
//! Memory is bounded by `max_destinations` distinct keys per namespace;
//! entries toward further destinations are summed per (NAT address,
//! protocol) and shown as `remote="other", port="other"` without a ratio
//! (no one real destination is known for them).

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
};

use super::{Destination, PortRange, Protocol, ctnetlink::{Entry, TCP_CONNTRACK_TIME_WAIT}};
use crate::model::aggregate::{AggOptions, OTHER, remote_label};

/// Entries holding ports toward one destination.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Counts {
    pub in_use: u64,
    /// Of those, entries in conntrack's TCP TIME_WAIT.
    pub time_wait: u64,
}

impl Counts {
    fn add(&mut self, other: Counts) {
        self.in_use += other.in_use;
        self.time_wait += other.time_wait;
    }
}

/// What one dump says about one destination.
#[derive(Debug, Clone, Default)]
pub struct DestState {
    pub counts: Counts,
    /// The entries' ids, sorted once the dump is done (the next dump's
    /// new entries are those it lacks).
    pub ids: Vec<u32>,
    /// Seconds left of each entry that ends on its own (`Entry::expiring`).
    pub expiring: Vec<u32>,
    /// New entries per second since the previous dump (None on the first).
    pub rate: Option<f64>,
}

/// One dump folded.
#[derive(Debug, Clone, Default)]
pub struct Fold {
    /// This namespace's own addresses (for its own connections).
    pub local: std::collections::HashSet<IpAddr>,
    pub by_dest: HashMap<Destination, DestState>,
    /// Entries toward destinations beyond the cap, per (NAT address, protocol).
    pub over: HashMap<(IpAddr, Protocol), Counts>,
    /// Distinct destinations not kept apart (a lower bound: each counted once
    /// per entry that found no room).
    pub over_entries: u64,
    cap: usize,
}

impl Fold {
    pub fn new(max_destinations: usize, local: std::collections::HashSet<IpAddr>) -> Self {
        Self { cap: max_destinations, local, ..Self::default() }
    }

    pub fn add(&mut self, e: &Entry) {
        let Some(protocol) = Protocol::from_ip(e.protocol) else { return };
        let own = e.orig_src.map(unmap) == Some(unmap(e.reply_dst)) && self.local.contains(&unmap(e.reply_dst));
        if !(e.src_nat || own) {
            return;
        }
        let d = Destination { nat_address: unmap(e.reply_dst), remote: unmap(e.reply_src), port: e.reply_sport, protocol };
        let c = Counts { in_use: 1, time_wait: u64::from(e.tcp_state == Some(TCP_CONNTRACK_TIME_WAIT)) };
        let room = self.by_dest.len() < self.cap;
        let slot = match self.by_dest.get_mut(&d) {
            Some(slot) => Some(slot),
            None if room => Some(self.by_dest.entry(d).or_default()),
            None => None,
        };
        if let Some(slot) = slot {
            slot.counts.add(c);
            if let Some(id) = e.id {
                slot.ids.push(id);
            }
            if e.expiring() {
                slot.expiring.push(e.timeout.unwrap_or(0));
            }
        } else {
            self.over.entry((d.nat_address, protocol)).or_default().add(c);
            self.over_entries += 1;
        }
    }
}

impl Fold {
    /// After the dump: sort the ids, and with the previous dump of the same
    /// namespace (`secs` earlier) set each destination's rate of new entries.
    pub fn finish(&mut self, previous: Option<(&Fold, f64)>) {
        for (d, st) in &mut self.by_dest {
            st.ids.sort_unstable();
            if let Some((prev, secs)) = previous
                && secs > 0.0
            {
                let before = prev.by_dest.get(d).map_or(&[][..], |p| p.ids.as_slice());
                st.rate = Some(super::estimate::new_ids(before, &st.ids) as f64 / secs);
            }
        }
    }
}

fn unmap(a: IpAddr) -> IpAddr {
    match a {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(a, IpAddr::V4),
        a => a,
    }
}

/// One labelled `timewait_nat_*` series.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct NatSeries {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub netns: Option<u32>,
    pub nat_address: String,
    pub remote: String,
    pub port: String,
    pub protocol: Protocol,
    pub in_use: u64,
    pub time_wait: u64,
    /// In use / the range of its busiest real destination (None for the
    /// entries beyond the destination cap: no real destination known).
    pub ratio: Option<f64>,
    /// That destination (`remote:port`), and how many real ones the series sums.
    pub worst: Option<String>,
    pub destinations: u64,
    /// Seconds until the soonest of its real destinations runs out of ports
    /// (`f64::INFINITY`, JSON null: not heading there); None (absent) until
    /// two dumps were read.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seconds: Option<f64>,
}

/// What the time-to-exhaustion estimate needs besides the dump.
pub struct Model<R: Fn(IpAddr, Protocol) -> PortRange, H: Fn(Protocol) -> u32> {
    pub range_of: R,
    /// How long a new port is held at least (conntrack's timeouts).
    pub hold_of: H,
}

/// Folds one namespace's counts into series: CIDR blocks
/// (`--aggregate-ipv4/6-prefix`), the `top_remotes` busiest remote labels
/// (by ports in use, ties by label), the rest `remote="other"`; per (NAT
/// address, remote, protocol) the `top_ports` busiest ports, the rest
/// `port="other"`. Sums are exact; a series' ratio is that of its busiest
/// real destination, with `range_of(nat_address, protocol)` as its range.
pub fn series<R: Fn(IpAddr, Protocol) -> PortRange, H: Fn(Protocol) -> u32>(
    netns: Option<u32>,
    fold: &Fold,
    opts: &AggOptions,
    model: &Model<R, H>,
) -> Vec<NatSeries> {
    let range_of = &model.range_of;
    let mut by_remote: HashMap<String, u64> = HashMap::new();
    for (d, st) in &fold.by_dest {
        *by_remote.entry(remote_label(d.remote, opts)).or_default() += st.counts.in_use;
    }
    let mut ranked: Vec<(&String, &u64)> = by_remote.iter().collect();
    ranked.sort_by(|a, b| b.1.cmp(a.1).then_with(|| a.0.cmp(b.0)));
    let kept: std::collections::HashSet<&String> = ranked.iter().take(opts.top_remotes).map(|(l, _)| *l).collect();

    // (nat, remote label, protocol) -> port -> (counts, worst ratio, worst dest, destinations, soonest seconds)
    type Acc = (Counts, f64, String, u64, Option<f64>);
    let mut groups: BTreeMap<(IpAddr, String, Protocol), BTreeMap<u16, Acc>> = BTreeMap::new();
    for (d, st) in &fold.by_dest {
        let c = &st.counts;
        let label = remote_label(d.remote, opts);
        let label = if kept.contains(&label) { label } else { OTHER.to_string() };
        let size = range_of(d.nat_address, d.protocol).size();
        let ratio = (c.in_use as f64 / f64::from(size)).min(1.0);
        // As of the dump (at most one interval ago): the rate is the last
        // interval's, so the estimate is not aged further.
        let seconds = st.rate.map(|rate| {
            super::estimate::seconds_left(c.in_use, u64::from(size), rate, &st.expiring, (model.hold_of)(d.protocol))
        });
        let dest = std::net::SocketAddr::new(d.remote, d.port).to_string();
        let slot = groups.entry((d.nat_address, label, d.protocol)).or_default().entry(d.port).or_insert((
            Counts::default(),
            -1.0,
            String::new(),
            0,
            None,
        ));
        slot.0.add(*c);
        slot.3 += 1;
        slot.4 = soonest(slot.4, seconds);
        if ratio > slot.1 || (ratio == slot.1 && dest < slot.2) {
            (slot.1, slot.2) = (ratio, dest);
        }
    }
    let mut out = Vec::new();
    for ((nat, remote, protocol), ports) in groups {
        let mut ranked: Vec<(u16, Acc)> = ports.into_iter().collect();
        ranked.sort_by(|a, b| b.1.0.in_use.cmp(&a.1.0.in_use).then_with(|| a.0.cmp(&b.0)));
        let mut other: Option<Acc> = None;
        for (i, (port, acc)) in ranked.into_iter().enumerate() {
            if i < opts.top_ports {
                out.push(NatSeries {
                    netns,
                    nat_address: nat.to_string(),
                    remote: remote.clone(),
                    port: port.to_string(),
                    protocol,
                    in_use: acc.0.in_use,
                    time_wait: acc.0.time_wait,
                    ratio: Some(acc.1),
                    worst: Some(acc.2),
                    destinations: acc.3,
                    seconds: acc.4,
                });
                continue;
            }
            let o = other.get_or_insert((Counts::default(), -1.0, String::new(), 0, None));
            o.0.add(acc.0);
            o.3 += acc.3;
            o.4 = soonest(o.4, acc.4);
            if acc.1 > o.1 || (acc.1 == o.1 && acc.2 < o.2) {
                (o.1, o.2) = (acc.1, acc.2);
            }
        }
        if let Some(o) = other {
            out.push(NatSeries {
                netns,
                nat_address: nat.to_string(),
                remote: remote.clone(),
                port: OTHER.to_string(),
                protocol,
                in_use: o.0.in_use,
                time_wait: o.0.time_wait,
                ratio: Some(o.1),
                worst: Some(o.2),
                destinations: o.3,
                seconds: o.4,
            });
        }
    }
    for ((nat, protocol), c) in &fold.over {
        out.push(NatSeries {
            netns,
            nat_address: nat.to_string(),
            remote: OTHER.to_string(),
            port: OTHER.to_string(),
            protocol: *protocol,
            in_use: c.in_use,
            time_wait: c.time_wait,
            ratio: None,
            worst: None,
            destinations: 0,
            seconds: None,
        });
    }
    merge_same_labels(out)
}

fn soonest(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// The cap's overflow and a folded `other` of the same NAT address and
/// protocol share labels: one series, their sums, the known ratio.
fn merge_same_labels(series: Vec<NatSeries>) -> Vec<NatSeries> {
    let mut by: BTreeMap<(Option<u32>, String, String, String, Protocol), NatSeries> = BTreeMap::new();
    for s in series {
        let key = (s.netns, s.nat_address.clone(), s.remote.clone(), s.port.clone(), s.protocol);
        match by.get_mut(&key) {
            Some(m) => {
                m.in_use += s.in_use;
                m.time_wait += s.time_wait;
                m.destinations += s.destinations;
                if s.ratio > m.ratio {
                    (m.ratio, m.worst) = (s.ratio, s.worst);
                }
                m.seconds = soonest(m.seconds, s.seconds);
            }
            None => {
                by.insert(key, s);
            }
        }
    }
    by.into_values().collect()
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    fn entry(nat: [u8; 4], remote: [u8; 4], port: u16, proto: u8, tw: bool) -> Entry {
        Entry {
            orig_src: Some(IpAddr::V4(Ipv4Addr::from([10, 9, 9, 9]))),
            src_nat: true,
            assured: true,
            reply_src: IpAddr::V4(Ipv4Addr::from(remote)),
            reply_dst: IpAddr::V4(Ipv4Addr::from(nat)),
            reply_sport: port,
            reply_dport: 40000,
            protocol: proto,
            tcp_state: (proto == 6).then_some(if tw { 7 } else { 3 }),
            timeout: Some(100),
            id: None,
        }
    }

    const R8: PortRange = PortRange { min: 40000, max: 40007 };

    fn model<R: Fn(IpAddr, Protocol) -> PortRange>(range_of: R) -> Model<R, fn(Protocol) -> u32> {
        Model { range_of, hold_of: |_| 120 }
    }

    #[test]
    fn seconds_need_two_dumps_and_follow_new_ids() {
        let mut first = Fold::new(100, Default::default());
        for id in 0..4 {
            first.add(&Entry { id: Some(id), ..entry([10, 0, 0, 1], [10, 0, 0, 2], 80, 6, false) });
        }
        first.finish(None);
        assert_eq!(series(None, &first, &AggOptions::default(), &model(|_, _| R8))[0].seconds, None);
        let mut second = Fold::new(100, Default::default());
        for id in 0..6 {
            second.add(&Entry { id: Some(id), ..entry([10, 0, 0, 1], [10, 0, 0, 2], 80, 6, false) });
        }
        second.finish(Some((&first, 1.0)));
        // 6 of 8 held, 2 new a second, nothing ending: full in 1 s.
        assert_eq!(series(None, &second, &AggOptions::default(), &model(|_, _| R8))[0].seconds, Some(1.0));
        let mut third = second.clone();
        third.finish(Some((&second, 1.0)));
        assert_eq!(series(None, &third, &AggOptions::default(), &model(|_, _| R8))[0].seconds, Some(f64::INFINITY));
    }

    #[test]
    fn counts_by_reply_tuple_time_wait_apart() {
        let mut f = Fold::new(100, Default::default());
        for i in 0..8 {
            f.add(&entry([10, 0, 0, 1], [10, 0, 0, 2], 84, 6, i < 5));
        }
        f.add(&entry([10, 0, 0, 1], [10, 0, 0, 2], 5000, 17, false));
        f.add(&entry([10, 0, 0, 1], [10, 0, 0, 2], 0, 1, false)); // ICMP: no port
        let s = series(None, &f, &AggOptions::default(), &model(|_, _| R8));
        assert_eq!(s.len(), 2);
        let tcp = s.iter().find(|s| s.protocol == Protocol::Tcp).unwrap();
        assert_eq!((tcp.in_use, tcp.time_wait, tcp.ratio), (8, 5, Some(1.0)));
        assert_eq!(tcp.worst.as_deref(), Some("10.0.0.2:84"));
        let udp = s.iter().find(|s| s.protocol == Protocol::Udp).unwrap();
        assert_eq!((udp.in_use, udp.ratio), (1, Some(1.0 / 8.0)));
    }

    #[test]
    fn own_connections_count_forwarded_and_inbound_do_not() {
        let local: std::collections::HashSet<IpAddr> = [IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1))].into();
        let mut f = Fold::new(100, local);
        let nat = entry([10, 0, 0, 1], [10, 0, 0, 2], 80, 6, false);
        // The host's own connection from 10.0.0.1 to 10.0.0.2:80.
        let own = Entry { orig_src: Some(nat.reply_dst), src_nat: false, ..nat };
        // A connection from 10.0.0.7 to this host's :22: reply dst is the client.
        let inbound = Entry {
            orig_src: Some(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 7))),
            src_nat: false,
            reply_src: nat.reply_dst,
            reply_dst: IpAddr::V4(Ipv4Addr::new(10, 0, 0, 7)),
            reply_sport: 22,
            ..nat
        };
        // Forwarded without NAT.
        let forwarded = Entry { orig_src: Some(IpAddr::V4(Ipv4Addr::new(10, 5, 0, 7))), src_nat: false, reply_dst: IpAddr::V4(Ipv4Addr::new(10, 5, 0, 7)), ..nat };
        for e in [nat, own, inbound, forwarded] {
            f.add(&e);
        }
        assert_eq!(f.by_dest.len(), 1);
        assert_eq!(f.by_dest.values().next().unwrap().counts.in_use, 2);
    }

    #[test]
    fn folded_series_have_their_busiest_destinations_ratio_never_the_sums() {
        let mut f = Fold::new(100, Default::default());
        for (remote, n) in [([10, 0, 1, 1], 6), ([10, 0, 1, 2], 5), ([10, 0, 1, 3], 4)] {
            for _ in 0..n {
                f.add(&entry([10, 0, 0, 1], remote, 80, 6, false));
            }
        }
        let opts = AggOptions { top_remotes: 1, ..AggOptions::default() };
        let s = series(None, &f, &opts, &model(|_, _| R8));
        let other = s.iter().find(|s| s.remote == OTHER).unwrap();
        assert_eq!(other.in_use, 9);
        assert_eq!(other.ratio, Some(5.0 / 8.0));
        assert_eq!(other.worst.as_deref(), Some("10.0.1.2:80"));
        assert_eq!(other.destinations, 2);
        let top = s.iter().find(|s| s.remote == "10.0.1.1").unwrap();
        assert_eq!(top.ratio, Some(6.0 / 8.0));
        // A /24 sums all three; its ratio is still one destination's.
        let opts = AggOptions { ipv4_prefix: 24, ..AggOptions::default() };
        let s = series(None, &f, &opts, &model(|_, _| R8));
        assert_eq!(s.len(), 1);
        assert_eq!((s[0].remote.as_str(), s[0].in_use, s[0].ratio), ("10.0.1.0/24", 15, Some(6.0 / 8.0)));
    }

    #[test]
    fn ports_beyond_the_top_fold_per_nat_address() {
        let mut f = Fold::new(100, Default::default());
        for port in 1..=5u16 {
            for _ in 0..port {
                f.add(&entry([10, 0, 0, 1], [10, 0, 0, 2], port, 17, false));
            }
        }
        let opts = AggOptions { top_ports: 2, ..AggOptions::default() };
        let s = series(None, &f, &opts, &model(|_, _| PortRange { min: 1, max: 10 }));
        let ports: Vec<&str> = s.iter().map(|s| s.port.as_str()).collect();
        assert_eq!(ports.len(), 3);
        let other = s.iter().find(|s| s.port == OTHER).unwrap();
        assert_eq!((other.in_use, other.destinations, other.ratio), (1 + 2 + 3, 3, Some(0.3)));
    }

    #[test]
    fn pool_addresses_are_apart_with_their_own_ranges() {
        let mut f = Fold::new(100, Default::default());
        for _ in 0..6 {
            f.add(&entry([10, 0, 0, 10], [10, 0, 0, 2], 80, 6, false));
        }
        for _ in 0..2 {
            f.add(&entry([10, 0, 0, 11], [10, 0, 0, 2], 80, 6, false));
        }
        let s = series(None, &f, &AggOptions::default(), &model(|nat, _| {
            if nat == IpAddr::V4(Ipv4Addr::new(10, 0, 0, 10)) { R8 } else { PortRange { min: 1, max: 4 } }
        }));
        let get = |n: &str| s.iter().find(|s| s.nat_address == n).unwrap().ratio;
        assert_eq!(get("10.0.0.10"), Some(0.75));
        assert_eq!(get("10.0.0.11"), Some(0.5));
    }

    #[test]
    fn destinations_beyond_the_cap_are_counted_without_a_ratio() {
        let mut f = Fold::new(2, Default::default());
        for last in 1..=4u8 {
            f.add(&entry([10, 0, 0, 1], [10, 0, 2, last], 80, 6, false));
        }
        assert_eq!(f.by_dest.len(), 2);
        assert_eq!(f.over_entries, 2);
        let s = series(None, &f, &AggOptions::default(), &model(|_, _| R8));
        let total: u64 = s.iter().map(|s| s.in_use).sum();
        assert_eq!(total, 4);
        let over = s.iter().find(|s| s.remote == OTHER && s.port == OTHER).unwrap();
        assert_eq!((over.in_use, over.ratio), (2, None));
    }
}
