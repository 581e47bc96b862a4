//! Full sockets: `inet_sock_set_state(const struct sock *, const int
//! oldstate, const int newstate)`.
//! - listening ports, so each minisocket gets its direction;
//! - active opens (CLOSE -> SYN_SENT in `tcp_v4_connect`/`tcp_v6_connect`,
//!   after the destination is set) until CLOSE: the local ports held toward
//!   each destination. A socket that turns into a minisocket goes to CLOSE
//!   right after the minisocket is created, which then holds the port;
//! - that CLOSE also gives the new minisocket its direction from the
//!   connection's own history (`direction_from_history`);
//! - a connect() that failed for want of a port (`connect`);
//! - on the tracepoint lifecycle (`ROLE_LIFECYCLE`), the creation and the
//!   takeovers of minisockets (`tracepoint::lifecycle`).
//! What it serves is `ROLES[0]`: the full-socket part only when the fentry
//! hooks of the sockets signal did not attach.

use aya_ebpf::{helpers::bpf_ktime_get_ns, macros::btf_tracepoint, programs::BtfTracePointContext};
use timewait_common::{
    AggKey, Config, ConnEntry, DIRECTION_INBOUND, DIRECTION_OUTBOUND, IPPROTO_TCP, ROLE_LIFECYCLE, ROLE_SOCKETS,
    SUBSTATE_CONNECTION, TCP_CLOSE, TCP_LISTEN, TCP_SYN_SENT, counter,
};

use crate::{
    maps::{BPF_NOEXIST, CONNS, LAST_FOLLOW, LISTEN_PORTS, LISTENERS, TW_SOCKS, add, bump, config, count, read, roles, walk},
    sock::{cgroup_of, listen_key, netns_of, remote_of, watched},
};

#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn tw_sock_set_state(ctx: BtfTracePointContext) -> u32 {
    let _ = try_set_state(ctx.arg(0), ctx.arg(1), ctx.arg(2));
    0
}

#[inline(always)]
fn try_set_state(sk: u64, old: i32, new: i32) -> Result<(), i64> {
    let (listen, close) = (TCP_LISTEN as i32, TCP_CLOSE as i32);
    let syn_sent = TCP_SYN_SENT as i32;
    let roles = roles();
    let sockets = roles & ROLE_SOCKETS != 0;
    let mut active = None;
    if sockets && new == close {
        active = Some(closed(sk));
    }
    let for_sockets =
        sockets && (new == listen || old == listen || new == syn_sent || (old == syn_sent && new == close));
    let for_lifecycle = roles & ROLE_LIFECYCLE != 0 && crate::tracepoint::lifecycle::wanted(old, new);
    if !for_sockets && !for_lifecycle {
        return Ok(());
    }
    let cfg = config();
    let proto: u16 = read(sk, cfg.offsets.sk_protocol)?;
    if proto != IPPROTO_TCP {
        return Ok(());
    }
    let netns = netns_of(cfg, sk)?;
    if !watched(cfg, netns) {
        return Ok(());
    }
    if for_lifecycle {
        crate::tracepoint::lifecycle::state_changed(cfg, sk, netns, old, new, active);
    }
    if for_sockets {
        sockets_changed(cfg, sk, netns, ((old as u32 & 0xff) << 8) | (new as u32 & 0xff));
    }
    Ok(())
}

// The parts of the program are functions of their own (BPF-to-BPF calls,
// at most 5 arguments, nothing returned through memory): 5.10's verifier
// counts 512 bytes of stack for a program and the functions it calls
// together, and the program with everything inlined took more.

/// `sk` went to CLOSE: forgets it as an active open; whether it was one.
#[inline(never)]
fn closed(sk: u64) -> bool {
    let active = connection_closed(sk);
    direction_from_history(sk, active);
    active
}

/// A TCP socket of a watched namespace went `states` (`old << 8 | new`):
/// listeners, active opens, connect() failures.
#[inline(never)]
fn sockets_changed(cfg: &Config, sk: u64, netns: u32, states: u32) {
    let (old, new) = ((states >> 8) as i32, (states & 0xff) as i32);
    let (listen, syn_sent) = (TCP_LISTEN as i32, TCP_SYN_SENT as i32);
    if new == syn_sent {
        crate::connect::connect_started(sk);
        let _ = connection_added(cfg, sk, netns);
    } else if old == syn_sent {
        let _ = crate::connect::connect_ended(cfg, sk, netns);
    } else if new == listen {
        if let Ok(port) = read::<u16>(sk, cfg.offsets.skc_num) {
            listener_added(sk, listen_key(netns, port));
        }
    } else {
        listener_removed(sk);
    }
}

/// Forgets listener `sk`, if it was one.
#[inline(always)]
pub fn listener_removed(sk: u64) {
    // SAFETY: read-only copy of a u64.
    if let Some(key) = unsafe { LISTENERS.get(sk) }.copied()
        && LISTENERS.remove(sk).is_ok()
    {
        add(&LISTEN_PORTS, &key, -1);
    }
}

/// Records listener `sk` once (the snapshot and the tracepoint may both see it).
#[inline(always)]
pub fn listener_added(sk: u64, key: u64) {
    if LISTENERS.insert(sk, key, BPF_NOEXIST).is_ok() {
        add(&LISTEN_PORTS, &key, 1);
    }
}

/// Counts full socket `sk` as holding a local port toward its destination
/// (once: the snapshot and the tracepoint may both see it).
#[inline(always)]
pub fn connection_added(cfg: &Config, sk: u64, netns: u32) -> Result<bool, i64> {
    let h = crate::sock::head(cfg, sk)?;
    let key = AggKey {
        remote: crate::sock::remote_in(cfg, sk, &h)?,
        cgroup: cgroup_of(cfg, sk),
        netns,
        port: u16::from_be(h.dport),
        family: h.family,
        direction: DIRECTION_OUTBOUND,
        substate: SUBSTATE_CONNECTION,
        _pad: [0; 6],
    };
    // SAFETY: helper without preconditions.
    let created_ns = unsafe { bpf_ktime_get_ns() };
    let entry = ConnEntry { key, created_ns, seen: walk(), _pad: 0 };
    if let Err(e) = CONNS.insert(sk, entry, BPF_NOEXIST) {
        if !crate::maps::is_eexist(e.into()) {
            bump(counter::LOST);
        }
        return Ok(false);
    }
    if !count(&key, 1) {
        let _ = CONNS.remove(sk);
        return Ok(false);
    }
    Ok(true)
}

/// Stops counting full socket `sk` (it went to CLOSE). Returns whether it
/// was an active open we followed.
#[inline(always)]
pub fn connection_closed(sk: u64) -> bool {
    // SAFETY: read-only copy of the entry; removal is the claim.
    let Some(entry) = (unsafe { CONNS.get(sk) }).copied() else {
        return false;
    };
    if CONNS.remove(sk).is_err() {
        return false;
    }
    if !count(&entry.key, -1) {
        // As in `tw::close`: kept, counted, until the reconciliation removes it.
        let _ = CONNS.insert(sk, entry, BPF_NOEXIST);
    }
    true
}

/// The full socket `sk` that went to CLOSE may be the one the minisocket
/// followed last on this CPU came from (`tcp_time_wait`: the minisocket is
/// scheduled, then `tcp_done` closes the socket; no other socket changes
/// state in between on this CPU). If its 4-tuple matches, the minisocket's
/// direction is the connection's own: outbound when we opened it (`active`),
/// inbound when a listener accepted it, whatever the listener table said at
/// the moment (a server that stopped, or an active open from a port that
/// also listens). The slot is cleared either way: only the next CLOSE can
/// be that socket's.
#[inline(always)]
pub fn direction_from_history(sk: u64, active: bool) {
    let Some(slot) = LAST_FOLLOW.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: this CPU's slot; tracing programs do not migrate.
    let slot = unsafe { &mut *slot };
    if slot.timer == 0 {
        return;
    }
    let timer = slot.timer;
    slot.timer = 0;
    let cfg = config();
    // Not the local port: by this tracepoint `tcp_set_state` has already
    // released the socket's bind bucket (`inet_put_port` zeroes
    // `inet_num`). The remote address and port, on this CPU right after the
    // follow, are the socket's.
    let (Ok(rport_be), Ok(family)) =
        (read::<u16>(sk, cfg.offsets.skc_dport), read::<u16>(sk, cfg.offsets.skc_family))
    else {
        return;
    };
    if rport_be != slot.rport || remote_of(&cfg, sk, family).ok() != Some(slot.remote) {
        return;
    }
    let lport = slot.lport;
    let Some(e) = TW_SOCKS.get_ptr_mut(timer) else {
        return;
    };
    // SAFETY: the entry of the minisocket just created from `sk`; nothing
    // else writes its key now (its first segment is yet to come).
    let entry = unsafe { &mut *e };
    let (direction, port) =
        if active { (DIRECTION_OUTBOUND, u16::from_be(rport_be)) } else { (DIRECTION_INBOUND, lport) };
    // The owner: the minisocket has none, the socket it came from still has.
    let cgroup = cgroup_of(&cfg, sk);
    let turned = entry.key.direction != direction || entry.key.port != port;
    if turned || entry.key.cgroup != cgroup {
        let mut key = entry.key;
        key.direction = direction;
        key.port = port;
        key.cgroup = cgroup;
        crate::tw::move_to(entry, key);
    }
    if turned {
        bump(counter::DIRECTION_FROM_HISTORY);
        // Created a moment ago on this CPU, counted under the other direction.
        let (was, is) = if active {
            (counter::CREATED_INBOUND, counter::CREATED_OUTBOUND)
        } else {
            (counter::CREATED_OUTBOUND, counter::CREATED_INBOUND)
        };
        crate::maps::unbump(was);
        bump(is);
    }
}
