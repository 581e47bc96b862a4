//! The maps more than one path uses, and the small helpers every program
//! shares. What only the tracepoint lifecycle uses is in `tracepoint::maps`.
//! Every map here is preallocated (hash maps without `BPF_F_NO_PREALLOC`,
//! LRU maps, arrays): kprobe and classic tracepoint programs reference them,
//! and one allocated as used would make kernels 5.6-6.0 WARN at their load
//! (`tw::Lifecycle`).

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use aya_ebpf::{
    helpers::bpf_probe_read_kernel,
    macros::map,
    maps::{Array, HashMap, PerCpuArray},
};
use timewait_common::{
    AggKey, Config, ConnEntry, ConnectDst, EPOCH_TABLES, EPOCH_WALK, ErrKey, LIFETIME_REASONS, LIFETIME_SLOTS, LastCancel, LastKill, RemoteKey,
    SegmentSlot, SynCounts, TwEntry, counter,
};

/// Start-up configuration; the daemon sets it with `EbpfLoader::set_global`.
#[unsafe(no_mangle)]
static CONFIG: Config = Config::ZERO;

/// Every minisocket being followed, keyed by the address of its `tw_timer`.
/// Sized by the daemon from `tcp_max_tw_buckets` at load.
#[map]
pub static TW_SOCKS: HashMap<u64, TwEntry> = HashMap::with_max_entries(1 << 18, 0);

/// Per-CPU room for the entries a program builds or copies (`tw::follow_key`,
/// `tw::entry_copy`), off the 512-byte stack.
#[map]
pub static SCRATCH: PerCpuArray<TwEntry> = PerCpuArray::with_max_entries(2, 0);
pub const SCRATCH_NEW: u32 = 0;
pub const SCRATCH_OLD: u32 = 1;

/// `ROLE_*` bits: what `inet_sock_set_state` serves (the daemon sets them as
/// it attaches each signal): one tp_btf program serves the sockets signal,
/// the tracepoint lifecycle or both. No other program reads it.
#[map]
pub static ROLES: Array<u32> = Array::with_max_entries(1, 0);

/// Listening sockets, keyed by `struct sock *`; value: `listen_key()`.
#[map]
pub static LISTENERS: HashMap<u64, u64> = HashMap::with_max_entries(1 << 14, 0);

/// Listening sockets per (netns, port), keyed by `listen_key()`.
#[map]
pub static LISTEN_PORTS: HashMap<u64, i64> = HashMap::with_max_entries(1 << 14, 0);

/// Monotonic counters, indexed by `timewait_common::counter`: one per-CPU
/// entry holding all of them, so the daemon reads them in one syscall.
#[map]
pub static COUNTERS: PerCpuArray<[u64; counter::COUNT as usize]> = PerCpuArray::with_max_entries(1, 0);

/// The gauges' changes per aggregation key (+1 a minisocket or active open
/// counted under it, -1 one gone), and the SYNs that hit a minisocket, per
/// remote. Two tables of each: the programs write the pair `EPOCH[EPOCH_TABLES]`
/// names, the daemon drains the other pair into its own totals every second:
/// it flips the epoch, waits for an RCU grace period (every program that
/// read the old epoch has returned by then: tracing programs run inside an
/// RCU read-side section; `timewait-daemon/src/kernel/rcu.rs`), then reads the old
/// tables and deletes their keys. No program holds a pointer into them at
/// that point, so the delete loses no concurrent atomic add; and a key lives
/// in the kernel only until the next drain, so the tables never fill with
/// the keys of sockets long gone. Sized by the daemon (`--max-series`).
#[map]
pub static COUNTS_0: HashMap<AggKey, i64> = HashMap::with_max_entries(1 << 15, 0);
#[map]
pub static COUNTS_1: HashMap<AggKey, i64> = HashMap::with_max_entries(1 << 15, 0);
#[map]
pub static SYNS_0: HashMap<RemoteKey, SynCounts> = HashMap::with_max_entries(1 << 14, 0);
#[map]
pub static SYNS_1: HashMap<RemoteKey, SynCounts> = HashMap::with_max_entries(1 << 14, 0);

/// `EPOCH_TABLES`: which pair of tables is written; `EPOCH_WALK`: the number of
/// the reconciliation walk in progress. Written only by the daemon.
#[map]
pub static EPOCH: Array<u32> = Array::with_max_entries(2, 0);

/// The minisocket followed last on this CPU at its creation, until the
/// full socket it came from goes to CLOSE (right after, in `tcp_time_wait`
/// -> `tcp_done`, same CPU): then the connection's own history (active open
/// or accepted) gives its direction. See `listen::direction_from_history`.
#[map]
pub static LAST_FOLLOW: PerCpuArray<LastCancel> = PerCpuArray::with_max_entries(1, 0);

/// Lifetime histogram by close reason; layout in `timewait_common::LIFETIME_SLOTS`
/// (one per-CPU entry holding every slot).
#[map]
pub static LIFETIME: PerCpuArray<[u64; (LIFETIME_REASONS * LIFETIME_SLOTS) as usize]> =
    PerCpuArray::with_max_entries(1, 0);

/// The segment a minisocket is processing on this CPU (fentry path, see
/// `fentry::segment`).
#[map]
pub static SEGMENT: PerCpuArray<SegmentSlot> = PerCpuArray::with_max_entries(1, 0);

/// The active open last started on each CPU (sockets on the tracepoint path:
/// CLOSE -> SYN_SENT): its task and socket, for a kprobe/fentry lifecycle to
/// tell a `tcp_tw_reuse` takeover. Shared by the two paths on purpose: the
/// sockets signal's tracepoint program writes it (`listen.rs` ->
/// `connect::connect_started`), the kernel-function lifecycle reads it
/// (`fentry::lifecycle::kill_reason` -> `connect::connecting_to`, fentry or
/// kprobe); that pairing is what `--probe-path kprobe` gets, as the sockets
/// hooks have no kprobe fallback. A per-CPU slot, not a hash map: it is
/// written on every connect() of the system, and preallocated.
#[map]
pub static CONNECTING: PerCpuArray<ConnectDst> = PerCpuArray::with_max_entries(1, 0);

/// The last minisocket killed on this CPU as `other` (fentry path), for the
/// exit of `inet_hash_connect` to tell a `tcp_tw_reuse` takeover.
#[map]
pub static LAST_KILL: PerCpuArray<LastKill> = PerCpuArray::with_max_entries(1, 0);

/// Full sockets of active opens, keyed by `struct sock *`: their key
/// (substate `SUBSTATE_CONNECTION`). Counted by the daemon at read time.
#[map]
pub static CONNS: HashMap<u64, ConnEntry> = HashMap::with_max_entries(1 << 18, 0);

/// Failed connect()/bind() calls of TCP sockets that mean port exhaustion,
/// by process name. Never drained: cumulative counts. Bounded, and any local
/// user can pick names (`prctl(PR_SET_NAME)`), so once it is full what no
/// longer fits is counted under the reserved key of its errno
/// (`ErrKey::fallback`, `comm="other"`), which the daemon inserts before any
/// program runs: the table cannot be blinded.
#[map]
pub static CONNECT_ERRORS: HashMap<ErrKey, i64> = HashMap::with_max_entries(1024, 0);

/// `sys_enter_bind` -> `sys_exit_bind` (`--syscall-tracepoints`): the file
/// descriptor a thread is binding, by `pid_tgid`, so that the exit can tell
/// a TCP socket's EADDRINUSE from a UDP or raw one's. Removed at the exit
/// (which runs even for a thread killed inside bind()). Not an LRU map: one
/// may evict an entry still in use (`kernel/bpf/bpf_lru_list.c` takes
/// unreferenced nodes from other CPUs' lists). Full (4,096 threads inside
/// bind() at once): that bind() is not looked at.
#[map]
pub static BINDING: HashMap<u64, u64> = HashMap::with_max_entries(4096, 0);

pub const BPF_NOEXIST: u64 = 1;
pub const BPF_ANY: u64 = 0;

/// `ROLES[0]`.
#[inline(always)]
pub fn roles() -> u32 {
    ROLES.get(0).copied().unwrap_or(0)
}
const EEXIST: i64 = 17;

/// The configuration, read in place (not copied: it is 200 bytes of a
/// 512-byte stack).
#[inline(always)]
pub fn config() -> &'static Config {
    let p: *const Config = &raw const CONFIG;
    // SAFETY: reads a local. The volatile read makes the pointer opaque, so
    // the compiler cannot fold in the compiled-in zero value of CONFIG; the
    // loads through it happen at run time, from the value the daemon set.
    let p = unsafe { core::ptr::read_volatile(&p) };
    // SAFETY: p is CONFIG's address; it is read-only and lives forever.
    unsafe { &*p }
}

/// Reads a `T` at `base + off` in kernel memory.
#[inline(always)]
pub fn read<T>(base: u64, off: u32) -> Result<T, i64> {
    // SAFETY: bpf_probe_read_kernel copes with any address, faulting ones included.
    unsafe { bpf_probe_read_kernel((base + off as u64) as *const T) }.map_err(i64::from)
}

/// `x`, as a value the compiler knows nothing about. An index checked after
/// this stays checked right where it is used: otherwise LLVM hoists the check
/// above a stack spill, and the verifiers of 5.10 and 6.1 lose the bound
/// across the spill ("R0 unbounded memory access").
#[inline(always)]
pub fn opaque(x: u32) -> u32 {
    // SAFETY: a read of a local.
    unsafe { core::ptr::read_volatile(&x) }
}

#[inline(always)]
pub fn bump(idx: u32) {
    let idx = opaque(idx) as usize;
    if let Some(p) = COUNTERS.get_ptr_mut(0) {
        // SAFETY: p points to this CPU's entry; tracing programs do not
        // migrate while they run.
        if let Some(c) = unsafe { (*p).get_mut(idx) } {
            *c += 1;
        }
    }
}

/// Takes back a `bump` of `idx` made on this CPU in the same event (the
/// per-CPU copy cannot go below what that bump added).
#[inline(always)]
pub fn unbump(idx: u32) {
    let idx = opaque(idx) as usize;
    if let Some(p) = COUNTERS.get_ptr_mut(0) {
        // SAFETY: as in `bump`.
        if let Some(c) = unsafe { (*p).get_mut(idx) } {
            *c = c.wrapping_sub(1);
        }
    }
}

#[inline(always)]
pub fn atomic_add(p: *mut i64, delta: i64) {
    // The BPF target offers no `AtomicI64::fetch_add`; with its result unused
    // this intrinsic lowers to the BPF atomic add every kernel supports.
    // SAFETY: p points to an i64 map value that stays valid while the program
    // runs; other CPUs update it only through atomic adds as well.
    let _ = unsafe { atomic_xadd::<i64, i64, { AtomicOrdering::Relaxed }>(p, delta) };
}

/// Adds `delta` (either sign) to the gauge of `key`, in this epoch's table.
/// Returns false (and counts the loss) when the table is full.
#[inline(always)]
pub fn count(key: &AggKey, delta: i64) -> bool {
    if epoch(EPOCH_TABLES) & 1 == 0 { add_delta(&COUNTS_0, key, delta) } else { add_delta(&COUNTS_1, key, delta) }
}

/// Moves one count from `from` to `to`. Either both happen or neither.
#[inline(always)]
pub fn move_count(from: &AggKey, to: &AggKey) -> bool {
    if !count(to, 1) {
        return false;
    }
    if !count(from, -1) {
        count(to, -1);
        return false;
    }
    true
}

/// Adds `delta` to the i64 under `key`, creating it at 0 when absent.
#[inline(always)]
fn add_delta<K>(m: &HashMap<K, i64>, key: &K, delta: i64) -> bool {
    if let Some(p) = m.get_ptr_mut(key) {
        atomic_add(p, delta);
        return true;
    }
    insert_and_add(m, key, delta)
}

/// Adds `delta` to the i64 counted under `key`, creating it at 0 when absent.
/// Returns false (and counts the loss) when the map is full.
#[inline(always)]
pub fn add<K>(m: &HashMap<K, i64>, key: &K, delta: i64) -> bool {
    if let Some(p) = m.get_ptr_mut(key) {
        atomic_add(p, delta);
        return true;
    }
    if delta < 0 {
        // Nothing to take from: never let a gauge go negative.
        return false;
    }
    insert_and_add(m, key, delta)
}

/// The absent-key half of `add` and `add_delta`: inserts 0 (another CPU
/// may have just done so), then adds. False, and the loss counted, when the
/// map is full.
#[inline(always)]
fn insert_and_add<K>(m: &HashMap<K, i64>, key: &K, delta: i64) -> bool {
    match m.insert(key, 0, BPF_NOEXIST) {
        Ok(()) => {}
        Err(e) if is_eexist(e.into()) => {}
        Err(_) => {
            bump(counter::LOST);
            return false;
        }
    }
    match m.get_ptr_mut(key) {
        Some(p) => {
            atomic_add(p, delta);
            true
        }
        None => {
            bump(counter::LOST);
            false
        }
    }
}

/// Counts one failed call under `key`; when `CONNECT_ERRORS` is full, under
/// the reserved key of its errno instead (`key` is rewritten to it: no
/// second key on the 512-byte stack). Lost only when even that is missing.
#[inline(always)]
pub fn count_error(key: &mut ErrKey) {
    if let Some(p) = CONNECT_ERRORS.get_ptr_mut(&*key) {
        atomic_add(p, 1);
        return;
    }
    match CONNECT_ERRORS.insert(&*key, 0, BPF_NOEXIST) {
        Ok(()) => {}
        Err(e) if is_eexist(e.into()) => {}
        Err(_) => {
            // Full: the fallback of `ErrKey::fallback(errno)`.
            key.comm = [0; 16];
            key.netns = 0;
            key.cgroup = 0;
            key.remote = [0; 16];
            key.port = 0;
            key.family = 0;
        }
    }
    match CONNECT_ERRORS.get_ptr_mut(&*key) {
        Some(p) => atomic_add(p, 1),
        None => bump(counter::LOST),
    }
}

/// `EPOCH[idx]`.
#[inline(always)]
pub fn epoch(idx: u32) -> u32 {
    EPOCH.get(idx).copied().unwrap_or(0)
}

/// The reconciliation walk in progress (see `iter.rs`).
#[inline(always)]
pub fn walk() -> u32 {
    epoch(EPOCH_WALK)
}

/// Adds to the SYN counters of a remote, in the table of this epoch.
#[inline(always)]
pub fn add_syn(key: &RemoteKey, rejected: bool) {
    if epoch(EPOCH_TABLES) & 1 == 0 {
        add_syn_in(&SYNS_0, key, rejected);
    } else {
        add_syn_in(&SYNS_1, key, rejected);
    }
}

#[inline(always)]
fn add_syn_in(syns: &HashMap<RemoteKey, SynCounts>, key: &RemoteKey, rejected: bool) {
    let mut p = syns.get_ptr_mut(key);
    if p.is_none() {
        match syns.insert(key, SynCounts::default(), BPF_NOEXIST) {
            Ok(()) => {}
            Err(e) if is_eexist(e.into()) => {}
            Err(_) => {
                bump(counter::LOST);
                return;
            }
        }
        p = syns.get_ptr_mut(key);
    }
    let Some(p) = p else {
        bump(counter::LOST);
        return;
    };
    // SAFETY: p points to the map value; fields are only updated atomically.
    unsafe {
        atomic_add(&raw mut (*p).total, 1);
        if rejected {
            atomic_add(&raw mut (*p).rejected, 1);
        }
    }
}

/// Counts one lifetime observation for a close reason.
#[inline(always)]
pub fn observe_lifetime(reason: u32, ns: u64) {
    lifetime_add(reason, ns, false);
}

/// Takes back an `observe_lifetime(reason, ns)` made on this CPU.
#[inline(always)]
pub fn unobserve_lifetime(reason: u32, ns: u64) {
    lifetime_add(reason, ns, true);
}

#[inline(always)]
fn lifetime_add(reason: u32, ns: u64, undo: bool) {
    let Some(r) = reason.checked_sub(counter::CLOSED_EXPIRED) else {
        return;
    };
    if r >= LIFETIME_REASONS {
        return;
    }
    let base = r * LIFETIME_SLOTS;
    let Some(p) = LIFETIME.get_ptr_mut(0) else {
        return;
    };
    for (idx, delta) in [(base + timewait_common::lifetime_slot(ns), 1), (base + LIFETIME_SLOTS - 1, ns)] {
        // SAFETY: this CPU's entry; tracing programs do not migrate.
        if let Some(c) = unsafe { (*p).get_mut(opaque(idx) as usize) } {
            *c = if undo { c.wrapping_sub(delta) } else { c.wrapping_add(delta) };
        }
    }
}

#[inline(always)]
pub fn is_eexist(e: i64) -> bool {
    e == -EEXIST
}
