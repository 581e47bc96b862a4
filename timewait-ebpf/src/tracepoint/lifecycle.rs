//! The tracepoint lifecycle without timer hooks: what `inet_sock_set_state`
//! (which this path attaches for full sockets anyway) tells about
//! minisockets. Together with the expiry (`timer`) and the segments a
//! minisocket drops (`skb`, which also tells a kill by RST), that is every
//! end but a namespace's teardown, which the reconciliation walks close.
//!
//! - Creation: `tcp_time_wait()` hashes the new minisocket into the
//!   established hash in place of its full socket (`inet_twsk_hashdance_schedule`),
//!   then closes the socket (`tcp_done` -> `tcp_set_state(TCP_CLOSE)`): at that
//!   FIN_WAIT1/FIN_WAIT2/CLOSING -> CLOSE, the minisocket is in the socket's
//!   own ehash bucket (`skc_hash & ehash_mask`), at its head (it was added a
//!   moment ago) unless another CPU added to the same bucket since. A close
//!   that made no minisocket (an RST, a FIN_WAIT2 timeout, a full
//!   `tcp_max_tw_buckets`) finds none. The connection's own history (an
//!   active open we followed, or not) gives its direction, its socket the
//!   owning cgroup. The hash comes first: other CPUs can reach the
//!   minisocket before this close (a peer that answers at once, a NAT that
//!   hands the port straight to the next connection, a task preempted in
//!   between). A segment it drops follows it itself (`skb::found_by_segment`)
//!   and this close adopts that entry, or, when that segment killed it (an
//!   RST, a SYN answered with one), finds its `ENDED` mark. A SYN it
//!   accepted leaves nothing to find: `gone` then looks for the connection
//!   that SYN started, by the ISN a minisocket gives it (`tw_snd_nxt +
//!   65537`), in the bucket at once or at its `SYN_RECV -> ESTABLISHED`.
//! - Takeover by SYN: a minisocket that accepts a SYN is killed inside
//!   `tcp_v4_rcv` and the listener takes the SYN; nothing traceable follows
//!   until the connection it starts is established (SYN_RECV -> ESTABLISHED,
//!   one round trip later), with the same 4-tuple: `TW_INDEX` finds the
//!   minisocket by it. A handshake that never completes leaves the
//!   minisocket followed until the walks find it gone (`other`).
//! - Takeover by `connect()` (`tcp_tw_reuse`, in `__inet_check_established`):
//!   the socket that took the 4-tuple leaves SYN_SENT (ESTABLISHED, or CLOSE
//!   when the connection fails) with it: found the same way.

use timewait_common::{
    AggKey, Config, DIRECTION_INBOUND, DIRECTION_OUTBOUND, FOLLOWED_AT_CREATION, FOUND_BY_WALK, IndexKey, SockHead, TCP_CLOSE, TCP_CLOSING,
    TCP_ESTABLISHED, TCP_FIN_WAIT1, TCP_NEW_SYN_RECV, TCP_FIN_WAIT2, TCP_SYN_RECV, TCP_SYN_SENT, TCP_TIME_WAIT, counter,
};

use super::{
    Tracepoints,
    maps::{ENDED, TW_INDEX, UNTOLD, UNTOLD_AT, UNTOLD_SCRATCH},
};
use crate::{
    maps::{TW_SOCKS, add_syn, bump, observe_lifetime, read},
    sock::{cgroup_of, head, key_in, remote_in},
    tw::{bump_created, close, entry_copy, follow_key, move_to, remote_key},
};

/// How many minisockets of one ehash bucket are looked at: the new one is at
/// the head unless another CPU added to the same bucket since.
const BUCKET_STEPS: u32 = 4;

/// Whether the state change `old -> new` says something about a minisocket.
#[inline(always)]
pub fn wanted(old: i32, new: i32) -> bool {
    let (close, syn_sent) = (TCP_CLOSE as i32, TCP_SYN_SENT as i32);
    (new == close && (old == TCP_FIN_WAIT2 as i32 || old == TCP_CLOSING as i32 || old == TCP_FIN_WAIT1 as i32))
        || (old == TCP_SYN_RECV as i32 && new == TCP_ESTABLISHED as i32)
        || (old == syn_sent && (new == TCP_ESTABLISHED as i32 || new == close))
}

/// TCP socket `sk` of watched namespace `netns` went `old -> new` (`wanted`).
/// `active`: whether it was an active open we followed (None when the full
/// sockets are followed by fentry, which has forgotten it by now).
#[inline(always)]
pub fn state_changed(cfg: &Config, sk: u64, netns: u32, old: i32, new: i32, active: Option<bool>) {
    if new == TCP_CLOSE as i32 && old != TCP_SYN_SENT as i32 {
        match created(cfg, sk, netns, active) {
            DONE => {}
            GONE => gone(cfg, sk, netns, active),
            timer => {
                // The first close of an entry left at this address; then
                // this minisocket's own.
                displaced(cfg, sk, timer);
                let _ = created(cfg, sk, netns, active);
            }
        }
        return;
    }
    let reason =
        if old == TCP_SYN_RECV as i32 { counter::CLOSED_REUSED_BY_SYN } else { counter::CLOSED_REUSED_BY_CONNECT };
    taken_over(cfg, sk, netns, reason);
}

/// Whether `cand` (head `c`) has the 4-tuple of full socket `sk` (head `h`,
/// namespace `net`, remote `remote`). The local port is in the hash: the
/// closing socket's own reads 0 by now (`inet_put_port`).
#[inline(always)]
fn same_tuple(cfg: &Config, cand: u64, c: &SockHead, h: &SockHead, net: u64, remote: &[u8; 16]) -> Result<bool, i64> {
    Ok(c.hash == h.hash
        && c.dport == h.dport
        && c.family == h.family
        && read::<u64>(cand, cfg.offsets.skc_net)? == net
        && remote_in(cfg, cand, c)? == *remote)
}

/// The first entry of the ehash bucket of `hash` in the table of socket
/// `sk`'s namespace, and that namespace.
#[inline(always)]
fn bucket_of(cfg: &Config, sk: u64, hash: u32) -> Result<(u64, u64), i64> {
    let o = &cfg.offsets;
    let net: u64 = read(sk, o.skc_net)?;
    let death_row = if o.death_row_is_ptr != 0 { read::<u64>(net, o.net_death_row)? } else { net + o.net_death_row as u64 };
    let hashinfo: u64 = read(death_row, o.death_row_hashinfo)?;
    let ehash: u64 = read(hashinfo, o.hashinfo_ehash)?;
    let mask: u32 = read(hashinfo, o.hashinfo_ehash_mask)?;
    // `struct inet_ehash_bucket` is one `hlist_nulls_head`: its `first`.
    let first: u64 = read(ehash + (hash & mask) as u64 * o.ehash_bucket_size as u64, 0)?;
    Ok((first, net))
}

/// The initial sequence number of a connection that takes over the
/// minisocket of a socket whose `snd_nxt` it is (`tcp_timewait_state_process`,
/// `tcp_twsk_unique`: `tw_snd_nxt + 65535 + 2`, 1 for 0).
#[inline(always)]
fn takeover_isn(snd_nxt: u32) -> u32 {
    match snd_nxt.wrapping_add(65535 + 2) {
        0 => 1,
        isn => isn,
    }
}

/// The minisocket that full socket `sk` (closing now, head `h`) turned
/// into, if any, with its head.
#[inline(always)]
fn minisocket_of(cfg: &Config, sk: u64, h: &SockHead) -> Result<Option<(u64, SockHead)>, i64> {
    let (mut node, net) = bucket_of(cfg, sk, h.hash)?;
    let remote = remote_in(cfg, sk, h)?;
    for _ in 0..BUCKET_STEPS {
        // A nulls marker (low bit set) ends the chain.
        if node & 1 != 0 || node == 0 {
            return Ok(None);
        }
        let cand = node - cfg.offsets.skc_nulls_node as u64;
        let c = head(cfg, cand)?;
        if c.state == TCP_TIME_WAIT && same_tuple(cfg, cand, &c, h, net, &remote)? {
            return Ok(Some((cand, c)));
        }
        node = read(node, 0)?;
    }
    Ok(None)
}

/// Whether the connection that took over a minisocket with `tuple`
/// (`skc_hash`, raw remote port, family) and `remote` is in its bucket of
/// socket `sk`'s table: a request socket (`NEW_SYN_RECV`, its SYN-ACK sent)
/// or the socket it became, started at `isn` (which also tells it from a
/// fresh connection with that 4-tuple).
#[inline(always)]
fn successor_in_bucket(cfg: &Config, sk: u64, tuple: (u32, u16, u16), remote: &[u8; 16], isn: u32) -> Result<bool, i64> {
    let (hash, dport, family) = tuple;
    let (mut node, _) = bucket_of(cfg, sk, hash)?;
    for _ in 0..BUCKET_STEPS {
        if node & 1 != 0 || node == 0 {
            return Ok(false);
        }
        let cand = node - cfg.offsets.skc_nulls_node as u64;
        let c = head(cfg, cand)?;
        if c.state != TCP_TIME_WAIT
            && c.hash == hash
            && c.dport == dport
            && c.family == family
            && remote_in(cfg, cand, &c)? == *remote
        {
            let started = if c.state == TCP_NEW_SYN_RECV {
                read::<u32>(cand, cfg.offsets.reqsk_snt_isn)?
            } else {
                let una: u32 = read(cand, cfg.offsets.tcp_snd_una)?;
                let acked: u64 = read(cand, cfg.offsets.tcp_bytes_acked)?;
                una.wrapping_sub(acked as u32).wrapping_sub(1)
            };
            return Ok(started == isn);
        }
        node = read(node, 0)?;
    }
    Ok(false)
}

/// What `created` leaves to do: nothing, `gone`, or else `displaced` at the
/// timer address it returns.
const DONE: u64 = 0;
const GONE: u64 = 1;

/// FIN_WAIT1/FIN_WAIT2/CLOSING -> CLOSE of `sk`: follows the minisocket it
/// turned into, if it did (`DONE`); `GONE` when none is left to follow, the
/// minisocket's timer address when the entry of one that lived there first
/// is to be closed (`displaced`).
/// Each of `created`, `gone` and `taken_over` is a function of its own (a
/// BPF-to-BPF call, returning at most a scalar: a BPF function takes at most
/// 5 arguments, and a returned `Result` would be a sixth), called one after
/// the other: nested or inlined into the program, their locals and the
/// sockets part's took a frame past what 5.10's verifier allows for the
/// combined stack (672, then 544, of 512 bytes).
#[inline(never)]
fn created(cfg: &Config, sk: u64, netns: u32, active: Option<bool>) -> u64 {
    try_created(cfg, sk, netns, active).unwrap_or(DONE)
}

/// The aggregation key of a minisocket of closing socket `sk` in
/// `substate`, from `s` (head `h`: the minisocket, or the socket with its
/// local port restored), and what the listener table alone would say
/// (direction, port).
#[inline(always)]
fn close_key(cfg: &Config, sk: u64, s: u64, h: &SockHead, netns: u32, active: Option<bool>, substate: u8) -> Result<(AggKey, (u8, u16)), i64> {
    let mut key = key_in(cfg, s, h, netns, false, substate)?;
    let listed = (key.direction, key.port);
    if let Some(active) = active {
        // The connection's own history, whatever the listener table says now
        // (a server that stopped, an active open from a port that also listens).
        if active {
            key.direction = DIRECTION_OUTBOUND;
            key.port = u16::from_be(h.dport);
        } else {
            key.direction = DIRECTION_INBOUND;
            key.port = h.num;
        }
    }
    // The owner: the minisocket has none, the socket it came from still has.
    key.cgroup = cgroup_of(cfg, sk);
    Ok((key, listed))
}

#[inline(always)]
fn try_created(cfg: &Config, sk: u64, netns: u32, active: Option<bool>) -> Result<u64, i64> {
    let h = head(cfg, sk)?;
    let Some((tw, th)) = minisocket_of(cfg, sk, &h)? else {
        return Ok(GONE);
    };
    let (key, listed) = close_key(cfg, sk, tw, &th, netns, active, read::<u8>(tw, cfg.offsets.tw_substate)?)?;
    let timer = tw + cfg.offsets.tw_timer as u64;
    if let Some(old) = entry_copy(timer) {
        if old.from_snapshot != FOLLOWED_AT_CREATION && old.key.family == key.family && old.key.remote == key.remote {
            // A walk or a segment on another CPU found this very minisocket
            // first, between the hash and this close (a task preempted in
            // between on a busy host; a SYN from a NAT that reused the port
            // at once). Still a creation seen here: under the connection's
            // own history, counted once.
            adopt(timer, &key, old.from_snapshot == FOUND_BY_WALK, isn_of(cfg, sk));
            return Ok(DONE);
        }
        // A minisocket whose end went unseen: its memory holds this one now.
        return Ok(timer);
    } else if read::<u64>(timer, cfg.offsets.timer_pprev)? == 0 {
        // Killed on another CPU before this close, still in the bucket: by
        // a segment that told its whole life there (`skb::found_by_segment`),
        // or else by a SYN it accepted, or by a segment yet to reach
        // `kfree_skb` (which then tells it).
        return Ok(if ended_here_first(timer) { DONE } else { GONE });
    }
    if follow_key::<Tracepoints>(&th, timer, &key, 0, isn_of(cfg, sk)) {
        bump_created(&key);
        if (key.direction, key.port) != listed {
            bump(counter::DIRECTION_FROM_HISTORY);
        }
    }
    Ok(DONE)
}

/// The ISN of a connection that takes over the minisocket of closing socket
/// `sk` (0: unknown).
#[inline(always)]
fn isn_of(cfg: &Config, sk: u64) -> u32 {
    read::<u32>(sk, cfg.offsets.tcp_snd_nxt).map(takeover_isn).unwrap_or(0)
}

/// The entry under `timer` is of a minisocket whose memory a new one (of
/// closing socket `sk`) holds now, and whose end no event told. Killed by
/// a SYN it accepted, its successor is in the bucket by now (the connection
/// is established one round trip after the kill, and the new minisocket
/// took the memory within it); else something untold ended it (`other`).
#[inline(never)]
fn displaced(cfg: &Config, sk: u64, timer: u64) {
    let Some(old) = entry_copy(timer) else {
        return;
    };
    let tuple = (old.index_hash, old.index_rport, old.key.family);
    if old.isn != 0
        && old.indexed != 0
        && successor_in_bucket(cfg, sk, tuple, &old.key.remote, old.isn).unwrap_or(false)
    {
        if close::<Tracepoints>(timer, old, counter::CLOSED_REUSED_BY_SYN).is_some() {
            add_syn(&remote_key(old), false);
            bump(counter::OUT_OF_ORDER);
        }
        return;
    }
    let _ = close::<Tracepoints>(timer, old, counter::CLOSED_OTHER);
}

/// Makes the entry a walk or a segment made for the minisocket under
/// `timer` the one of its creation: its key, a lifetime observed at its
/// end and, for a walk's find (`count`), its creation count (a segment's
/// find counted it).
#[inline(always)]
fn adopt(timer: u64, key: &AggKey, count: bool, isn: u32) {
    let Some(e) = TW_SOCKS.get_ptr_mut(timer) else {
        return;
    };
    // SAFETY: the entry of a minisocket created a moment ago; walks write
    // only `seen`, a segment on another CPU at most its substate.
    let entry = unsafe { &mut *e };
    if entry.from_snapshot == FOLLOWED_AT_CREATION {
        return;
    }
    move_to(entry, *key);
    entry.from_snapshot = FOLLOWED_AT_CREATION;
    entry.isn = isn;
    // `created_ns` stays the find's, microseconds before this close: it
    // is also what tells this minisocket's `TW_INDEX` entry from a later
    // one's (a takeover, `unindex`).
    if count {
        // The walk's find stays counted: per-CPU counters are only ever
        // added to (one taken back on another CPU would wrap that CPU's slot).
        bump_created(key);
    }
}

/// Whether a segment found and closed the minisocket under `timer` (whose
/// timer is no longer pending) within the last second: then its life has
/// been told. The mark is taken.
#[inline(always)]
fn ended_here_first(timer: u64) -> bool {
    // SAFETY: read-only copy of a u64.
    let Some(at) = (unsafe { ENDED.get(&timer) }).copied() else {
        return false;
    };
    let _ = ENDED.remove(&timer);
    // SAFETY: helper without preconditions.
    let now = unsafe { aya_ebpf::helpers::bpf_ktime_get_ns() };
    // An older mark is another minisocket's that lived at this address.
    now.saturating_sub(at) < 1_000_000_000
}

/// Full socket `sk` (head `h`) closed toward TIME_WAIT and no minisocket is
/// left to follow: it made none (an RST, a FIN_WAIT2 timeout, a full
/// `tcp_max_tw_buckets`), or a SYN took the minisocket over on another CPU
/// between its hashing and this close (a NAT that hands the port straight
/// to the next connection; nothing traceable runs at that takeover). The
/// connection such a SYN starts has the ISN the minisocket derives from the
/// socket (`tw_snd_nxt + 65537`, `tcp_timewait_state_process`), which a
/// fresh one has with odds of 1 in 2^32. Already in the bucket (request
/// socket or established): the whole life is told now. Not yet: noted in
/// `UNTOLD` for its `SYN_RECV -> ESTABLISHED` to tell (`told_late`).
/// (A `connect()` with `tcp_tw_reuse` takes over only a minisocket whose
/// last timestamp is a second old, never one this young.)
#[inline(never)]
fn gone(cfg: &Config, sk: u64, netns: u32, active: Option<bool>) {
    let _ = try_gone(cfg, sk, netns, active);
}

#[inline(always)]
fn try_gone(cfg: &Config, sk: u64, netns: u32, active: Option<bool>) -> Result<(), i64> {
    let mut h = head(cfg, sk)?;
    h.num = u16::from_be(read(sk, cfg.offsets.inet_sport)?);
    let h = &h;
    let isn = takeover_isn(read(sk, cfg.offsets.tcp_snd_nxt)?);
    // SAFETY: helper without preconditions.
    let now = unsafe { aya_ebpf::helpers::bpf_ktime_get_ns() };
    // A SYN takes over only a minisocket in TIME_WAIT proper.
    let (key, _) = close_key(cfg, sk, sk, h, netns, active, TCP_TIME_WAIT)?;
    if successor_in_bucket(cfg, sk, (h.hash, h.dport, h.family), &key.remote, isn)? {
        tell_takeover(&key, 0);
        return Ok(());
    }
    let Some(slot) = UNTOLD_SCRATCH.get_ptr_mut(0) else {
        return Ok(());
    };
    // SAFETY: this CPU's slot; tracing programs do not migrate.
    let u = unsafe { &mut *slot };
    u.key = key;
    u.closed_ns = now;
    u.isn = isn;
    u.lport = h.num;
    u._pad = 0;
    let ikey = IndexKey { netns, hash: h.hash, rport: h.dport, family: h.family, _pad: 0 };
    if UNTOLD.insert(&ikey, &*u, 0).is_ok()
        && let Some(at) = UNTOLD_AT.get_ptr_mut(0)
    {
        // SAFETY: a plain u64 shared by all CPUs; a lost race leaves another
        // CPU's time, as recent.
        unsafe { *at = now };
    }
    Ok(())
}

/// Counts the whole life of a minisocket a SYN took over before its
/// creation was told (`gone`): created under `key`, closed reused by SYN
/// after `lifetime` ns, the SYN accepted. Never in the gauges: it lived
/// microseconds.
#[inline(always)]
fn tell_takeover(key: &AggKey, lifetime: u64) {
    bump(counter::OUT_OF_ORDER);
    bump_created(key);
    bump(counter::CLOSED_REUSED_BY_SYN);
    observe_lifetime(counter::CLOSED_REUSED_BY_SYN, lifetime);
    add_syn(&key.remote_key(), false);
}

/// A connection left SYN_RECV with the 4-tuple of a close that found no
/// minisocket (`gone`), within a second of the last such close: when it
/// started at the ISN noted there, the SYN that started it took that
/// minisocket over.
#[inline(always)]
fn told_late(cfg: &Config, sk: u64, h: &SockHead, ikey: &IndexKey) -> Result<(), i64> {
    // SAFETY: helper without preconditions.
    let now = unsafe { aya_ebpf::helpers::bpf_ktime_get_ns() };
    let at = UNTOLD_AT.get(0).copied().unwrap_or(0);
    if now.saturating_sub(at) > 1_000_000_000 {
        return Ok(());
    }
    // SAFETY: read-only view; what is needed is copied before the entry is
    // claimed below.
    let Some(u) = (unsafe { UNTOLD.get(ikey) }) else {
        return Ok(());
    };
    let (isn, lport, closed_ns) = (u.isn, u.lport, u.closed_ns);
    // `snd_una` is still the ISN + 1 as the connection is established.
    let una: u32 = read(sk, cfg.offsets.tcp_snd_una)?;
    if una != isn.wrapping_add(1) || (h.num != 0 && h.num != lport) || u.key.remote != remote_in(cfg, sk, h)? {
        return Ok(());
    }
    let key = u.key;
    if UNTOLD.remove(ikey).is_ok() {
        tell_takeover(&key, now.saturating_sub(closed_ns));
    }
    Ok(())
}

/// A connection left SYN_RECV or SYN_SENT with the 4-tuple of a followed
/// minisocket: a SYN or a `connect()` took it over (`reason`).
#[inline(never)]
fn taken_over(cfg: &Config, sk: u64, netns: u32, reason: u32) {
    let _ = try_taken_over(cfg, sk, netns, reason);
}

#[inline(always)]
fn try_taken_over(cfg: &Config, sk: u64, netns: u32, reason: u32) -> Result<(), i64> {
    let h = head(cfg, sk)?;
    let key = IndexKey { netns, hash: h.hash, rport: h.dport, family: h.family, _pad: 0 };
    // SAFETY: read-only copies of plain values.
    let Some(val) = (unsafe { TW_INDEX.get(&key) }).copied() else {
        if reason == counter::CLOSED_REUSED_BY_SYN {
            return told_late(cfg, sk, &h, &key);
        }
        return Ok(());
    };
    let Some(entry) = (unsafe { TW_SOCKS.get(val.timer) }).copied() else {
        let _ = TW_INDEX.remove(&key);
        return Ok(());
    };
    // A later minisocket at the same address, or another 4-tuple with the
    // same hash and remote port: not this one. (After CLOSE the socket's
    // local port reads 0.)
    if entry.created_ns != val.created_ns
        || entry.key.remote != remote_in(cfg, sk, &h)?
        || (h.num != 0 && h.num != val.lport)
    {
        return Ok(());
    }
    if reason == counter::CLOSED_REUSED_BY_SYN
        && entry.isn != 0
        && read::<u32>(sk, cfg.offsets.tcp_snd_una)? != entry.isn.wrapping_add(1)
    {
        // A connection with its 4-tuple that no SYN of it started: it was
        // gone before (an end no event told, such as an RST whose segment
        // was not seen), and the listener took this one.
        let _ = close::<Tracepoints>(val.timer, &entry, counter::CLOSED_OTHER);
        return Ok(());
    }
    if close::<Tracepoints>(val.timer, &entry, reason).is_some() && reason == counter::CLOSED_REUSED_BY_SYN {
        add_syn(&remote_key(&entry), false);
    }
    Ok(())
}
