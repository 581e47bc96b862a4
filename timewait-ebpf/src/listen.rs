//! Full sockets: `inet_sock_set_state(const struct sock *, const int
//! oldstate, const int newstate)`.
//! - listening ports, so each minisocket gets its direction;
//! - active opens (CLOSE -> SYN_SENT in `tcp_v4_connect`/`tcp_v6_connect`,
//!   after the destination is set) until CLOSE: the local ports held toward
//!   each destination. A socket that turns into a minisocket goes to CLOSE
//!   right after the minisocket is created, which then holds the port.

use aya_ebpf::{macros::btf_tracepoint, programs::BtfTracePointContext};
use timewait_common::{
    AggKey, Config, DIRECTION_OUTBOUND, IPPROTO_TCP, SUBSTATE_CONNECTION, TCP_CLOSE, TCP_LISTEN,
    TCP_SYN_SENT,
};

use crate::{
    maps::{BPF_NOEXIST, CONNS, COUNTS, LISTEN_PORTS, LISTENERS, add, config, read},
    sock::{listen_key, netns_of, remote_of, watched},
};

#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn tw_sock_set_state(ctx: BtfTracePointContext) -> u32 {
    let _ = try_set_state(ctx.arg(0), ctx.arg(1), ctx.arg(2));
    0
}

#[inline(always)]
fn try_set_state(sk: u64, old: i32, new: i32) -> Result<(), i64> {
    let (listen, close) = (TCP_LISTEN as i32, TCP_CLOSE as i32);
    if new == close {
        connection_closed(sk);
    }
    if new != listen && old != listen && new != TCP_SYN_SENT as i32 {
        return Ok(());
    }
    let cfg = config();
    let proto: u16 = read(sk, cfg.offsets.sk_protocol)?;
    if proto != IPPROTO_TCP {
        return Ok(());
    }
    let netns = netns_of(&cfg, sk)?;
    if !watched(&cfg, netns) {
        return Ok(());
    }
    if new == TCP_SYN_SENT as i32 {
        connection_added(&cfg, sk, netns)?;
    } else if new == listen {
        let port: u16 = read(sk, cfg.offsets.skc_num)?;
        listener_added(sk, listen_key(netns, port));
    } else {
        // SAFETY: read-only copy of a u64.
        if let Some(key) = unsafe { LISTENERS.get(sk) }.copied()
            && LISTENERS.remove(sk).is_ok()
        {
            add(&LISTEN_PORTS, &key, -1);
        }
    }
    Ok(())
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
    let family: u16 = read(sk, cfg.offsets.skc_family)?;
    let key = AggKey {
        remote: remote_of(cfg, sk, family)?,
        netns,
        port: u16::from_be(read::<u16>(sk, cfg.offsets.skc_dport)?),
        family,
        direction: DIRECTION_OUTBOUND,
        substate: SUBSTATE_CONNECTION,
        _pad: [0; 6],
    };
    if CONNS.insert(sk, key, BPF_NOEXIST).is_err() {
        return Ok(false);
    }
    if !add(&COUNTS, &key, 1) {
        let _ = CONNS.remove(sk);
        return Ok(false);
    }
    Ok(true)
}

/// Undoes `connection_added` for a socket the snapshot saw closing.
#[inline(always)]
pub fn connection_closed(sk: u64) {
    // SAFETY: read-only copy of the key.
    if let Some(key) = unsafe { CONNS.get(sk) }.copied()
        && CONNS.remove(sk).is_ok()
    {
        add(&COUNTS, &key, -1);
    }
}
