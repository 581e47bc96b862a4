//! Segments a minisocket handled: `kfree_skb(struct sk_buff *, void *location,
//! enum skb_drop_reason, struct sock *rx_sk)`. `rx_sk` exists since 6.11
//! (include/trace/events/skb.h); before it (`(skb, location)` up to 5.16,
//! `+ reason` from 5.17) a dropped segment's minisocket is not visible here
//! (`skb->sk` is not set for it), so the program does not load there and the
//! daemon reports segment kinds and SYN verdicts as unavailable on this path.
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
use timewait_common::{HINT_RESET, TW_CANCELLED, TW_LIVE, counter};

use crate::{
    maps::{TW_SOCKS, add_syn, bump, config},
    tw::{remote_key, resubstate},
};

use crate::sock::{TCP_ACK, segment, segment_kind};

#[btf_tracepoint(function = "kfree_skb")]
pub fn tw_kfree_skb(ctx: BtfTracePointContext) -> u32 {
    let _ = try_kfree_skb(ctx.arg(0), ctx.arg(3));
    0
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
    let (flags, payload) = segment(&cfg, skb, entry.key.family)?;
    let kind = segment_kind(flags, payload);
    bump(kind);
    if kind == counter::SEG_SYN && flags & TCP_ACK == 0 {
        // A SYN that reaches discard_it was not accepted: an old
        // sequence/timestamp (answered with an ACK), or a FIN_WAIT2 substate.
        add_syn(&remote_key(entry), true);
    }
    if entry.state == TW_LIVE {
        // Only read the minisocket while its timer holds a reference.
        resubstate(&cfg, entry, rx_sk)?;
    } else if entry.state == TW_CANCELLED && (kind == counter::SEG_RST || kind == counter::SEG_SYN) {
        entry.hint = HINT_RESET;
    }
    Ok(())
}
