//! The life of a followed minisocket, shared by both paths into the kernel:
//! start following it, re-key it (its substate changed), close it for a
//! reason. `TW_SOCKS` is keyed by the address of `tw->tw_timer` on both
//! paths, so the start-up snapshot (`iter.rs`) and the daemon's sweeper need
//! not know which path is attached.

use aya_ebpf::helpers::bpf_ktime_get_ns;
use timewait_common::{AggKey, Config, DIRECTION_INBOUND, RemoteKey, TW_LIVE, TwEntry, counter};

use crate::{
    maps::{BPF_NOEXIST, COUNTS, PENDING, TW_SOCKS, add, bump, is_eexist, observe_lifetime},
    sock::tw_key,
};

/// Closes a followed minisocket for `reason` if this call is the one that
/// removes it from `TW_SOCKS` (removal is the claim: the daemon's sweeper and
/// the programs can race for the same entry, only one wins).
#[inline(always)]
pub fn close(timer: u64, entry: &TwEntry, reason: u32) {
    if TW_SOCKS.remove(timer).is_err() {
        return;
    }
    if entry.counted == 1 {
        add(&COUNTS, &entry.key, -1);
    }
    bump(reason);
    if entry.from_snapshot == 0 {
        // SAFETY: helper without preconditions.
        let now = unsafe { bpf_ktime_get_ns() };
        observe_lifetime(reason, now.saturating_sub(entry.created_ns));
    }
    let _ = PENDING.remove(timer);
}

/// Closes the minisocket followed under `timer`, if any.
#[inline(always)]
pub fn close_timer(timer: u64, reason: u32) {
    // SAFETY: read-only copy; `close` claims the entry.
    if let Some(entry) = unsafe { TW_SOCKS.get(timer) } {
        let entry = *entry;
        close(timer, &entry, reason);
    }
}

/// Starts following minisocket `tw` (timer `timer`). Returns its key, or
/// None when it was already followed or could not be.
#[inline(always)]
pub fn follow(cfg: &Config, tw: u64, timer: u64, netns: u32, from_snapshot: u32) -> Option<AggKey> {
    let key = tw_key(cfg, tw, netns, from_snapshot == 1).ok()?;
    // Count first, then insert already marked counted (one hash lookup
    // fewer than insert-then-update); undo the count if it was followed.
    let counted = add(&COUNTS, &key, 1);
    let entry = TwEntry {
        key,
        // SAFETY: helper without preconditions.
        created_ns: unsafe { bpf_ktime_get_ns() },
        state: TW_LIVE,
        counted: counted as u32,
        from_snapshot,
        ..TwEntry::default()
    };
    if let Err(e) = TW_SOCKS.insert(timer, entry, BPF_NOEXIST) {
        if counted {
            add(&COUNTS, &key, -1);
        }
        if !is_eexist(e.into()) {
            bump(counter::LOST);
        }
        return None;
    }
    Some(key)
}

/// Counts a minisocket created under watch.
#[inline(always)]
pub fn bump_created(key: &AggKey) {
    bump(if key.direction == DIRECTION_INBOUND { counter::CREATED_INBOUND } else { counter::CREATED_OUTBOUND });
}

/// Moves a followed minisocket to `key` (its substate changed: FIN_WAIT2 ->
/// TIME_WAIT), keeping the gauges exact: it is counted under one key at most.
/// Its direction and port stay what they were when it was first followed
/// (a listener that comes or goes later does not change its history).
#[inline(always)]
pub fn rekey(entry: &mut TwEntry, mut key: AggKey) {
    key.direction = entry.key.direction;
    key.port = entry.key.port;
    if entry.counted == 1 && entry.key == key {
        return;
    }
    if entry.counted == 1 {
        add(&COUNTS, &entry.key, -1);
        entry.counted = 0;
    }
    if entry.key.substate != key.substate {
        bump(counter::SUBSTATE_CHANGES);
    }
    entry.key = key;
    if add(&COUNTS, &key, 1) {
        entry.counted = 1;
    }
}

/// The per-remote key of `entry` (SYN counters).
#[inline(always)]
pub fn remote_key(entry: &TwEntry) -> RemoteKey {
    RemoteKey { remote: entry.key.remote, netns: entry.key.netns, family: entry.key.family, _pad: [0; 2] }
}
