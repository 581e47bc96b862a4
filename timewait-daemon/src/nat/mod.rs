//! The NAT room: NAT source ports per (NAT address, destination) from conntrack, the port range each NAT rule allows, conntrack's own stats.
//!
//! A third source of kernel data beside `kernel/` (the eBPF maps), read
//! from userspace over netlink and procfs:
//! - `ctnetlink.rs`: one conntrack dump per interval, folded while it
//!   streams into counts per (`nat_address`, `remote`, `port`, `protocol`)
//!   by each entry's reply tuple (`fold.rs`);
//! - `ruleset.rs`: the port range each SNAT/MASQUERADE rule allows, from
//!   the kernel's nf_tables ruleset (the ratio's denominator);
//! - `stats.rs`: conntrack's entries, its limit and its per-CPU stats from
//!   `/proc/net/stat/nf_conntrack` (world-readable, per namespace);
//! - `estimate.rs`: seconds until a destination's ports run out;
//! - `reader.rs`: the thread that does all of it per watched namespace and
//!   publishes a [`NatSnapshot`] the exposition, `snapshot` and `top` read.
//!
//! Packets dropped for want of a NAT port, per destination, come from the
//! eBPF side (`kfree_skb` with the netfilter drop reason, where the kernel
//! has it): `kernel/` serves them, `collect/` adds them to the view.
//!
//! `RESEARCH.md` beside this file holds what was measured before it was
//! built (dump cost at 100k and 1M entries, the crates, the rules' ranges,
//! per-destination failures, conntrack's eviction of TIME_WAIT from 6.5 on).

use std::net::IpAddr;

pub mod ctnetlink;
pub mod estimate;
pub mod fold;
pub mod reader;
pub mod ruleset;
pub mod stats;

/// The layer-4 protocols whose NAT source ports are counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    /// From an IP protocol number; other protocols hold no ports.
    pub fn from_ip(proto: u8) -> Option<Self> {
        match proto {
            6 => Some(Self::Tcp),
            17 => Some(Self::Udp),
            _ => None,
        }
    }

    pub fn ip_number(self) -> u8 {
        match self {
            Self::Tcp => 6,
            Self::Udp => 17,
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
        }
    }
}

/// One real destination seen from a NAT address: the key of every
/// `timewait_nat_*` series before folding. A conntrack entry belongs to it
/// when its reply tuple goes from `remote:port` to `nat_address`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct Destination {
    pub nat_address: IpAddr,
    pub remote: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
}

/// An inclusive range of source ports a NAT rule may hand out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct PortRange {
    pub min: u16,
    pub max: u16,
}

impl PortRange {
    /// What SNAT/MASQUERADE use when the rule names no ports, for client
    /// source ports >= 1024 (every ephemeral range): `nf_nat_l4proto_unique_tuple`.
    pub const KERNEL_DEFAULT: PortRange = PortRange { min: 1024, max: 65535 };

    pub fn size(self) -> u32 {
        u32::from(self.max.saturating_sub(self.min)) + 1
    }

    /// "A-B" or "A" (one port).
    pub fn parse(s: &str) -> Result<Self, String> {
        let bad = || format!("invalid port range {s:?}: expected A-B with 1 <= A <= B <= 65535");
        let (a, b) = s.split_once('-').unwrap_or((s, s));
        let (min, max): (u16, u16) = (a.trim().parse().map_err(|_| bad())?, b.trim().parse().map_err(|_| bad())?);
        if min == 0 || min > max {
            return Err(bad());
        }
        Ok(Self { min, max })
    }
}

/// Where the denominator of a ratio came from (`timewait_probe_path{signal="nat_port_range"}`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RangeSource {
    /// A SNAT/MASQUERADE rule in the kernel's nf_tables ruleset (iptables-nft or nft).
    Nftables,
    /// `--nat-port-range`.
    Flag,
    /// No rule names ports for this address: the kernel's 1024-65535.
    Default,
}
