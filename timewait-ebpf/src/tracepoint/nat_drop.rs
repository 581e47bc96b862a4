//! Packets dropped because NAT found no free source port, per destination: `tp_btf/kfree_skb` with the netfilter drop reason (`--nat`).
//!
//! When SNAT/MASQUERADE finds no free port it keeps the clashing tuple, and
//! `__nf_conntrack_confirm` refuses the entry at the last hook: `nf_hook_slow`
//! frees the packet with `SKB_DROP_REASON_NETFILTER_DROP` (5.18+), the
//! packet's headers already translated (source = NAT address and the
//! clashing port, destination = the real destination) and `skb->_nfct` still
//! the losing entry: `IPS_SRC_NAT`, never `IPS_CONFIRMED`. A rule's DROP
//! before NAT has no `IPS_SRC_NAT`; one after NAT frees elsewhere
//! (`nft_do_chain` on 6.18), hence the test of `location`
//! (`nat/RESEARCH.md` §3.3-3.4). Independent of the TIME_WAIT programs:
//! loaded only when the daemon asks, on kernels whose `kfree_skb` has a
//! `reason` argument (5.17+; 5.10 refuses arg 2 at load).
//!
//! Counts are cumulative and never removed (a plain hash map, not LRU); a
//! drop that fits no key (table full, headers unreadable) is counted in
//! `NAT_UNATTRIBUTED[0]`, so the sum is every drop seen.

use aya_ebpf::{
    macros::{btf_tracepoint, map},
    maps::{Array, HashMap},
    programs::BtfTracePointContext,
};
use timewait_common::{AF_INET, AF_INET6, Config, NAT_DROP_KEYS, NatConfig, NatDropKey};

use crate::{
    maps::{BPF_NOEXIST, atomic_add, config, is_eexist, read},
    sock::watched,
};

/// Set by the daemon with `EbpfLoader::set_global` (`NatConfig`).
#[unsafe(no_mangle)]
static NAT_CONFIG: NatConfig = NatConfig::ZERO;

/// Drops per destination; never drained.
#[map]
pub static NAT_DROPS: HashMap<NatDropKey, u64> = HashMap::with_max_entries(NAT_DROP_KEYS, 0);

/// `[0]`: drops that fit no key of `NAT_DROPS`.
#[map]
pub static NAT_UNATTRIBUTED: Array<u64> = Array::with_max_entries(1, 0);

/// `include/uapi/linux/netfilter/nf_conntrack_common.h`.
const IPS_CONFIRMED: u64 = 1 << 3;
const IPS_SRC_NAT: u64 = 1 << 4;
const IPS_TEMPLATE: u64 = 1 << 11;
/// `NFCT_PTRMASK`: the low 3 bits of `_nfct` are the ctinfo.
const NFCT_PTRMASK: u64 = !7;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;

#[inline(always)]
fn nat_config() -> &'static NatConfig {
    let p: *const NatConfig = &raw const NAT_CONFIG;
    // SAFETY: as `maps::config`: an opaque pointer to the global, so the
    // compiled-in zeros are not folded in.
    let p = unsafe { core::ptr::read_volatile(&p) };
    // SAFETY: NAT_CONFIG's address; read-only, lives forever.
    unsafe { &*p }
}

#[btf_tracepoint(function = "kfree_skb")]
pub fn nat_kfree_skb(ctx: BtfTracePointContext) -> u32 {
    let (skb, location, reason): (u64, u64, u64) = (ctx.arg(0), ctx.arg(1), ctx.arg(2));
    let _ = try_nat_drop(skb, location, reason as u32);
    0
}

#[inline(always)]
fn try_nat_drop(skb: u64, location: u64, reason: u32) -> Result<(), i64> {
    let nc = nat_config();
    if reason != nc.netfilter_drop || nc.skb_nfct == 0 {
        return Ok(());
    }
    if nc.hook_slow_start != 0 && (location < nc.hook_slow_start || location >= nc.hook_slow_end) {
        return Ok(());
    }
    let ct = read::<u64>(skb, nc.skb_nfct)? & NFCT_PTRMASK;
    if ct == 0 {
        return Ok(());
    }
    let status: u64 = read(ct, nc.ct_status)?;
    if status & IPS_SRC_NAT == 0 || status & (IPS_CONFIRMED | IPS_TEMPLATE) != 0 {
        return Ok(());
    }
    let cfg = config();
    let net: u64 = read(ct, nc.ct_net)?;
    let netns: u32 = read(net, cfg.offsets.net_inum)?;
    if !watched(cfg, netns) {
        return Ok(());
    }
    let mut key = NatDropKey { netns, ..NatDropKey::default() };
    if fill_key(cfg, nc, skb, ct, &mut key).is_err() {
        unattributed();
        return Ok(());
    }
    count(&key);
    Ok(())
}

/// The destination from the packet's (translated) IP header and, for TCP
/// and UDP, its L4 header; other protocols, and IPv6 with extension
/// headers, from the entry's reply tuple (remote:port -> NAT address).
#[inline(always)]
fn fill_key(cfg: &Config, nc: &NatConfig, skb: u64, ct: u64, key: &mut NatDropKey) -> Result<(), i64> {
    let head: u64 = read(skb, cfg.offsets.skb_head)?;
    let nh = head + read::<u16>(skb, cfg.offsets.skb_network_header)? as u64;
    let first: u8 = read(nh, 0)?;
    let (proto, l4) = match first >> 4 {
        4 => {
            key.family = AF_INET;
            let src: [u8; 4] = read(nh, 12)?;
            let dst: [u8; 4] = read(nh, 16)?;
            key.nat_address[..4].copy_from_slice(&src);
            key.remote[..4].copy_from_slice(&dst);
            (read::<u8>(nh, 9)?, nh + ((first & 0x0f) as u64) * 4)
        }
        6 => {
            key.family = AF_INET6;
            key.nat_address = read(nh, 8)?;
            key.remote = read(nh, 24)?;
            (read::<u8>(nh, 6)?, nh + 40)
        }
        _ => return Err(-1),
    };
    if proto == IPPROTO_TCP || proto == IPPROTO_UDP {
        key.l4proto = proto;
        key.port = u16::from_be(read::<u16>(l4, 2)?);
        return Ok(());
    }
    let reply = ct + nc.reply_tuple as u64;
    key.l4proto = read(reply, nc.tuple_dst_protonum)?;
    key.port = u16::from_be(read::<u16>(reply, nc.tuple_src_port)?);
    key.remote = read(reply, nc.tuple_src_u3)?;
    key.nat_address = read(reply, nc.tuple_dst_u3)?;
    if key.family == AF_INET {
        // nf_inet_addr: an IPv4 address in its first 4 bytes, the rest zero.
        key.remote[4..].fill(0);
        key.nat_address[4..].fill(0);
    }
    Ok(())
}

/// One more drop under `key`; in `NAT_UNATTRIBUTED` when the table is full.
#[inline(always)]
fn count(key: &NatDropKey) {
    if let Some(p) = NAT_DROPS.get_ptr_mut(key) {
        atomic_add(p.cast(), 1);
        return;
    }
    match NAT_DROPS.insert(key, 0, BPF_NOEXIST) {
        Ok(()) => {}
        Err(e) if is_eexist(e.into()) => {}
        Err(_) => {
            unattributed();
            return;
        }
    }
    match NAT_DROPS.get_ptr_mut(key) {
        Some(p) => atomic_add(p.cast(), 1),
        None => unattributed(),
    }
}

#[inline(always)]
fn unattributed() {
    if let Some(p) = NAT_UNATTRIBUTED.get_ptr_mut(0) {
        atomic_add(p.cast(), 1);
    }
}
