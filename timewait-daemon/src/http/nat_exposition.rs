//! The NAT side's series: NAT source ports per (NAT address, destination), their ratios, conntrack's entries, limit and stats.
//!
//! Nothing is written for a side that is not watched (absent, never
//! zeros); `timewait_probe_path` says why.

use prometheus::proto::MetricType::{COUNTER, GAUGE};

use super::exposition::{Family, with_netns};
use crate::nat::{RangeSource, reader::NatView};

/// `timewait_probe_path` rows of the NAT side's signals.
pub fn paths(v: &NatView) -> Vec<(&'static str, &'static str)> {
    match v.state {
        "off" => vec![("nat_ports", "off"), ("conntrack_stats", "off"), ("nat_port_range", "off")],
        "unavailable" => vec![("nat_ports", "unavailable"), ("conntrack_stats", "unavailable"), ("nat_port_range", "unavailable")],
        _ => {
            let ports = if v.unavailable.is_some() && v.dump_entries == 0 && v.conntrack.is_empty() {
                "unavailable"
            } else {
                "ctnetlink"
            };
            let stats = if v.conntrack.is_empty() { "unavailable" } else { "procfs" };
            let range = if ports == "unavailable" { "unavailable" } else { v.range_path };
            vec![("nat_ports", ports), ("conntrack_stats", stats), ("nat_port_range", range)]
        }
    }
}

pub fn families(v: &NatView, fams: &mut Vec<Family>) {
    if v.state != "watched" {
        return;
    }
    let mut in_use = Family::new(
        "timewait_nat_ports_in_use",
        "conntrack entries holding a source port of nat_address toward remote:port (reply tuple from remote:port to nat_address; equals `conntrack -L` filtered so).",
        GAUGE,
    );
    let mut tw = Family::new("timewait_nat_ports_time_wait", "Of timewait_nat_ports_in_use, entries in conntrack's TCP TIME_WAIT.", GAUGE);
    let mut ratio = Family::new(
        "timewait_nat_port_exhaustion_ratio",
        "NAT source ports in use toward one real destination / the ports the NAT rule allows nat_address, 0..1 (a folded series: its busiest real destination's).",
        GAUGE,
    );
    let mut left = Family::new(
        "timewait_nat_port_exhaustion_seconds",
        "Estimated seconds until the NAT source ports of nat_address toward remote:port run out at the current rate of new conntrack entries, \
         their expiries taken into account (conntrack's timeouts as the hold time); +Inf when not heading there; a folded series: its soonest real destination's.",
        GAUGE,
    );
    for s in &v.series {
        let netns = s.netns.map(|n| n.to_string());
        let labels = with_netns(
            &[
                ("nat_address", s.nat_address.as_str()),
                ("remote", s.remote.as_str()),
                ("port", s.port.as_str()),
                ("protocol", s.protocol.label()),
            ],
            &netns,
        );
        in_use.sample(&labels, s.in_use as f64);
        tw.sample(&labels, s.time_wait as f64);
        if let Some(r) = s.ratio {
            ratio.sample(&labels, r);
        }
        if let Some(secs) = s.seconds {
            left.sample(&labels, secs);
        }
    }
    fams.push(in_use);
    fams.push(tw);
    fams.push(ratio);
    fams.push(left);
    let mut size = Family::new(
        "timewait_nat_port_range_size",
        "Source ports a NAT address may hand out per destination (the ratio's denominator): from the NAT rules in the kernel's ruleset (source=\"nftables\"), --nat-port-range (\"flag\"), or the kernel's 1024-65535 where no rule names ports (\"default\").",
        GAUGE,
    );
    for r in &v.ranges {
        let netns = r.netns.map(|n| n.to_string());
        let nat = r.nat_address.to_string();
        let source = match r.source {
            RangeSource::Nftables => "nftables",
            RangeSource::Flag => "flag",
            RangeSource::Default => "default",
        };
        size.sample(&with_netns(&[("nat_address", nat.as_str()), ("protocol", r.protocol.label()), ("source", source)], &netns), f64::from(r.range.size()));
    }
    fams.push(size);

    let mut entries = Family::new("timewait_conntrack_entries", "conntrack's entries now (nf_conntrack_count).", GAUGE);
    let mut limit = Family::new("timewait_conntrack_limit", "conntrack's table limit (nf_conntrack_max).", GAUGE);
    let mut stat = Family::new(
        "timewait_conntrack_stat_total",
        "conntrack's per-CPU stats summed (/proc/net/stat/nf_conntrack): insert_failed and drop move when NAT finds no free port.",
        COUNTER,
    );
    for c in &v.conntrack {
        let netns = c.netns.map(|n| n.to_string());
        entries.sample(&with_netns(&[], &netns), c.stats.entries as f64);
        if let Some(l) = c.stats.limit {
            limit.sample(&with_netns(&[], &netns), l as f64);
        }
        for (name, n) in &c.stats.stats {
            stat.sample(&with_netns(&[("stat", name)], &netns), *n as f64);
        }
    }
    fams.push(entries);
    fams.push(limit);
    fams.push(stat);

    let mut age = Family::new("timewait_nat_last_dump_age_seconds", "Seconds since the last conntrack dump ended.", GAUGE);
    age.sample(&[], v.age_seconds);
    fams.push(age);
    let mut n = Family::new("timewait_nat_dump_entries", "Entries the last conntrack dump read (every watched namespace).", GAUGE);
    n.sample(&[], v.dump_entries as f64);
    fams.push(n);
    let mut d = Family::new("timewait_nat_dump_duration_seconds", "Wall-clock seconds the last conntrack dump took.", GAUGE);
    d.sample(&[], v.dump_seconds);
    fams.push(d);
    let mut over = Family::new(
        "timewait_nat_entries_over_limit",
        "Entries of the last dump toward destinations beyond --nat-max-destinations (counted under remote=\"other\", without a ratio).",
        GAUGE,
    );
    over.sample(&[], v.over_limit_entries as f64);
    fams.push(over);
}
