//! Listening ports, so each minisocket gets its direction:
//! `inet_sock_set_state(const struct sock *, const int oldstate, const int newstate)`.

use aya_ebpf::{macros::btf_tracepoint, programs::BtfTracePointContext};
use timewait_common::{IPPROTO_TCP, TCP_LISTEN};

use crate::{
    maps::{BPF_NOEXIST, LISTEN_PORTS, LISTENERS, add, config, read},
    sock::{listen_key, netns_of, watched},
};

#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn tw_sock_set_state(ctx: BtfTracePointContext) -> u32 {
    let _ = try_set_state(ctx.arg(0), ctx.arg(1), ctx.arg(2));
    0
}

#[inline(always)]
fn try_set_state(sk: u64, old: i32, new: i32) -> Result<(), i64> {
    if new != TCP_LISTEN as i32 && old != TCP_LISTEN as i32 {
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
    if new == TCP_LISTEN as i32 {
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
