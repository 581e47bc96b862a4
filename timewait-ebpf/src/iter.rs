//! Start-up snapshot and reconciliation: BPF socket iterators over the
//! daemon's network namespace (`iter/tcp`, ctx `struct bpf_iter__tcp { meta;
//! sk_common; uid }`), which walk TIME_WAIT minisockets too. The daemon runs
//! `iter_listeners` before the timer programs are attached (so every
//! minisocket created from then on gets its direction right) and the
//! lifecycle's `iter_timewait` after (so nothing is missed); `follow`
//! inserts with BPF_NOEXIST, so nothing is counted twice.
//!
//! The same walks reconcile later: each marks the entries it finds with the
//! walk's number (`EPOCH[EPOCH_WALK]`) and follows what it finds unfollowed
//! (a lost creation). An entry no walk found, twice in a row, that existed
//! before both began, is one whose end was lost: the daemon removes it.
//!
//! The minisocket walks come as one pair per lifecycle, each following what
//! it finds as its lifecycle's programs do (`tw::Lifecycle`, decided at
//! compile time): `iter_timewait` and `iter_reconcile` as `Functions` (the
//! fentry or kprobe lifecycle: no index), `iter_timewait_tp` and
//! `iter_reconcile_tp` as `Tracepoints` (every minisocket in `TW_INDEX`
//! too). The daemon loads and runs the pair of the lifecycle that attached
//! (`timewait-daemon/src/kernel/paths.rs`, `Walks`); `iter_listeners`
//! serves both. Only the `_tp` pair references `TW_INDEX` (iterators are
//! BPF_PROG_TYPE_TRACING programs, which the kernel's check against maps
//! allocated at run time does not cover anyway: kernel/bpf/verifier.c
//! `is_tracing_prog_type`).

use core::ffi::c_void;

use timewait_common::{TCP_CLOSE, TCP_LISTEN, TCP_SYN_RECV, TCP_TIME_WAIT, counter};

use crate::{
    listen::{connection_added, connection_closed, listener_added},
    fentry::Functions,
    maps::{CONNS, TW_SOCKS, bump, config, read, walk},
    sock::{is_listening, listen_key, netns_of, unseen_inbound, watched},
    tracepoint::Tracepoints,
    tw::{Lifecycle, close_timer, follow, resubstate},
};

/// Offset of `sk_common` in `struct bpf_iter__tcp` (a UAPI-stable layout:
/// `meta` is a pointer before it).
const ITER_SK_COMMON: usize = 1;

#[inline(always)]
fn sk_of(ctx: *mut c_void) -> u64 {
    // SAFETY: ctx is the iterator context; the verifier checks this load
    // against `struct bpf_iter__tcp`.
    unsafe { *(ctx as *const u64).add(ITER_SK_COMMON) }
}

#[unsafe(no_mangle)]
#[unsafe(link_section = "iter/tcp")]
/// Listeners, and connections we opened (the local ports they hold).
pub extern "C" fn iter_listeners(ctx: *mut c_void) -> i32 {
    let _ = try_listeners(sk_of(ctx));
    0
}

#[inline(always)]
fn try_listeners(sk: u64) -> Result<(), i64> {
    if sk == 0 {
        return Ok(());
    }
    let cfg = config();
    let state: u8 = read(sk, cfg.offsets.skc_state)?;
    // Minisockets and request sockets are not full sockets; CLOSE holds no port.
    if state == TCP_TIME_WAIT || state == TCP_CLOSE || state == TCP_SYN_RECV || state > TCP_LISTEN + 1 {
        return Ok(());
    }
    let netns = netns_of(&cfg, sk)?;
    if !watched(&cfg, netns) {
        return Ok(());
    }
    let port: u16 = read(sk, cfg.offsets.skc_num)?;
    if state == TCP_LISTEN {
        listener_added(sk, listen_key(netns, port));
        if walk() == 0 {
            bump(counter::SNAPSHOT_LISTENERS);
        }
        return Ok(());
    }
    if let Some(e) = CONNS.get_ptr_mut(sk) {
        // SAFETY: the entry's `seen` is written only by walks, one at a time.
        unsafe { (*e).seen = walk() };
        return Ok(());
    }
    // Listeners come first in the walk (listening hash, then established), so
    // a connection whose local port has no listener is one we opened, unless
    // the port ranges say it was accepted (a server that stopped).
    let rport = u16::from_be(read::<u16>(sk, cfg.offsets.skc_dport)?);
    if !is_listening(netns, port) && !unseen_inbound(&cfg, port, rport) && connection_added(&cfg, sk, netns)? {
        // It may have closed between the state read and the insert.
        if read::<u8>(sk, cfg.offsets.skc_state)? == TCP_CLOSE {
            connection_closed(sk);
        } else if walk() != 0 {
            bump(counter::RECONCILE_FOUND);
        }
    }
    Ok(())
}

/// Both in one walk, for reconciliation (the walk visits the listening
/// hash before the established one, so listeners still come first): the
/// fentry or kprobe lifecycle's.
#[unsafe(no_mangle)]
#[unsafe(link_section = "iter/tcp")]
pub extern "C" fn iter_reconcile(ctx: *mut c_void) -> i32 {
    reconcile::<Functions>(sk_of(ctx));
    0
}

/// `iter_reconcile` of the tracepoint lifecycle.
#[unsafe(no_mangle)]
#[unsafe(link_section = "iter/tcp")]
pub extern "C" fn iter_reconcile_tp(ctx: *mut c_void) -> i32 {
    reconcile::<Tracepoints>(sk_of(ctx));
    0
}

#[inline(always)]
fn reconcile<P: Lifecycle>(sk: u64) {
    if sk == 0 {
        return;
    }
    let cfg = config();
    if read::<u8>(sk, cfg.offsets.skc_state).is_ok_and(|s| s == TCP_TIME_WAIT) {
        let _ = try_timewait::<P>(sk);
    } else {
        let _ = try_listeners(sk);
    }
}

/// Existing minisockets, for the fentry or kprobe lifecycle.
#[unsafe(no_mangle)]
#[unsafe(link_section = "iter/tcp")]
pub extern "C" fn iter_timewait(ctx: *mut c_void) -> i32 {
    let _ = try_timewait::<Functions>(sk_of(ctx));
    0
}

/// Existing minisockets, for the tracepoint lifecycle.
#[unsafe(no_mangle)]
#[unsafe(link_section = "iter/tcp")]
pub extern "C" fn iter_timewait_tp(ctx: *mut c_void) -> i32 {
    let _ = try_timewait::<Tracepoints>(sk_of(ctx));
    0
}

#[inline(always)]
fn try_timewait<P: Lifecycle>(tw: u64) -> Result<(), i64> {
    if tw == 0 {
        return Ok(());
    }
    let cfg = config();
    let state: u8 = read(tw, cfg.offsets.skc_state)?;
    if state != TCP_TIME_WAIT {
        return Ok(());
    }
    let netns = netns_of(&cfg, tw)?;
    if !watched(&cfg, netns) {
        return Ok(());
    }
    let timer = tw + cfg.offsets.tw_timer as u64;
    // The iterator holds a reference, but the minisocket may already be on its
    // way out: only a pending timer means it is still in TIME_WAIT.
    if read::<u64>(timer, cfg.offsets.timer_pprev)? == 0 {
        return Ok(());
    }
    if let Some(e) = TW_SOCKS.get_ptr_mut(timer) {
        // SAFETY: the entry's `seen` is written only by walks, one at a time;
        // its key, as by the programs (a concurrent segment may re-read the
        // substate too: both read the same minisocket).
        let entry = unsafe { &mut *e };
        entry.seen = walk();
        // A FIN_WAIT2 -> TIME_WAIT change no event showed (tracepoint path
        // without `rx_sk`) is caught here.
        let _ = resubstate(&cfg, entry, tw);
        return Ok(());
    }
    if follow::<P>(&cfg, tw, timer, netns, 1).is_none() {
        return Ok(());
    }
    // Walk 0 is the start-up snapshot; later ones reconcile.
    bump(if walk() == 0 { counter::SNAPSHOT } else { counter::RECONCILE_FOUND });
    // Its timer may have been detached (expiry or kill) between the check above
    // and the insert, with the cancel seeing no entry: look again and close it
    // ourselves if so.
    if read::<u64>(timer, cfg.offsets.timer_pprev)? == 0 {
        close_timer::<P>(timer, counter::CLOSED_OTHER);
    }
    Ok(())
}
