//! The life of a followed minisocket, shared by both paths into the kernel:
//! start following it, re-key it (its substate changed), close it for a
//! reason. `TW_SOCKS` is keyed by the address of `tw->tw_timer` on both
//! paths, so the start-up snapshot (`iter.rs`) and the daemon's sweeper need
//! not know which path is attached.
//!
//! Every change of what an entry counts goes with a +1/-1 in the gauges'
//! delta tables (`maps::count`), in the same program run: the entries and
//! the gauges agree. When a delta cannot be recorded (a full table) the
//! entry change is undone too, so they still agree, and the loss (counted)
//! makes the daemon reconcile with the kernel's socket tables at once.

use aya_ebpf::helpers::bpf_ktime_get_ns;
use timewait_common::{AggKey, Config, DIRECTION_INBOUND, LastCancel, RemoteKey, TW_LIVE, TwEntry, counter};

use crate::{
    maps::{BPF_NOEXIST, LAST_FOLLOW, PENDING, TW_SOCKS, bump, count, is_eexist, move_count, observe_lifetime, walk},
    sock::tw_key,
};

/// Closes a followed minisocket for `reason` if this call is the one that
/// removes it from `TW_SOCKS` (removal is the claim: the daemon's sweeper and
/// the programs can race for the same entry, only one wins). Returns the
/// lifetime it observed (u64::MAX: none, a minisocket of the start-up
/// snapshot) when it closed it.
#[inline(always)]
pub fn close(timer: u64, entry: &TwEntry, reason: u32) -> Option<u64> {
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
    if entry.from_snapshot == 0 {
        // SAFETY: helper without preconditions.
        let now = unsafe { bpf_ktime_get_ns() };
        lifetime = now.saturating_sub(entry.created_ns);
        observe_lifetime(reason, lifetime);
    }
    let _ = PENDING.remove(timer);
    Some(lifetime)
}

/// Closes the minisocket followed under `timer`, if any.
#[inline(always)]
pub fn close_timer(timer: u64, reason: u32) {
    // SAFETY: read-only copy; `close` claims the entry.
    if let Some(entry) = unsafe { TW_SOCKS.get(timer) } {
        let entry = *entry;
        let _ = close(timer, &entry, reason);
    }
}

/// Starts following minisocket `tw` (timer `timer`). Returns its key, or
/// None when it was already followed or could not be. One created under
/// watch (`from_snapshot` 0) is remembered on this CPU until its full socket
/// closes, which tells its direction from history.
#[inline(always)]
pub fn follow(cfg: &Config, tw: u64, timer: u64, netns: u32, from_snapshot: u32) -> Option<AggKey> {
    let key = tw_key(cfg, tw, netns, from_snapshot == 1).ok()?;
    let entry = TwEntry {
        key,
        // SAFETY: helper without preconditions.
        created_ns: unsafe { bpf_ktime_get_ns() },
        state: TW_LIVE,
        seen: walk(),
        counted: 1,
        from_snapshot: from_snapshot as u16,
        ..TwEntry::default()
    };
    if let Err(e) = TW_SOCKS.insert(timer, entry, BPF_NOEXIST) {
        if !is_eexist(e.into()) {
            bump(counter::LOST);
        }
        return None;
    }
    if !count(&key, 1) {
        // Not counted, so not followed either: the next walk follows it.
        let _ = TW_SOCKS.remove(timer);
        return None;
    }
    if from_snapshot == 0
        && let Some(slot) = LAST_FOLLOW.get_ptr_mut(0)
    {
        let lport: u16 = crate::maps::read(tw, cfg.offsets.skc_num).unwrap_or(0);
        let rport: u16 = crate::maps::read(tw, cfg.offsets.skc_dport).unwrap_or(0);
        // SAFETY: this CPU's slot; tracing programs do not migrate.
        unsafe { *slot = LastCancel { timer, remote: key.remote, lport, rport, _pad: 0 } };
    }
    Some(key)
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
    RemoteKey { remote: entry.key.remote, netns: entry.key.netns, family: entry.key.family, _pad: [0; 2] }
}
