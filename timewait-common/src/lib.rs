//! Types shared by the eBPF programs (`timewait-ebpf`) and the daemon.
//!
//! Every type is `#[repr(C)]` with explicit padding so that both sides agree on
//! its size byte for byte; `size_of` assertions at the bottom catch drift, and
//! the daemon checks the sizes against the loaded maps at start-up.
#![no_std]

/// `AF_INET` / `AF_INET6` as the kernel stores them in `skc_family`.
pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;

/// TCP states (include/net/tcp_states.h).
pub const TCP_ESTABLISHED: u8 = 1;
pub const TCP_SYN_SENT: u8 = 2;
pub const TCP_SYN_RECV: u8 = 3;
pub const TCP_FIN_WAIT1: u8 = 4;
pub const TCP_FIN_WAIT2: u8 = 5;
pub const TCP_TIME_WAIT: u8 = 6;
pub const TCP_CLOSE: u8 = 7;
pub const TCP_LISTEN: u8 = 10;
pub const TCP_CLOSING: u8 = 11;
/// A request socket (`struct request_sock`) hashed in the established table.
pub const TCP_NEW_SYN_RECV: u8 = 12;
pub const IPPROTO_TCP: u16 = 6;

pub const DIRECTION_INBOUND: u8 = 0;
pub const DIRECTION_OUTBOUND: u8 = 1;

/// Aggregation key of the per-remote gauges: one TIME_WAIT/FIN_WAIT2 minisocket
/// is counted under exactly one key at a time.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AggKey {
    /// Remote address in network byte order; IPv4 uses the first 4 bytes.
    pub remote: [u8; 16],
    /// Id of the cgroup (v2) that owned the socket (`kernfs_node.id` of the
    /// cgroup, as `bpf_get_current_cgroup_id` gives it), with cgroup
    /// attribution on; 0 when off or unknown.
    pub cgroup: u64,
    /// Inode number of the minisocket's network namespace.
    pub netns: u32,
    /// Service port, host byte order: local port for inbound, remote for outbound.
    pub port: u16,
    /// `AF_INET` or `AF_INET6`.
    pub family: u16,
    /// `DIRECTION_INBOUND` or `DIRECTION_OUTBOUND`.
    pub direction: u8,
    /// `TCP_TIME_WAIT` or `TCP_FIN_WAIT2` (the minisocket's `tw_substate`),
    /// or `SUBSTATE_CONNECTION` for a full socket of an active open (outbound
    /// only), which holds its local port toward the remote in any state.
    pub substate: u8,
    pub _pad: [u8; 6],
}

/// `AggKey::substate` of full sockets opened by `connect()` (SYN_SENT until CLOSE).
pub const SUBSTATE_CONNECTION: u8 = TCP_ESTABLISHED;

/// Errnos of `timewait_connect_errors_total`.
pub const EADDRINUSE: u32 = 98;
pub const EADDRNOTAVAIL: u32 = 99;

/// Key of `CONNECT_ERRORS`: a failed `connect()`/`bind()` by process name.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct ErrKey {
    pub comm: [u8; 16],
    pub errno: u32,
    pub netns: u32,
    /// With cgroup attribution on: the calling task's cgroup, and for a
    /// failed `connect()` the destination (family 0 when none).
    pub cgroup: u64,
    pub remote: [u8; 16],
    pub port: u16,
    pub family: u16,
    pub _pad: u32,
}

impl ErrKey {
    /// The reserved key of `errno` (shown as `comm="other"`): no name, no
    /// namespace (a real key always has one: the inode number of the calling
    /// task's), no cgroup, no destination. The daemon inserts one per errno
    /// before any program runs, so it exists even once `CONNECT_ERRORS` is
    /// full; the programs count there what no longer fits under its own key.
    pub const fn fallback(errno: u32) -> Self {
        Self { comm: [0; 16], errno, netns: 0, cgroup: 0, remote: [0; 16], port: 0, family: 0, _pad: 0 }
    }

    /// Whether this is a reserved key (`fallback`).
    pub const fn is_fallback(&self) -> bool {
        self.netns == 0
    }
}

/// `SOCK_STREAM` (`enum sock_type`, include/linux/net.h).
pub const SOCK_STREAM: u16 = 1;

/// Bits of `ROLES[0]`: what the `inet_sock_set_state` program does, set by
/// the daemon as it attaches each signal.
/// Full sockets: listeners, active opens, connect() failures.
pub const ROLE_SOCKETS: u32 = 1;
/// The tracepoint lifecycle: minisockets created from the close of their
/// full socket, taken over by a SYN or a `connect()` (`TW_INDEX`).
pub const ROLE_LIFECYCLE: u32 = 2;

/// Key of `TW_INDEX` (tracepoint lifecycle): a minisocket by what the next
/// socket with its 4-tuple shares with it: namespace, the kernel's own
/// ehash value of the 4-tuple (`skc_hash`, salted per namespace), remote port.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct IndexKey {
    pub netns: u32,
    pub hash: u32,
    /// Network byte order, as in `skc_dport`.
    pub rport: u16,
    pub family: u16,
    pub _pad: u32,
}

/// Value of `TW_INDEX`: the followed minisocket (`TW_SOCKS` key) and what
/// tells it from a later one at the same address.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default)]
pub struct IndexVal {
    pub timer: u64,
    pub created_ns: u64,
    pub lport: u16,
    pub _pad: [u16; 3],
}

/// Value of `UNTOLD` (tracepoint lifecycle, by the `IndexKey` of the
/// 4-tuple): a full socket closed toward TIME_WAIT and no minisocket was
/// left to find in its bucket. Either it made none (an RST, a full
/// `tcp_max_tw_buckets`), or a SYN took the minisocket over on another CPU
/// between its hashing and this close. The connection that SYN starts tells
/// which: its initial sequence number is `isn`.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default)]
pub struct Untold {
    /// What the minisocket would have been counted under.
    pub key: AggKey,
    /// `bpf_ktime_get_ns()` at the close.
    pub closed_ns: u64,
    /// `snd_nxt + 65537` (1 for 0), the ISN of a connection that takes the
    /// minisocket over (`tcp_timewait_state_process`, `tcp_twsk_unique`).
    pub isn: u32,
    /// Local port, host byte order.
    pub lport: u16,
    pub _pad: u16,
}

/// Key of the per-remote SYN counters (`SYNS`).
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RemoteKey {
    pub remote: [u8; 16],
    pub netns: u32,
    pub family: u16,
    pub _pad: [u8; 2],
}

/// Value of `SYNS`: SYNs that hit a minisocket, and those not accepted.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default)]
pub struct SynCounts {
    pub total: i64,
    pub rejected: i64,
}

/// Lifetime histogram (`LIFETIME` per-CPU array): for each close reason
/// (`counter::CLOSED_*` - `CLOSED_EXPIRED`), `LIFETIME_BUCKETS_NS.len()`
/// non-cumulative bucket counts, one count beyond the last bound, and the sum
/// of lifetimes in nanoseconds.
pub const LIFETIME_BUCKETS_NS: [u64; 16] = [
    1_000_000,
    10_000_000,
    100_000_000,
    500_000_000,
    1_000_000_000,
    5_000_000_000,
    10_000_000_000,
    30_000_000_000,
    50_000_000_000,
    59_000_000_000,
    60_000_000_000,
    61_000_000_000,
    62_000_000_000,
    65_000_000_000,
    90_000_000_000,
    120_000_000_000,
];
pub const LIFETIME_SLOTS: u32 = LIFETIME_BUCKETS_NS.len() as u32 + 2;
pub const LIFETIME_REASONS: u32 = 5;

/// The bucket slot of a lifetime (`LIFETIME_BUCKETS_NS.len()` when beyond).
#[inline(always)]
pub fn lifetime_slot(ns: u64) -> u32 {
    let mut i = 0;
    while i < LIFETIME_BUCKETS_NS.len() {
        if ns <= LIFETIME_BUCKETS_NS[i] {
            return i as u32;
        }
        i += 1;
    }
    LIFETIME_BUCKETS_NS.len() as u32
}

/// Per-CPU record of the last minisocket killed on this CPU for a reason not
/// seen yet (`closed` as `other`), by which task: on the fentry path the exit
/// of `inet_hash_connect` that follows it in the same task, with the
/// minisocket's own 4-tuple, shows a `tcp_tw_reuse` takeover and moves it
/// to `reused_by_connect`.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default)]
pub struct LastKill {
    pub pid_tgid: u64,
    /// The lifetime observed for it, or u64::MAX when none was (a minisocket
    /// of the start-up snapshot).
    pub lifetime_ns: u64,
    pub remote: [u8; 16],
    pub family: u16,
    pub lport: u16,
    pub rport: u16,
    pub _pad: u16,
}

/// Per-CPU record of the last minisocket whose timer was cancelled, to match
/// it with the request socket a listener creates for the SYN that killed it.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default)]
pub struct LastCancel {
    pub timer: u64,
    pub remote: [u8; 16],
    pub lport: u16,
    pub rport: u16,
    pub _pad: u32,
}

/// `enum tcp_tw_status` (include/net/tcp.h): what `tcp_timewait_state_process`
/// decided about a segment that met a minisocket.
pub const TCP_TW_SUCCESS: u32 = 0;
pub const TCP_TW_RST: u32 = 1;
pub const TCP_TW_ACK: u32 = 2;
pub const TCP_TW_SYN: u32 = 3;
/// `SegmentSlot::verdict` while `tcp_timewait_state_process` is still running.
pub const VERDICT_PENDING: u32 = u32::MAX;

/// Per-CPU record of the segment a followed minisocket is processing
/// (fentry/kprobe path): set on entry to `tcp_timewait_state_process`,
/// completed with its verdict on exit, read by the kill that follows in the
/// same softirq.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default)]
pub struct SegmentSlot {
    /// The minisocket (`struct inet_timewait_sock *`); 0 when none.
    pub tw: u64,
    /// The segment's TCP flags byte.
    pub flags: u16,
    /// Its `counter::SEG_*` kind.
    pub kind: u16,
    /// `TCP_TW_*`, or `VERDICT_PENDING` while the function runs.
    pub verdict: u32,
    /// The followed minisocket's remote (the entry may be gone by the exit:
    /// an RST kills it inside the function).
    pub remote: RemoteKey,
}

/// The active open last started on a CPU (`CONNECTING`): who, and which
/// socket (its destination and port are read from it only when needed).
#[repr(C)]
#[derive(Copy, Clone, Debug, Default)]
pub struct ConnectDst {
    /// `bpf_get_current_pid_tgid()` of the caller; 0 when none.
    pub pid_tgid: u64,
    /// The socket that caller is connecting (`inet_sock_set_state` CLOSE ->
    /// SYN_SENT, in `tcp_v4_connect`/`tcp_v6_connect`).
    pub sk: u64,
}

/// Value of the `TW_SOCKS` map, keyed by the address of `tw->tw_timer`.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default)]
pub struct TwEntry {
    pub key: AggKey,
    /// `bpf_ktime_get_ns()` when the minisocket was first seen.
    pub created_ns: u64,
    /// `TW_INDEX` key parts of a minisocket indexed by the tracepoint
    /// lifecycle (`indexed` 1): its `skc_hash` and raw remote port.
    pub index_hash: u32,
    pub index_rport: u16,
    pub indexed: u16,
    /// Tracepoint lifecycle: the initial sequence number of a connection
    /// that takes this minisocket over (`tw_snd_nxt + 65537`, never 0;
    /// 0 when unknown).
    pub isn: u32,
    pub _pad: u32,
    /// The reconciliation walk that last found this minisocket in the
    /// kernel's tables (`EPOCH[EPOCH_WALK]` then), see `iter.rs`.
    pub seen: u32,
    /// 1 while the minisocket is counted under `key` in the gauges (0 when
    /// it is cancelled).
    pub counted: u16,
    /// How it came to be followed: `FOLLOWED_AT_CREATION` (0),
    /// `FOUND_BY_WALK` (1: the start-up snapshot or a reconciliation) or
    /// `FOUND_BY_SEGMENT` (2: a segment reached it before its creation was
    /// told, tracepoint path).
    pub from_snapshot: u16,
}

/// `TwEntry::from_snapshot`: followed when it was created.
pub const FOLLOWED_AT_CREATION: u16 = 0;
/// `TwEntry::from_snapshot`: found by a walk; its age is unknown.
pub const FOUND_BY_WALK: u16 = 1;
/// `TwEntry::from_snapshot`: found by the first segment it dropped, on
/// another CPU than the one creating it, before that CPU told its creation
/// (`tcp_time_wait()` hashes the minisocket, then closes the socket). Its
/// creation is counted then; the socket's close takes it over.
pub const FOUND_BY_SEGMENT: u16 = 2;

impl AggKey {
    /// The per-remote key (SYN counters) of what is counted under this key.
    pub const fn remote_key(&self) -> RemoteKey {
        RemoteKey { remote: self.remote, netns: self.netns, family: self.family, _pad: [0; 2] }
    }
}

impl TwEntry {
    /// Its `TW_INDEX` key (meaningful when `indexed` is 1): the eBPF programs
    /// and the daemon's reconciliation both remove entries by it.
    pub const fn index_key(&self) -> IndexKey {
        IndexKey { netns: self.key.netns, hash: self.index_hash, rport: self.index_rport, family: self.key.family, _pad: 0 }
    }
}

/// Value of `CONNS`: a full socket of an active open.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default)]
pub struct ConnEntry {
    /// Its key (substate `SUBSTATE_CONNECTION`).
    pub key: AggKey,
    /// `bpf_ktime_get_ns()` when it was first seen.
    pub created_ns: u64,
    /// As `TwEntry::seen`.
    pub seen: u32,
    pub _pad: u32,
}

/// Indices of the `EPOCH` array: which of the two gauge-delta and SYN
/// tables the programs write (its low bit), and the number of the
/// reconciliation walk running.
pub const EPOCH_TABLES: u32 = 0;
pub const EPOCH_WALK: u32 = 1;

/// Indices of the `COUNTERS` per-CPU array.
pub mod counter {
    pub const CREATED_INBOUND: u32 = 0;
    pub const CREATED_OUTBOUND: u32 = 1;
    pub const CLOSED_EXPIRED: u32 = 2;
    pub const CLOSED_REUSED_BY_SYN: u32 = 3;
    pub const CLOSED_REUSED_BY_CONNECT: u32 = 4;
    pub const CLOSED_RESET: u32 = 5;
    pub const CLOSED_OTHER: u32 = 6;
    /// A map was full: an event could not be recorded.
    pub const LOST: u32 = 7;
    /// Minisockets found by the start-up snapshot (`iter/tcp`).
    pub const SNAPSHOT: u32 = 8;
    /// Listening sockets found by the start-up snapshot.
    pub const SNAPSHOT_LISTENERS: u32 = 9;
    /// Substate changes FIN_WAIT2 -> TIME_WAIT seen.
    pub const SUBSTATE_CHANGES: u32 = 10;
    /// Segments a minisocket dropped, by kind.
    pub const SEG_ACK: u32 = 11;
    pub const SEG_FIN: u32 = 12;
    pub const SEG_RST: u32 = 13;
    pub const SEG_SYN: u32 = 14;
    pub const SEG_DATA: u32 = 15;
    /// Minisockets whose direction the connection's history corrected at
    /// creation (accepted though the listener is gone, or an active open
    /// from a listening port).
    pub const DIRECTION_FROM_HISTORY: u32 = 16;
    /// Minisockets and active opens a reconciliation walk found unfollowed
    /// (their creation was lost).
    pub const RECONCILE_FOUND: u32 = 17;
    /// Tracepoint lifecycle: minisockets another CPU reached between their
    /// hashing and their socket's close, whose life was told from there (a
    /// segment's find, a SYN takeover found by its ISN).
    pub const OUT_OF_ORDER: u32 = 18;
    pub const COUNT: u32 = 19;
}

/// Key of `NAT_DROPS`: one destination that a packet could not reach
/// because conntrack found no free NAT source port (`nat_kfree_skb`).
/// Addresses as in the translated packet: `nat_address` its source (IPv4 in
/// the first 4 bytes), `remote` its destination, `port` the destination
/// port (host order), `l4proto` the IP protocol number.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct NatDropKey {
    pub netns: u32,
    pub family: u16,
    pub l4proto: u8,
    pub _pad: u8,
    pub nat_address: [u8; 16],
    pub remote: [u8; 16],
    pub port: u16,
    pub _pad2: [u8; 2],
}

/// Capacity of `NAT_DROPS`; what no longer fits is counted in
/// `NAT_UNATTRIBUTED[0]`.
pub const NAT_DROP_KEYS: u32 = 4096;

mod config;
pub use config::{Config, NatConfig, Offsets, SockHead};

const _: () = assert!(core::mem::size_of::<AggKey>() == 40);
const _: () = assert!(core::mem::size_of::<RemoteKey>() == 24);
const _: () = assert!(core::mem::size_of::<ErrKey>() == 56);
const _: () = assert!(core::mem::size_of::<LastCancel>() == 32);
const _: () = assert!(core::mem::size_of::<LastKill>() == 40);
const _: () = assert!(core::mem::size_of::<ConnectDst>() == 16);
const _: () = assert!(core::mem::size_of::<SegmentSlot>() == 40);
const _: () = assert!(core::mem::size_of::<ConnEntry>() == 56);
const _: () = assert!(core::mem::size_of::<IndexKey>() == 16);
const _: () = assert!(core::mem::size_of::<SockHead>() == 20);
const _: () = assert!(core::mem::size_of::<IndexVal>() == 24);
const _: () = assert!(core::mem::size_of::<TwEntry>() == 40 + 8 * 2 + 4 * 4);
const _: () = assert!(core::mem::size_of::<Offsets>() == 44 * 4);
const _: () = assert!(core::mem::size_of::<Config>() == 176 + 24);
const _: () = assert!(core::mem::size_of::<Untold>() == 40 + 16);
const _: () = assert!(core::mem::size_of::<NatDropKey>() == 44);
const _: () = assert!(core::mem::size_of::<NatConfig>() == 16 + 10 * 4);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all fields are integers or integer arrays with explicit padding;
    // any bit pattern is valid.
    unsafe impl aya::Pod for super::AggKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::TwEntry {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Offsets {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Config {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::RemoteKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::SynCounts {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ErrKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ConnEntry {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::IndexKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::IndexVal {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::NatDropKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::NatConfig {}
}
