//! The ratios of folded series: each is of one real destination, the busiest the series sums, never of the sum.

use std::collections::{BTreeMap, HashMap};

use serde::Serialize;
use timewait_common::AggKey;

use super::aggregate::{AggOptions, Direction, Fold, remote_addr, remote_label};

/// A ratio of one real destination: of the destinations a series sums (one
/// for a plain series; several for `remote="other"`, `port="other"` or a
/// CIDR block), the highest. Never the ratio of a sum: unrelated destinations
/// each have their own port range.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Worst {
    pub remote: String,
    pub port: u16,
    pub ratio: f64,
    /// The real destination behind the ratio (`addr:port`, or `addr` for the
    /// inbound ratio), and how many real destinations the series sums.
    pub worst: String,
    pub destinations: u64,
}

/// Per series (the key `fold` gives each destination), the highest ratio of
/// its real destinations: `(series key, destination shown, held, capacity)`.
pub fn worst_per_series<K: Ord + Clone>(
    destinations: impl IntoIterator<Item = (K, String, u64)>,
    capacity: u64,
) -> BTreeMap<K, (f64, String, u64)> {
    let mut out: BTreeMap<K, (f64, String, u64)> = BTreeMap::new();
    if capacity == 0 {
        return out;
    }
    for (key, dest, held) in destinations {
        let ratio = (held as f64 / capacity as f64).min(1.0);
        let slot = out.entry(key).or_insert((-1.0, String::new(), 0));
        slot.2 += 1;
        if ratio > slot.0 || (ratio == slot.0 && dest < slot.1) {
            (slot.0, slot.1) = (ratio, dest);
        }
    }
    out
}

/// `timewait_inbound_remote_port_ratio` of one series: its busiest real
/// remote's TIME_WAIT over the ports one remote can use.
#[derive(Debug, Clone, Serialize)]
pub struct InboundRatio {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub netns: Option<u32>,
    pub remote: String,
    pub ratio: f64,
    /// The real remote address behind the ratio, and how many the series sums.
    pub worst: String,
    pub destinations: u64,
}

/// The ratios of the series, each of one real destination: per outbound
/// series of this namespace the highest `ports in use / range` of the
/// destinations (address:port) it sums, and per remote series the highest
/// `inbound TIME_WAIT / --remote-port-range-size` of the addresses it sums.
pub fn worst_ratios(
    counts: &HashMap<AggKey, i64>,
    fold: &Fold,
    range: Option<u64>,
    opts: &AggOptions,
) -> (Vec<Worst>, Vec<InboundRatio>) {
    let mut outbound: BTreeMap<(std::net::IpAddr, u16), u64> = BTreeMap::new();
    let mut inbound: BTreeMap<(Option<u32>, std::net::IpAddr), u64> = BTreeMap::new();
    for (k, n) in counts {
        let Ok(n) = u64::try_from(*n) else { continue };
        if k.direction == timewait_common::DIRECTION_OUTBOUND {
            // The port range is this namespace's: other namespaces (with
            // --all-netns) may have their own, so no ratio for them.
            if !opts.per_netns {
                *outbound.entry((remote_addr(k), k.port)).or_default() += n;
            }
        } else if k.substate == timewait_common::TCP_TIME_WAIT {
            *inbound.entry((opts.per_netns.then_some(k.netns), remote_addr(k))).or_default() += n;
        }
    }
    let ratios = match range {
        Some(range) => worst_per_series(
            outbound.into_iter().filter(|(_, n)| *n > 0).map(|((addr, port), n)| {
                let series = fold.series_of(None, Direction::Outbound, remote_label(addr, opts), port);
                (series, std::net::SocketAddr::new(addr, port).to_string(), n)
            }),
            range,
        )
        .into_iter()
        .map(|((remote, port), (ratio, worst, destinations))| Worst { remote, port, ratio, worst, destinations })
        .collect(),
        None => Vec::new(),
    };
    let inbound_ratios = worst_per_series(
        inbound.into_iter().filter(|(_, n)| *n > 0).map(|((netns, addr), n)| {
            ((netns, fold.remote(remote_label(addr, opts))), addr.to_string(), n)
        }),
        opts.remote_port_range_size,
    )
    .into_iter()
    .map(|((netns, remote), (ratio, worst, destinations))| InboundRatio { netns, remote, ratio, worst, destinations })
    .collect();
    (ratios, inbound_ratios)
}
