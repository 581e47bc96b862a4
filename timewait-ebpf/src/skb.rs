//! Segments a minisocket handled: `kfree_skb(struct sk_buff *, void *location,
//! enum skb_drop_reason, struct sock *rx_sk)` (6.x; `rx_sk` since 6.11).
//!
//! Every segment a minisocket processes ends in `tcp_v4_rcv`'s / `tcp_v6_rcv`'s
//! `discard_it` (net/ipv4/tcp_ipv4.c), except a SYN it hands to a listener. So
//! after the segment we re-read the substate (the peer's FIN turns FIN_WAIT2
//! into TIME_WAIT, and that re-arm may emit no timer event at all when the
//! timer stays in its wheel bucket), and a cancel followed by the RST that
//! caused it is a reset.

use aya_ebpf::{macros::btf_tracepoint, programs::BtfTracePointContext};
use timewait_common::{HINT_RESET, TW_CANCELLED, TW_LIVE, counter};

use crate::maps::{COUNTS, TW_SOCKS, add, bump, config, read};

const TCP_FLAG_RST: u8 = 0x04;
/// Offset of the flags byte in `struct tcphdr`.
const TCPHDR_FLAGS: u64 = 13;

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
    } else if entry.state == TW_CANCELLED {
        let head: u64 = read(skb, cfg.offsets.skb_head)?;
        let th: u16 = read(skb, cfg.offsets.skb_transport_header)?;
        let flags: u8 = read(head + th as u64, TCPHDR_FLAGS as u32)?;
        if flags & TCP_FLAG_RST != 0 {
            entry.hint = HINT_RESET;
        }
    }
    Ok(())
}
