//! Creation, re-arm, kill and expiry of minisockets.
//!
//! Prototypes (5.10 -> 6.18, vmlinux BTF):
//! - `void __inet_twsk_schedule(struct inet_timewait_sock *tw, int timeo, bool rearm)`:
//!   called by `inet_twsk_schedule()` (creation, all fields filled by
//!   `inet_twsk_alloc`) and `inet_twsk_reschedule()` (a segment restarted the
//!   timer; `tcp_timewait_state_process` sets `tw_substate = TCP_TIME_WAIT`
//!   before it on FIN_WAIT2 -> TIME_WAIT).
//! - `void inet_twsk_deschedule_put(struct inet_timewait_sock *tw)`: every kill
//!   (SYN reuse and RST in `tcp_v4_rcv`/`tcp_v6_rcv`, RST inside
//!   `tcp_timewait_state_process`, `tcp_tw_reuse` in `__inet_hash_connect`,
//!   netns teardown in `inet_twsk_purge`).
//! - `static void tw_timer_handler(struct timer_list *t)`: expiry (address
//!   taken by `timer_setup`, so never inlined).

use aya_ebpf::{
    helpers::bpf_get_current_pid_tgid,
    macros::{fentry, kprobe},
    programs::{FEntryContext, ProbeContext},
};
use timewait_common::{LastKill, TCP_TW_RST, TCP_TW_SYN, VERDICT_PENDING, counter};

use super::Functions;
use crate::{
    connect::connecting_to,
    maps::{LAST_KILL, SEGMENT, TW_SOCKS, config, read},
    sock::{TCP_RST, netns_of, watched},
    tw::{bump_created, close, close_timer, follow, resubstate},
};

#[fentry(function = "__inet_twsk_schedule")]
pub fn fentry_twsk_schedule(ctx: FEntryContext) -> u32 {
    let _ = on_schedule(ctx.arg(0), ctx.arg::<u64>(2) as u8 != 0);
    0
}

#[kprobe]
pub fn kprobe_twsk_schedule(ctx: ProbeContext) -> u32 {
    if let (Some(tw), Some(rearm)) = (ctx.arg::<u64>(0), ctx.arg::<u64>(2)) {
        let _ = on_schedule(tw, rearm as u8 != 0);
    }
    0
}

#[inline(always)]
fn on_schedule(tw: u64, rearm: bool) -> Result<(), i64> {
    let cfg = config();
    let netns = netns_of(&cfg, tw)?;
    if !watched(&cfg, netns) {
        return Ok(());
    }
    let timer = tw + cfg.offsets.tw_timer as u64;
    if !rearm {
        // A followed entry under a new minisocket's timer is one whose end we
        // missed (the slab reuses minisocket memory for minisockets only).
        close_timer::<Functions>(timer, counter::CLOSED_OTHER);
        if let Some(key) = follow::<Functions>(&cfg, tw, timer, netns, 0) {
            bump_created(&key);
        }
        return Ok(());
    }
    let Some(e) = TW_SOCKS.get_ptr_mut(timer) else {
        // Not followed (its creation was missed): follow it from here, without
        // a lifetime, as the start-up snapshot does.
        let _ = follow::<Functions>(&cfg, tw, timer, netns, 1);
        return Ok(());
    };
    // SAFETY: e points to this minisocket's entry; a re-arm runs under the
    // minisocket's bucket lock, and a concurrent kill can only remove it.
    let entry = unsafe { &mut *e };
    resubstate(&cfg, entry, tw)?;
    Ok(())
}

#[fentry(function = "inet_twsk_deschedule_put")]
pub fn fentry_twsk_deschedule_put(ctx: FEntryContext) -> u32 {
    on_kill(ctx.arg(0));
    0
}

#[kprobe]
pub fn kprobe_twsk_deschedule_put(ctx: ProbeContext) -> u32 {
    if let Some(tw) = ctx.arg::<u64>(0) {
        on_kill(tw);
    }
    0
}

#[inline(always)]
fn on_kill(tw: u64) {
    let cfg = config();
    let timer = tw + cfg.offsets.tw_timer as u64;
    // SAFETY: read-only copy; `close` claims the entry.
    let Some(entry) = (unsafe { TW_SOCKS.get(timer) }).copied() else {
        return;
    };
    let reason = kill_reason(tw, &entry);
    if let Some(lifetime_ns) = close::<Functions>(timer, &entry, reason)
        && reason == counter::CLOSED_OTHER
    {
        remember_kill(tw, &entry, lifetime_ns);
    }
}

/// Keeps a kill counted as `other` on this CPU for the exit of
/// `inet_hash_connect` (`fentry::sockets`), which moves it to
/// `reused_by_connect` when the connect() of this task took the minisocket's
/// 4-tuple: a `tcp_tw_reuse` takeover, with no hook on the entry of the
/// connect (the tracepoint path has `connecting_to` for that).
#[inline(always)]
fn remember_kill(tw: u64, entry: &timewait_common::TwEntry, lifetime_ns: u64) {
    let cfg = config();
    let (Ok(lport), Ok(rport)) = (read::<u16>(tw, cfg.offsets.skc_num), read::<u16>(tw, cfg.offsets.skc_dport)) else {
        return;
    };
    if let Some(slot) = LAST_KILL.get_ptr_mut(0) {
        // SAFETY: this CPU's slot; tracing programs do not migrate.
        unsafe {
            *slot = LastKill {
                pid_tgid: bpf_get_current_pid_tgid(),
                lifetime_ns,
                remote: entry.key.remote,
                family: entry.key.family,
                lport,
                rport,
                _pad: 0,
            };
        }
    }
}

/// Why `tw` is being killed, from what ran before on this CPU: the segment it
/// is processing (or just processed), else the `connect()` in progress.
#[inline(always)]
fn kill_reason(tw: u64, entry: &timewait_common::TwEntry) -> u32 {
    if let Some(slot) = SEGMENT.get_ptr_mut(0) {
        // SAFETY: this CPU's slot; tracing programs do not migrate.
        let slot = unsafe { &mut *slot };
        if slot.tw == tw {
            let (verdict, flags) = (slot.verdict, slot.flags);
            // Killed inside tcp_timewait_state_process: an RST (TIME_WAIT
            // assassination, or any RST in FIN_WAIT2). The slot stays for
            // the exit, which counts the segment.
            if verdict == VERDICT_PENDING {
                if flags as u8 & TCP_RST != 0 {
                    return counter::CLOSED_RESET;
                }
                return counter::CLOSED_OTHER;
            }
            slot.tw = 0;
            // After it returned, in tcp_v4_rcv/tcp_v6_rcv: a listener took the
            // SYN (TCP_TW_SYN), or the minisocket answered with an RST.
            if verdict == TCP_TW_SYN {
                return counter::CLOSED_REUSED_BY_SYN;
            }
            if verdict == TCP_TW_RST {
                return counter::CLOSED_RESET;
            }
        }
    }
    // `__inet_hash_connect` handing the port to a connect() toward the same
    // remote address and port (tcp_tw_reuse).
    if let Some((family, port, addr, local)) = connecting_to()
        && family == entry.key.family
        && addr == entry.key.remote
    {
        let cfg = config();
        let rport: u16 = read(tw, cfg.offsets.skc_dport).unwrap_or(0);
        let lport: u16 = read(tw, cfg.offsets.skc_num).unwrap_or(0);
        if port == rport && local == lport {
            return counter::CLOSED_REUSED_BY_CONNECT;
        }
    }
    counter::CLOSED_OTHER
}

#[fentry(function = "tw_timer_handler")]
pub fn fentry_tw_timer_handler(ctx: FEntryContext) -> u32 {
    close_timer::<Functions>(ctx.arg(0), counter::CLOSED_EXPIRED);
    0
}

#[kprobe]
pub fn kprobe_tw_timer_handler(ctx: ProbeContext) -> u32 {
    if let Some(timer) = ctx.arg::<u64>(0) {
        close_timer::<Functions>(timer, counter::CLOSED_EXPIRED);
    }
    0
}
