//! Following minisockets through their timer (kernel/time/timer.c).
//! `timer_start` is `(timer, expires, flags)` up to 6.7 and `(timer,
//! bucket_expiry)` from 6.8; only argument 0 is read, so one program serves both.
//!
//! Hooks and the kernel prototypes they rely on (`btf_trace_*` in vmlinux BTF):
//! - `timer_init(struct timer_list *)`: fires before `timer_setup()` fills the
//!   timer in. The minisocket slab is `SLAB_TYPESAFE_BY_RCU`, so a freed
//!   minisocket's memory is reused only by another minisocket: an init on a
//!   timer we still follow means the old minisocket is gone (a kill).
//! - `timer_start(struct timer_list *, unsigned long)`: creation (unknown
//!   timer) or re-arm (known timer, just cancelled on this CPU).
//! - `timer_cancel(struct timer_list *)`: fires on kill (SYN reuse, RST,
//!   `tcp_tw_reuse`, netns teardown), just before `timer_expire_entry` on
//!   expiry, and just before a re-arm's `timer_start`. What it meant is
//!   resolved by what follows; until then the minisocket is not counted.
//! - `timer_expire_entry(struct timer_list *, unsigned long)`: expiry.

use aya_ebpf::{helpers::bpf_ktime_get_ns, macros::btf_tracepoint, programs::BtfTracePointContext};
use timewait_common::{
    Config, HINT_CONNECT, HINT_NONE, HINT_SYN, LastCancel, TW_CANCELLED, TW_LIVE, TwEntry, counter,
};

use crate::{
    maps::{LAST_CANCEL, PENDING, TW_SOCKS, add_syn, bump, config, count, read},
    sock::{netns_of, remote_of, watched},
    tw::{bump_created, close, close_timer, follow, resubstate, remote_key},
};

/// Whether `timer` is a minisocket's `tw_timer`.
#[inline(always)]
fn is_tw_timer(cfg: &Config, timer: u64) -> bool {
    read::<u64>(timer, cfg.offsets.timer_function).is_ok_and(|f| f == cfg.tw_timer_handler)
}

/// The reason a kill resolves to, from what the programs saw after the cancel.
#[inline(always)]
fn kill_reason(entry: &TwEntry) -> u32 {
    timewait_common::kill_reason(entry.hint)
}

#[btf_tracepoint(function = "timer_init")]
pub fn tw_timer_init(ctx: BtfTracePointContext) -> u32 {
    let timer: u64 = ctx.arg(0);
    // No cheaper filter than the lookup: a killed minisocket's timer was
    // stopped with timer_shutdown_sync(), which clears its function, so the
    // reused memory no longer says tw_timer_handler here.
    // SAFETY: read-only copy of the entry; see `close` for who may remove it.
    if let Some(entry) = unsafe { TW_SOCKS.get(timer) } {
        let entry = *entry;
        let _ = close(timer, &entry, kill_reason(&entry));
    }
    0
}

#[btf_tracepoint(function = "timer_start")]
pub fn tw_timer_start(ctx: BtfTracePointContext) -> u32 {
    let _ = try_timer_start(ctx.arg(0));
    0
}

#[inline(always)]
fn try_timer_start(timer: u64) -> Result<(), i64> {
    let cfg = config();
    let Ok(function) = read::<u64>(timer, cfg.offsets.timer_function) else {
        return Ok(());
    };
    if function != cfg.tw_timer_handler {
        if function == cfg.reqsk_timer_handler && cfg.reqsk_timer_handler != 0 {
            request_timer_started(&cfg, timer)?;
        }
        return Ok(());
    }
    let tw = timer - cfg.offsets.tw_timer as u64;
    let netns = netns_of(&cfg, tw)?;
    if !watched(&cfg, netns) {
        return Ok(());
    }
    let Some(e) = TW_SOCKS.get_ptr_mut(timer) else {
        if let Some(key) = follow(&cfg, tw, timer, netns, 0) {
            bump_created(&key);
        }
        return Ok(());
    };
    // Re-arm: FIN_WAIT2 -> TIME_WAIT, or a segment that restarted the timer.
    // SAFETY: e points to this timer's entry; its events are serialised by
    // the timer base lock this tracepoint runs under.
    let entry = unsafe { &mut *e };
    if entry.state == TW_CANCELLED {
        entry.state = TW_LIVE;
        entry.cancel_ns = 0;
        let _ = PENDING.remove(timer);
        if entry.counted == 0 && count(&entry.key, 1) {
            entry.counted = 1;
        }
    }
    resubstate(&cfg, entry, tw)?;
    Ok(())
}

/// A listener armed the timer of a new request socket. When the minisocket
/// cancelled last on this CPU held the same 4-tuple, this is the SYN it let
/// through (`tcp_v4_rcv`: TCP_TW_SYN -> `inet_twsk_deschedule_put` -> `goto
/// process` with the listener, all in one softirq): a reuse by SYN.
#[inline(always)]
fn request_timer_started(cfg: &Config, timer: u64) -> Result<(), i64> {
    let Some(slot) = LAST_CANCEL.get_ptr_mut(0) else {
        return Ok(());
    };
    // SAFETY: this CPU's slot; tracing programs do not migrate.
    let slot = unsafe { &mut *slot };
    if slot.timer == 0 {
        return Ok(());
    }
    let req = timer - cfg.offsets.rsk_timer as u64;
    let family: u16 = read(req, cfg.offsets.skc_family)?;
    let remote = remote_of(cfg, req, family)?;
    let lport: u16 = read(req, cfg.offsets.skc_num)?;
    let rport: u16 = read(req, cfg.offsets.skc_dport)?;
    if remote != slot.remote || lport != slot.lport || rport != slot.rport {
        return Ok(());
    }
    let tw_timer = slot.timer;
    slot.timer = 0;
    if let Some(e) = TW_SOCKS.get_ptr_mut(tw_timer) {
        // SAFETY: the entry of a cancelled minisocket; only its resolution writes it.
        let entry = unsafe { &mut *e };
        if entry.state == TW_CANCELLED && entry.hint == HINT_NONE {
            entry.hint = HINT_SYN;
            add_syn(&remote_key(entry), false);
        }
    }
    Ok(())
}

#[btf_tracepoint(function = "timer_cancel")]
pub fn tw_timer_cancel(ctx: BtfTracePointContext) -> u32 {
    let timer: u64 = ctx.arg(0);
    let cfg = config();
    if !is_tw_timer(&cfg, timer) {
        return 0;
    }
    let Some(e) = TW_SOCKS.get_ptr_mut(timer) else {
        return 0;
    };
    // SAFETY: as in try_timer_start.
    let entry = unsafe { &mut *e };
    if entry.state != TW_LIVE {
        return 0;
    }
    // Not counted while cancelled: a re-arm counts it again, a kill or an
    // expiry (which follow within microseconds) leave it uncounted.
    if entry.counted == 1 && count(&entry.key, -1) {
        entry.counted = 0;
    }
    entry.state = TW_CANCELLED;
    entry.hint = HINT_NONE;
    // SAFETY: helper without preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    entry.cancel_ns = now;
    let tw = timer - cfg.offsets.tw_timer as u64;
    let lport: u16 = read(tw, cfg.offsets.skc_num).unwrap_or(0);
    let rport: u16 = read(tw, cfg.offsets.skc_dport).unwrap_or(0);
    if let Some(slot) = LAST_CANCEL.get_ptr_mut(0) {
        // SAFETY: this CPU's slot; tracing programs do not migrate.
        unsafe {
            *slot = LastCancel { timer, remote: entry.key.remote, lport, rport, _pad: 0 };
        }
    }
    // Inside connect() of a socket that already has this minisocket's
    // 4-tuple: `__inet_hash_connect` took its port over (tcp_tw_reuse).
    if let Some((family, port, addr, local)) = crate::connect::connecting_to()
        && family == entry.key.family
        && addr == entry.key.remote
        && port == rport
        && local == lport
    {
        entry.hint = HINT_CONNECT;
    }
    if PENDING.insert(timer, now, 0).is_err() {
        bump(counter::LOST);
    }
    0
}

#[btf_tracepoint(function = "timer_expire_entry")]
pub fn tw_timer_expire(ctx: BtfTracePointContext) -> u32 {
    let timer: u64 = ctx.arg(0);
    let cfg = config();
    if !is_tw_timer(&cfg, timer) {
        return 0;
    }
    close_timer(timer, counter::CLOSED_EXPIRED);
    0
}
