//! Full sockets on the fentry path: instead of `inet_sock_set_state` (every
//! state change of every socket of the system) and the `connect()` syscall
//! tracepoints (every connect of every protocol), the few functions where
//! what we count changes. About one run per connection end.
//!
//! | function (5.10 -> 6.18) | gives |
//! | --- | --- |
//! | `inet_hash(sk)`, `inet6_hash(sk)` entry | a listener (TCP's `->hash`, called by `inet_csk_listen_start` once the socket is LISTEN with its port) |
//! | `inet_csk_listen_stop(sk)` entry | a listener gone |
//! | `inet_hash_connect(death_row, sk)`, `inet6_hash_connect` entry and exit | an active open choosing its port: on entry its destination is set (so a minisocket killed inside is a `tcp_tw_reuse` takeover), on exit 0 it holds a port toward it, -EADDRNOTAVAIL is port exhaustion |
//! | `inet_put_port(sk)` entry | a full socket releasing its port (`tcp_set_state(CLOSE)`, or destroy for a bound one); its local port is still set here |

use aya_ebpf::{
    helpers::{bpf_get_current_comm, bpf_get_current_pid_tgid},
    macros::{fentry, fexit},
    programs::{FEntryContext, FExitContext},
};
use timewait_common::{ConnectDst, EADDRNOTAVAIL, ErrKey, IPPROTO_TCP, TCP_LISTEN};

use crate::{
    listen::{connection_added, connection_closed, direction_from_history, listener_added, listener_removed},
    maps::{CONNECT_ERRORS, CONNECTING_SK, add, config, read},
    sock::{listen_key, netns_of, watched},
};

#[fentry(function = "inet_hash")]
pub fn fentry_inet_hash(ctx: FEntryContext) -> u32 {
    let _ = on_hash(ctx.arg(0));
    0
}

#[fentry(function = "inet6_hash")]
pub fn fentry_inet6_hash(ctx: FEntryContext) -> u32 {
    let _ = on_hash(ctx.arg(0));
    0
}

#[inline(always)]
fn on_hash(sk: u64) -> Result<(), i64> {
    let cfg = config();
    if read::<u8>(sk, cfg.offsets.skc_state)? != TCP_LISTEN || read::<u16>(sk, cfg.offsets.sk_protocol)? != IPPROTO_TCP {
        return Ok(());
    }
    let netns = netns_of(&cfg, sk)?;
    if !watched(&cfg, netns) {
        return Ok(());
    }
    let port: u16 = read(sk, cfg.offsets.skc_num)?;
    listener_added(sk, listen_key(netns, port));
    Ok(())
}

#[fentry(function = "inet_csk_listen_stop")]
pub fn fentry_listen_stop(ctx: FEntryContext) -> u32 {
    listener_removed(ctx.arg(0));
    0
}

#[fentry(function = "inet_hash_connect")]
pub fn fentry_hash_connect(ctx: FEntryContext) -> u32 {
    connect_enter(ctx.arg(1));
    0
}

#[fentry(function = "inet6_hash_connect")]
pub fn fentry_hash6_connect(ctx: FEntryContext) -> u32 {
    connect_enter(ctx.arg(1));
    0
}

#[fexit(function = "inet_hash_connect")]
pub fn fexit_hash_connect(ctx: FExitContext) -> u32 {
    let _ = connect_exit(ctx.arg(1), ctx.arg::<i64>(2) as i32);
    0
}

#[fexit(function = "inet6_hash_connect")]
pub fn fexit_hash6_connect(ctx: FExitContext) -> u32 {
    let _ = connect_exit(ctx.arg(1), ctx.arg::<i64>(2) as i32);
    0
}

/// Remembers the socket whose port is being chosen on this CPU, by whom: a
/// minisocket killed meanwhile toward its destination was taken over.
#[inline(always)]
fn connect_enter(sk: u64) {
    if let Some(slot) = CONNECTING_SK.get_ptr_mut(0) {
        // SAFETY: this CPU's slot; tracing programs do not migrate.
        unsafe { *slot = ConnectDst { pid_tgid: bpf_get_current_pid_tgid(), uaddr: sk } };
    }
}

#[inline(always)]
fn connect_exit(sk: u64, ret: i32) -> Result<(), i64> {
    if let Some(slot) = CONNECTING_SK.get_ptr_mut(0) {
        // SAFETY: as above.
        unsafe {
            if (*slot).uaddr == sk {
                (*slot).pid_tgid = 0;
            }
        }
    }
    let cfg = config();
    let netns = netns_of(&cfg, sk)?;
    if !watched(&cfg, netns) {
        return Ok(());
    }
    if ret == 0 {
        connection_added(&cfg, sk, netns)?;
    } else if ret == -(EADDRNOTAVAIL as i32) {
        let comm = bpf_get_current_comm().map_err(i64::from)?;
        add(&CONNECT_ERRORS, &ErrKey { comm, errno: EADDRNOTAVAIL, netns }, 1);
    }
    Ok(())
}

#[fentry(function = "inet_put_port")]
pub fn fentry_put_port(ctx: FEntryContext) -> u32 {
    let sk: u64 = ctx.arg(0);
    let active = connection_closed(sk);
    direction_from_history(sk, active);
    0
}
