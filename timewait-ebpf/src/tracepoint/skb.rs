//! Segments a minisocket handled: `kfree_skb(struct sk_buff *, void *location,
//! enum skb_drop_reason, struct sock *rx_sk)`. `rx_sk` exists since 6.11
//! (include/trace/events/skb.h); before it (`(skb, location)` up to 5.16,
//! `+ reason` from 5.17) a dropped segment's minisocket is not visible here
//! (`skb->sk` is not set for it), so the program does not load there and the
//! daemon reports segment kinds and SYN verdicts as unavailable on this path.
//!
//! Every segment a minisocket processes ends in `tcp_v4_rcv`'s / `tcp_v6_rcv`'s
//! `discard_it` (net/ipv4/tcp_ipv4.c) with `rx_sk` = the minisocket, except a
//! SYN it lets through to a listener (see `lifecycle`). So here we count
//! dropped segments by kind and SYNs not accepted, re-read the substate (the
//! peer's FIN turns FIN_WAIT2 into TIME_WAIT), and close a minisocket an RST
//! killed (or that answered a SYN with one): a reset.

use aya_ebpf::{helpers::bpf_ktime_get_ns, macros::btf_tracepoint, programs::BtfTracePointContext};
use timewait_common::{Config, FOUND_BY_SEGMENT, TCP_TIME_WAIT, TwEntry, counter};

use super::{Tracepoints, maps::ENDED};
use crate::{
    maps::{TW_SOCKS, add_syn, bump, config, read},
    sock::{netns_of, watched},
    tw::{bump_created, close, follow, remote_key, resubstate},
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
    let Some(e) = TW_SOCKS.get_ptr_mut(timer).or_else(|| found_by_segment(cfg, skb, rx_sk, timer)) else {
        return Ok(());
    };
    // SAFETY: e points to this minisocket's entry; a concurrent expiry on
    // another CPU can remove it, in which case the writes below land in an
    // entry nobody reads again.
    let entry = unsafe { &mut *e };
    let (flags, payload) = segment(cfg, skb, entry.key.family)?;
    let kind = segment_kind(flags, payload);
    bump(kind);
    if kind == counter::SEG_SYN && flags & TCP_ACK == 0 {
        // A SYN that reaches discard_it was not accepted: an old
        // sequence/timestamp (answered with an ACK), or a FIN_WAIT2 substate.
        add_syn(&remote_key(entry), true);
    }
    // A minisocket that processed an RST (TIME_WAIT assassination, or any
    // RST in FIN_WAIT2), or answered a SYN with one (FIN_WAIT2), was killed
    // before `discard_it`: its timer is no longer pending.
    if read::<u64>(timer, cfg.offsets.timer_pprev)? == 0 {
        if kills(kind) {
            let copy = *entry;
            if close::<Tracepoints>(timer, &copy, counter::CLOSED_RESET).is_some() && copy.from_snapshot == FOUND_BY_SEGMENT {
                // Its creation may be yet to be told on the CPU that hashed
                // it: that CPU must not follow it now.
                // SAFETY: helper without preconditions.
                let now = unsafe { bpf_ktime_get_ns() };
                let _ = ENDED.insert(&timer, &now, 0);
            }
        }
        // Otherwise it is expiring on another CPU: the expiry closes it.
        return Ok(());
    }
    // Only read the minisocket while its timer holds a reference.
    resubstate(cfg, entry, rx_sk)?;
    Ok(())
}

/// Segments that kill the minisocket they reach (see above).
#[inline(always)]
fn kills(kind: u32) -> bool {
    kind == counter::SEG_RST || kind == counter::SEG_SYN
}

/// A segment reached minisocket `tw`, which no entry follows: one whose
/// creation is yet to be told (`tcp_time_wait()` hashed it on another CPU a
/// moment ago and has not yet closed its socket, where `lifecycle::created`
/// follows it: a peer that answers at once, or a NAT that hands the port
/// straight to the next connection, gets a SYN there first), or one a lost
/// event left unfollowed. Followed from here (`FOUND_BY_SEGMENT`), its
/// creation counted; the socket's close takes it over. Not when it is
/// already expiring on another CPU (timer not pending, and not killed by
/// this segment): the expiry found nothing to close.
#[inline(never)]
fn found_by_segment(cfg: &Config, skb: u64, tw: u64, timer: u64) -> Option<*mut TwEntry> {
    let h = crate::sock::head(cfg, tw).ok()?;
    if h.state != TCP_TIME_WAIT {
        return None;
    }
    if read::<u64>(timer, cfg.offsets.timer_pprev).ok()? == 0 {
        let (flags, payload) = segment(cfg, skb, h.family).ok()?;
        if !kills(segment_kind(flags, payload)) {
            return None;
        }
    }
    let netns = netns_of(cfg, tw).ok()?;
    if !watched(cfg, netns) {
        return None;
    }
    if let Some(key) = follow::<Tracepoints>(cfg, tw, timer, netns, FOUND_BY_SEGMENT as u32) {
        bump_created(&key);
        bump(counter::OUT_OF_ORDER);
    }
    // Followed now, or by the creating CPU since the first lookup.
    TW_SOCKS.get_ptr_mut(timer)
}
