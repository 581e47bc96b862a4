//! What only the tracepoint lifecycle keeps: its maps, and `Tracepoints`,
//! the `tw::Lifecycle` of its programs (every minisocket they follow is also
//! indexed by its 4-tuple). Only tracepoint programs (tp_btf) and this
//! lifecycle's socket iterators (`iter_timewait_tp`, `iter_reconcile_tp`)
//! reference these maps:
//! `TW_INDEX` is allocated as used, and a kprobe program that referenced it
//! would make kernels 5.6-6.0 WARN at load (see `tw::Lifecycle`).

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
};
use timewait_common::{IndexKey, IndexVal, TwEntry, Untold};

use crate::{maps::BPF_ANY, tw::Lifecycle};

/// `BPF_F_NO_PREALLOC` (include/uapi/linux/bpf.h).
const BPF_F_NO_PREALLOC: u32 = 1;

/// The followed minisockets by what the next socket with the same 4-tuple
/// shares with them (`IndexKey`), so that a connection accepted from a SYN
/// that took one over, or a `connect()` that took one over (`tcp_tw_reuse`),
/// finds it: no tracepoint shows those kills. Allocated as used
/// (`BPF_F_NO_PREALLOC`: empty, it costs nothing on the fentry path), sized
/// by the daemon as `TW_SOCKS`.
#[map]
pub static TW_INDEX: HashMap<IndexKey, IndexVal> = HashMap::with_max_entries(1 << 18, BPF_F_NO_PREALLOC);

/// Minisockets a segment found (`FOUND_BY_SEGMENT`) and closed before the
/// CPU that created them told the creation, by timer address, with
/// `bpf_ktime_get_ns()` then: that CPU must not follow them
/// (`lifecycle::created`). Rare (a SYN and an RST within microseconds of the
/// minisocket's hashing); least recently used first out.
#[map]
pub static ENDED: LruHashMap<u64, u64> = LruHashMap::with_max_entries(1024, 0);

/// Closes toward TIME_WAIT that found no minisocket
/// (`timewait_common::Untold`), by the 4-tuple's `IndexKey`, for the
/// connection that may have taken it over to tell (`lifecycle::told_late`).
/// Least recently used first out; `UNTOLD_AT[0]` is the time of the last
/// insert, so that connections look here only within a second of one.
#[map]
pub static UNTOLD: LruHashMap<IndexKey, Untold> = LruHashMap::with_max_entries(1024, 0);
#[map]
pub static UNTOLD_AT: Array<u64> = Array::with_max_entries(1, 0);
/// Per-CPU room to build an `UNTOLD` value in, off the stack.
#[map]
pub static UNTOLD_SCRATCH: PerCpuArray<Untold> = PerCpuArray::with_max_entries(1, 0);

/// The tracepoint lifecycle's programs (`tw::Lifecycle`).
pub struct Tracepoints;

impl Lifecycle for Tracepoints {
    #[inline(always)]
    fn indexed() -> bool {
        true
    }

    #[inline(always)]
    fn index(key: &IndexKey, val: &IndexVal) -> bool {
        TW_INDEX.insert(key, val, BPF_ANY).is_ok()
    }

    #[inline(always)]
    fn unindex(timer: u64, entry: &TwEntry) {
        if entry.indexed == 0 {
            return;
        }
        let key = entry.index_key();
        // SAFETY: read-only copy of a plain value.
        if unsafe { TW_INDEX.get(&key) }.is_some_and(|v| v.timer == timer && v.created_ns == entry.created_ns) {
            let _ = TW_INDEX.remove(&key);
        }
    }
}
