//! Segments that meet a minisocket, and the kernel's verdict on each:
//! `enum tcp_tw_status tcp_timewait_state_process(struct inet_timewait_sock *tw,
//! struct sk_buff *skb, const struct tcphdr *th, ...)`. Its parameter count
//! changed: 3 up to 6.10, `+ u32 *tw_isn` in 6.11, `+ enum skb_drop_reason
//! *drop_reason` in 6.14. An fexit program finds the return value in the
//! context slot after the last argument (`bpf_get_func_ret` exists only from
//! 5.17), so there is one exit program per count and the daemon loads the one
//! that matches the running kernel's BTF.
//!
//! Entry records the segment in this CPU's `SEGMENT` slot; exit adds the
//! verdict: `TCP_TW_SYN` = an acceptable SYN (a listener takes it, and
//! `tcp_v4_rcv` kills the minisocket right after), `TCP_TW_ACK` /
//! `TCP_TW_SUCCESS` on a SYN = not accepted, `TCP_TW_RST` = the minisocket
//! answers with an RST and is killed. `lifecycle::kill_reason` reads the slot.

use aya_ebpf::{
    macros::{fentry, fexit, kprobe, kretprobe},
    programs::{FEntryContext, FExitContext, ProbeContext, RetProbeContext},
};
use timewait_common::{SegmentSlot, TCP_TW_SYN, VERDICT_PENDING};

use crate::{
    maps::{SEGMENT, TW_SOCKS, add_syn, bump, config},
    sock::{TCP_ACK, TCP_SYN, segment, segment_kind},
    tw::remote_key,
};

#[fentry(function = "tcp_timewait_state_process")]
pub fn fentry_tw_state_process(ctx: FEntryContext) -> u32 {
    let _ = on_enter(ctx.arg(0), ctx.arg(1));
    0
}

#[kprobe]
pub fn kprobe_tw_state_process(ctx: ProbeContext) -> u32 {
    if let (Some(tw), Some(skb)) = (ctx.arg::<u64>(0), ctx.arg::<u64>(1)) {
        let _ = on_enter(tw, skb);
    }
    0
}

#[inline(always)]
fn on_enter(tw: u64, skb: u64) -> Result<(), i64> {
    let Some(slot) = SEGMENT.get_ptr_mut(0) else {
        return Ok(());
    };
    // SAFETY: this CPU's slot; tracing programs do not migrate, and the
    // function runs in softirq context, not interrupted by another segment.
    let slot = unsafe { &mut *slot };
    slot.tw = 0;
    let cfg = config();
    // Only minisockets we follow (this also filters on the namespace).
    // SAFETY: read-only copy of the entry.
    let Some(entry) = (unsafe { TW_SOCKS.get(tw + cfg.offsets.tw_timer as u64) }).copied() else {
        return Ok(());
    };
    let (flags, payload) = segment(&cfg, skb, entry.key.family)?;
    *slot = SegmentSlot {
        tw,
        flags: flags as u16,
        kind: segment_kind(flags, payload) as u16,
        verdict: VERDICT_PENDING,
        remote: remote_key(&entry),
    };
    Ok(())
}

/// One exit program per parameter count of the running kernel: the return
/// value sits in the context slot after the last argument.
macro_rules! fexit_variant {
    ($name:ident, $slot:literal) => {
        #[fexit(function = "tcp_timewait_state_process")]
        pub fn $name(ctx: FExitContext) -> u32 {
            let _ = on_exit(ctx.arg(0), ctx.arg::<u64>($slot) as u32);
            0
        }
    };
}
fexit_variant!(fexit_tw_state_process_3, 3);
fexit_variant!(fexit_tw_state_process_4, 4);
fexit_variant!(fexit_tw_state_process_5, 5);

#[kretprobe]
pub fn kretprobe_tw_state_process(ctx: RetProbeContext) -> u32 {
    let verdict: u64 = ctx.ret();
    // The arguments are gone by now: take them from the entry's slot.
    // SAFETY: this CPU's slot, as in on_enter.
    if let Some(slot) = SEGMENT.get(0).copied()
        && slot.verdict == VERDICT_PENDING
        && slot.tw != 0
    {
        let _ = on_exit(slot.tw, verdict as u32);
    }
    0
}

#[inline(always)]
fn on_exit(tw: u64, verdict: u32) -> Result<(), i64> {
    let Some(slot) = SEGMENT.get_ptr_mut(0) else {
        return Ok(());
    };
    // SAFETY: this CPU's slot, as in on_enter.
    let slot = unsafe { &mut *slot };
    if slot.tw != tw || slot.tw == 0 || slot.verdict != VERDICT_PENDING {
        return Ok(());
    }
    slot.verdict = verdict;
    let flags = slot.flags as u8;
    let is_syn = flags & TCP_SYN != 0 && flags & TCP_ACK == 0;
    if is_syn {
        add_syn(&slot.remote, verdict != TCP_TW_SYN);
    }
    if verdict == TCP_TW_SYN {
        // Handed on to a listener: not dropped by the minisocket.
        return Ok(());
    }
    bump(slot.kind as u32);
    Ok(())
}
