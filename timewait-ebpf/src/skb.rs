//! Segments a minisocket handled: `kfree_skb(struct sk_buff *, void *location,
//! enum skb_drop_reason, struct sock *rx_sk)` (`rx_sk` since 6.11).
//!
//! Every segment a minisocket processes ends in `tcp_v4_rcv`'s / `tcp_v6_rcv`'s
//! `discard_it` (net/ipv4/tcp_ipv4.c) with `rx_sk` = the minisocket, except a
//! SYN it lets through to a listener (see `timer::request_timer_started`).
//! So here we count dropped segments by kind and SYNs not accepted, re-read
//! the substate (the peer's FIN turns FIN_WAIT2 into TIME_WAIT, and that
//! re-arm may emit no timer event at all when the timer stays in its wheel
//! bucket), and note an RST (or the RST a FIN_WAIT2 minisocket answers a SYN
//! with) that follows a cancel: a reset.

use aya_ebpf::{macros::btf_tracepoint, programs::BtfTracePointContext};
use timewait_common::{AF_INET, HINT_RESET, RemoteKey, TW_CANCELLED, TW_LIVE, counter};

use crate::maps::{COUNTS, TW_SOCKS, add, add_syn, bump, config, read};

const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;

#[btf_tracepoint(function = "kfree_skb")]
pub fn tw_kfree_skb(ctx: BtfTracePointContext) -> u32 {
    let _ = try_kfree_skb(ctx.arg(0), ctx.arg(3));
    0
}

/// The segment's TCP flags and payload length (from the IP header's length,
/// so it does not depend on where `skb->data` points by now).
#[inline(always)]
fn segment(skb: u64, family: u16) -> Result<(u8, u32), i64> {
    let cfg = config();
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

#[inline(always)]
fn try_kfree_skb(skb: u64, rx_sk: u64) -> Result<(), i64> {
    if rx_sk == 0 {
        return Ok(());
    }
    let cfg = config();
    let timer = rx_sk + cfg.offsets.tw_timer as u64;
    let Some(e) = TW_SOCKS.get_ptr_mut(timer) else {
        return Ok(());
    };
    // SAFETY: e points to this minisocket's entry; a concurrent expiry on
    // another CPU can remove it, in which case the writes below land in an
    // entry nobody reads again.
    let entry = unsafe { &mut *e };
    let (flags, payload) = segment(skb, entry.key.family)?;
    let kind = if flags & TCP_RST != 0 {
        counter::SEG_RST
    } else if flags & TCP_SYN != 0 {
        counter::SEG_SYN
    } else if flags & TCP_FIN != 0 {
        counter::SEG_FIN
    } else if payload > 0 {
        counter::SEG_DATA
    } else {
        counter::SEG_ACK
    };
    bump(kind);
    if kind == counter::SEG_SYN && flags & TCP_ACK == 0 {
        // A SYN that reaches discard_it was not accepted: an old
        // sequence/timestamp (answered with an ACK), or a FIN_WAIT2 substate.
        add_syn(
            &RemoteKey { remote: entry.key.remote, netns: entry.key.netns, family: entry.key.family, _pad: [0; 2] },
            true,
        );
    }
    if entry.state == TW_LIVE {
        // Only read the minisocket while its timer holds a reference.
        let substate: u8 = read(rx_sk, cfg.offsets.tw_substate)?;
        if substate != entry.key.substate {
            let mut key = entry.key;
            key.substate = substate;
            if entry.counted == 1 {
                add(&COUNTS, &entry.key, -1);
                entry.counted = 0;
            }
            entry.key = key;
            if add(&COUNTS, &key, 1) {
                entry.counted = 1;
            }
            bump(counter::SUBSTATE_CHANGES);
        }
    } else if entry.state == TW_CANCELLED && (kind == counter::SEG_RST || kind == counter::SEG_SYN) {
        entry.hint = HINT_RESET;
    }
    Ok(())
}
