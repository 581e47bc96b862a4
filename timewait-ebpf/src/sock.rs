//! Reading a minisocket (`struct inet_timewait_sock`) or socket
//! (`struct sock_common` is the first member of both) through the offsets the
//! daemon found in the running kernel's BTF.

use timewait_common::{AF_INET, AF_INET6, AggKey, Config, DIRECTION_INBOUND, DIRECTION_OUTBOUND, SockHead};

use timewait_common::counter;

use crate::maps::{LISTEN_PORTS, read};

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// A segment's TCP flags and payload length (from the IP header's length,
/// so it does not depend on where `skb->data` points by now).
#[inline(always)]
pub fn segment(cfg: &Config, skb: u64, family: u16) -> Result<(u8, u32), i64> {
    let head: u64 = read(skb, cfg.offsets.skb_head)?;
    let th = head + read::<u16>(skb, cfg.offsets.skb_transport_header)? as u64;
    let nh = head + read::<u16>(skb, cfg.offsets.skb_network_header)? as u64;
    let flags: u8 = read(th, 13)?;
    let doff = (read::<u8>(th, 12)? >> 4) as u32 * 4;
    let ip_payload = if family == AF_INET {
        let ihl = (read::<u8>(nh, 0)? & 0x0f) as u32 * 4;
        (u16::from_be(read::<u16>(nh, 2)?) as u32).saturating_sub(ihl)
    } else {
        // IPv6 payload length; extension headers sit between, but a segment
        // that reached TCP with them is vanishingly rare for TIME_WAIT.
        u16::from_be(read::<u16>(nh, 4)?) as u32
    };
    Ok((flags, ip_payload.saturating_sub(doff)))
}

/// `counter::SEG_*` of a segment.
#[inline(always)]
pub fn segment_kind(flags: u8, payload: u32) -> u32 {
    if flags & TCP_RST != 0 {
        counter::SEG_RST
    } else if flags & TCP_SYN != 0 {
        counter::SEG_SYN
    } else if flags & TCP_FIN != 0 {
        counter::SEG_FIN
    } else if payload > 0 {
        counter::SEG_DATA
    } else {
        counter::SEG_ACK
    }
}

/// Inode number of the network namespace `sk` belongs to.
#[inline(always)]
pub fn netns_of(cfg: &Config, sk: u64) -> Result<u32, i64> {
    let net: u64 = read(sk, cfg.offsets.skc_net)?;
    read(net, cfg.offsets.net_inum)
}

/// `kernfs_node.id` of the cgroup v2 root: where a socket belongs when its
/// `sock_cgroup_data` holds no cgroup pointer (net_prio/net_cls in use on
/// 5.10-5.14).
pub const ROOT_CGROUP_ID: u64 = 1;

/// The cgroup (v2) id owning full socket `sk`, with attribution on (0 when
/// off or unreadable): what `sock_cgroup_ptr()` gives, as an id.
#[inline(always)]
pub fn cgroup_of(cfg: &Config, sk: u64) -> u64 {
    if cfg.cgroups == 0 {
        return 0;
    }
    let Ok(v) = read::<u64>(sk, cfg.offsets.sk_cgrp_data) else {
        return 0;
    };
    if v == 0 || v & 3 != 0 {
        return ROOT_CGROUP_ID;
    }
    let Ok(kn) = read::<u64>(v, cfg.offsets.cgroup_kn) else {
        return 0;
    };
    read::<u64>(kn, cfg.offsets.kernfs_node_id).unwrap_or(0)
}

/// The calling task's cgroup (v2) id, with attribution on; 0 when off.
#[inline(always)]
pub fn current_cgroup(cfg: &Config) -> u64 {
    if cfg.cgroups == 0 {
        return 0;
    }
    // SAFETY: helper without preconditions (tracing programs, 4.18+).
    unsafe { aya_ebpf::helpers::generated::bpf_get_current_cgroup_id() }
}

/// Whether events of namespace `inum` are ours (the daemon's, or all).
#[inline(always)]
pub fn watched(cfg: &Config, inum: u32) -> bool {
    cfg.netns == 0 || cfg.netns == inum
}

/// Key of `LISTEN_PORTS` for a local port in a namespace.
#[inline(always)]
pub fn listen_key(netns: u32, port: u16) -> u64 {
    ((netns as u64) << 16) | port as u64
}

/// Whether local port `port` has a listener in namespace `netns`.
#[inline(always)]
pub fn is_listening(netns: u32, port: u16) -> bool {
    // SAFETY: the value is a plain i64 read once; a concurrent update only
    // changes which side of zero we see, as it would a moment later anyway.
    unsafe { LISTEN_PORTS.get(listen_key(netns, port)) }.is_some_and(|n| *n > 0)
}

/// The head of `sk`'s `sock_common`: one read where the layout is the usual
/// one (`Config::head_fast`), field by field at the BTF offsets otherwise.
#[inline(always)]
pub fn head(cfg: &Config, sk: u64) -> Result<SockHead, i64> {
    if cfg.head_fast != 0 {
        return read::<SockHead>(sk, 0);
    }
    let o = &cfg.offsets;
    Ok(SockHead {
        daddr: read(sk, o.skc_daddr)?,
        rcv_saddr: read(sk, o.skc_rcv_saddr)?,
        hash: read(sk, o.skc_hash)?,
        dport: read(sk, o.skc_dport)?,
        num: read(sk, o.skc_num)?,
        family: read(sk, o.skc_family)?,
        state: read(sk, o.skc_state)?,
        _flags: 0,
    })
}

/// Remote address of a socket whose head is `h` (IPv4 in the first 4 bytes).
#[inline(always)]
pub fn remote_in(cfg: &Config, sk: u64, h: &SockHead) -> Result<[u8; 16], i64> {
    if h.family != AF_INET {
        return remote_of(cfg, sk, h.family);
    }
    let mut remote = [0u8; 16];
    remote[..4].copy_from_slice(&h.daddr);
    Ok(remote)
}

/// Remote address of a socket (IPv4 in the first 4 bytes).
#[inline(always)]
pub fn remote_of(cfg: &Config, sk: u64, family: u16) -> Result<[u8; 16], i64> {
    let mut remote = [0u8; 16];
    if family == AF_INET {
        let a: [u8; 4] = read(sk, cfg.offsets.skc_daddr)?;
        remote[..4].copy_from_slice(&a);
    } else if family == AF_INET6 {
        remote = read(sk, cfg.offsets.skc_v6_daddr)?;
    } else {
        return Err(-1);
    }
    Ok(remote)
}

/// The port-range rule for a socket the daemon did not see open and whose
/// local port has no listener: a local port inside `ip_local_port_range`
/// and a remote port outside it is an active open; anything else was
/// accepted (by a listener since gone). False when the range is unknown.
#[inline(always)]
pub fn unseen_inbound(cfg: &Config, lport: u16, rport: u16) -> bool {
    let ephemeral = |p: u16| p >= cfg.port_lo && p <= cfg.port_hi;
    cfg.port_lo != 0 && !(ephemeral(lport) && !ephemeral(rport))
}

/// Builds the aggregation key of minisocket `tw` in namespace `netns`.
/// Direction is inbound when the local port has a listener in that namespace.
/// For a minisocket the daemon did not see created (`unseen`: the start-up
/// snapshot), whose listener may be gone (a server that stopped), the port
/// ranges decide when no listener does: a local port inside
/// `ip_local_port_range` and a remote port outside it is an active open
/// (outbound), anything else was accepted (inbound, on its local port).
#[inline(always)]
pub fn tw_key_in(cfg: &Config, tw: u64, h: &SockHead, netns: u32, unseen: bool) -> Result<AggKey, i64> {
    let substate: u8 = read(tw, cfg.offsets.tw_substate)?;
    key_in(cfg, tw, h, netns, unseen, substate)
}

/// The aggregation key of socket or minisocket `s` (head `h`) under
/// `substate`, as `tw_key_in` says.
#[inline(always)]
pub fn key_in(cfg: &Config, s: u64, h: &SockHead, netns: u32, unseen: bool, substate: u8) -> Result<AggKey, i64> {
    let (lport, rport) = (h.num, u16::from_be(h.dport));
    let mut key = AggKey {
        netns,
        family: h.family,
        substate,
        ..AggKey::default()
    };
    key.remote = remote_in(cfg, s, h)?;
    let inbound = is_listening(netns, lport) || (unseen && unseen_inbound(cfg, lport, rport));
    if inbound {
        key.direction = DIRECTION_INBOUND;
        key.port = lport;
    } else {
        key.direction = DIRECTION_OUTBOUND;
        key.port = rport;
    }
    Ok(key)
}
