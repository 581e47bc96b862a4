//! The life of a followed minisocket, shared by both paths into the kernel:
//! start following it, re-key it (its substate changed), close it for a
//! reason. `TW_SOCKS` is keyed by the address of `tw->tw_timer` on both
//! paths, so the start-up snapshot (`iter.rs`) and the reconciliation need
//! not know which path is attached.
//!
//! What a path keeps beyond that is its own, and each program names its
//! path at compile time (`follow::<P>`, `close::<P>`, `P: Lifecycle`): the
//! tracepoint lifecycle also indexes every minisocket by its 4-tuple
//! (`TW_INDEX`, `tracepoint::maps`), the kernel-function one (fentry or
//! kprobe) keeps nothing more, so its programs do not reference that map.
//!
//! Every change of what an entry counts goes with a +1/-1 in the gauges'
//! delta tables (`maps::count`), in the same program run: the entries and
//! the gauges agree. When a delta cannot be recorded (a full table) the
//! entry change is undone too, so they still agree, and the loss (counted)
//! makes the daemon reconcile with the kernel's socket tables at once.

use aya_ebpf::helpers::bpf_ktime_get_ns;
use timewait_common::{
    AggKey, Config, DIRECTION_INBOUND, FOLLOWED_AT_CREATION, FOUND_BY_WALK, IndexKey, IndexVal, LastCancel, RemoteKey, SockHead, TwEntry, counter,
};

use crate::{
    maps::{
        BPF_NOEXIST, LAST_FOLLOW, SCRATCH, SCRATCH_NEW, SCRATCH_OLD, TW_SOCKS, bump, count, is_eexist, move_count, observe_lifetime, walk,
    },
    sock::{head, tw_key_in},
};

/// The lifecycle path a program serves: what it keeps about a followed
/// minisocket besides its `TW_SOCKS` entry. A type per path, so that what
/// one path alone uses is referenced only by that path's programs, decided
/// when they are compiled. Above all `TW_INDEX`, a hash map allocated as
/// used (`BPF_F_NO_PREALLOC`): a kprobe or classic tracepoint program that
/// references one makes kernels 5.6-6.0 WARN at load ("trace type BPF
/// program uses run-time allocation", kernel/bpf/verifier.c
/// `check_map_prog_compatibility`: a tainted kernel, a panic with
/// `panic_on_warn`) and PREEMPT_RT kernels refuse the program.
/// - `fentry::Functions`: programs on the TIME_WAIT functions (fentry or
///   kprobe); nothing more, no index.
/// - `tracepoint::Tracepoints`: the tracepoint lifecycle (tp_btf); every
///   minisocket in `TW_INDEX` too.
/// The socket iterators that follow minisockets come in one pair per
/// lifecycle (`iter.rs`), each with its lifecycle's type.
pub trait Lifecycle {
    /// Whether a minisocket followed now goes into `TW_INDEX`.
    fn indexed() -> bool;
    /// Puts a minisocket into `TW_INDEX` under `key`; false when it could not.
    fn index(key: &IndexKey, val: &IndexVal) -> bool;
    /// Removes the `TW_INDEX` entry of a closed minisocket (`entry`, timer
    /// `timer`) if it has one and it is still its.
    fn unindex(timer: u64, entry: &TwEntry);
}

/// Closes a followed minisocket for `reason` if this call is the one that
/// removes it from `TW_SOCKS` (removal is the claim: the reconciliation and
/// the programs can race for the same entry, only one wins). Returns the
/// lifetime it observed (u64::MAX: none, a minisocket of the start-up
/// snapshot) when it closed it.
#[inline(always)]
pub fn close<P: Lifecycle>(timer: u64, entry: &TwEntry, reason: u32) -> Option<u64> {
    if TW_SOCKS.remove(timer).is_err() {
        return None;
    }
    if entry.counted == 1 && !count(&entry.key, -1) {
        // The gauge cannot go down now: keep the entry (still counted). The
        // reconciliation finds it gone from the kernel and removes it, gauge
        // and all; its end is then counted as `other`.
        let _ = TW_SOCKS.insert(timer, entry, BPF_NOEXIST);
        return None;
    }
    bump(reason);
    let mut lifetime = u64::MAX;
    if entry.from_snapshot != FOUND_BY_WALK {
        // SAFETY: helper without preconditions.
        let now = unsafe { bpf_ktime_get_ns() };
        lifetime = now.saturating_sub(entry.created_ns);
        observe_lifetime(reason, lifetime);
    }
    P::unindex(timer, entry);
    Some(lifetime)
}

/// Closes the minisocket followed under `timer`, if any.
#[inline(always)]
pub fn close_timer<P: Lifecycle>(timer: u64, reason: u32) {
    // SAFETY: read-only copy; `close` claims the entry.
    if let Some(entry) = unsafe { TW_SOCKS.get(timer) } {
        let entry = *entry;
        let _ = close::<P>(timer, &entry, reason);
    }
}

/// Starts following minisocket `tw` (timer `timer`). Returns its key, or
/// None when it was already followed or could not be. One created under
/// watch (`from_snapshot` 0) is remembered on this CPU until its full socket
/// closes, which tells its direction from history (fentry path).
#[inline(always)]
pub fn follow<P: Lifecycle>(cfg: &Config, tw: u64, timer: u64, netns: u32, from_snapshot: u32) -> Option<AggKey> {
    let h = head(cfg, tw).ok()?;
    // One found, not seen created, may have lost its listener meanwhile.
    let key = tw_key_in(cfg, tw, &h, netns, from_snapshot != FOLLOWED_AT_CREATION as u32).ok()?;
    if !follow_key::<P>(&h, timer, &key, from_snapshot, 0) {
        return None;
    }
    if from_snapshot == 0
        && let Some(slot) = LAST_FOLLOW.get_ptr_mut(0)
    {
        // SAFETY: this CPU's slot; tracing programs do not migrate.
        unsafe { *slot = LastCancel { timer, remote: key.remote, lport: h.num, rport: h.dport, _pad: 0 } };
    }
    Some(key)
}

/// Follows the minisocket whose head is `h` (timer `timer`) under `key`: its
/// entry, its count and, where `P` indexes, its `TW_INDEX` entry (`isn`:
/// that of a connection that takes it over, 0 when unknown).
/// False when it was already followed or could not be.
#[inline(always)]
pub fn follow_key<P: Lifecycle>(h: &SockHead, timer: u64, key: &AggKey, from_snapshot: u32, isn: u32) -> bool {
    // Built in this CPU's scratch slot, not on the stack (5.10's verifier
    // counts 512 bytes for a program and the functions it calls together).
    let Some(slot) = SCRATCH.get_ptr_mut(SCRATCH_NEW) else {
        return false;
    };
    // SAFETY: this CPU's slot; tracing programs do not migrate, and nothing
    // else on this CPU runs between these writes and the insert.
    let entry = unsafe { &mut *slot };
    // SAFETY: helper without preconditions.
    let created_ns = unsafe { bpf_ktime_get_ns() };
    let indexed = P::indexed();
    entry.key = *key;
    entry.created_ns = created_ns;
    entry.isn = isn;
    entry._pad = 0;
    entry.seen = walk();
    entry.counted = 1;
    entry.from_snapshot = from_snapshot as u16;
    entry.index_hash = if indexed { h.hash } else { 0 };
    entry.index_rport = if indexed { h.dport } else { 0 };
    entry.indexed = u16::from(indexed);
    if let Err(e) = TW_SOCKS.insert(timer, &*entry, BPF_NOEXIST) {
        if !is_eexist(e.into()) {
            bump(counter::LOST);
        }
        return false;
    }
    if !count(key, 1) {
        // Not counted, so not followed either: the next walk follows it.
        let _ = TW_SOCKS.remove(timer);
        return false;
    }
    if indexed {
        let val = IndexVal { timer, created_ns, lport: h.num, _pad: [0; 3] };
        if !P::index(&entry.index_key(), &val) {
            // Its takeover, if any, will not be told: the walks close it.
            bump(counter::LOST);
        }
    }
    true
}

/// A copy of `TW_SOCKS`'s entry for `timer` in this CPU's scratch slot (a
/// stable copy for `close`, which removes the entry first), if it has one.
#[inline(always)]
pub fn entry_copy(timer: u64) -> Option<&'static TwEntry> {
    let slot = SCRATCH.get_ptr_mut(SCRATCH_OLD)?;
    // SAFETY: read-only view of the map value, copied at once.
    let e = unsafe { TW_SOCKS.get(timer) }?;
    // SAFETY: this CPU's slot; tracing programs do not migrate.
    unsafe {
        *slot = *e;
        Some(&*slot)
    }
}

/// Counts a minisocket created under watch.
#[inline(always)]
pub fn bump_created(key: &AggKey) {
    bump(if key.direction == DIRECTION_INBOUND { counter::CREATED_INBOUND } else { counter::CREATED_OUTBOUND });
}

/// Re-reads a followed minisocket's substate (FIN_WAIT2 -> TIME_WAIT when
/// the peer's FIN comes in). Its direction, remote and port stay what they
/// were when it was first followed (a listener that comes or goes later does
/// not change its history).
#[inline(always)]
pub fn resubstate(cfg: &Config, entry: &mut TwEntry, tw: u64) -> Result<(), i64> {
    let substate: u8 = crate::maps::read(tw, cfg.offsets.tw_substate)?;
    if entry.key.substate != substate {
        let mut key = entry.key;
        key.substate = substate;
        bump(counter::SUBSTATE_CHANGES);
        move_to(entry, key);
    }
    Ok(())
}

/// Moves a followed minisocket's count to `key` (when it is counted; when
/// the move cannot be recorded it stays where it was).
#[inline(always)]
pub fn move_to(entry: &mut TwEntry, key: AggKey) {
    if entry.counted == 1 && !move_count(&entry.key, &key) {
        return;
    }
    entry.key = key;
}

/// The per-remote key of `entry` (SYN counters).
#[inline(always)]
pub fn remote_key(entry: &TwEntry) -> RemoteKey {
    entry.key.remote_key()
}
