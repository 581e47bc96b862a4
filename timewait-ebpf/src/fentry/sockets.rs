//! Full sockets on the fentry path: instead of `inet_sock_set_state` (every
//! state change of every socket of the system) and the `connect()`/`bind()`
//! syscall tracepoints (enabling any syscall tracepoint sends every system
//! call of every task through the slow exit path), the few functions where
//! what we count changes: one run per connection end, two for the end that
//! connects.
//!
//! | function (5.10 -> 6.18) | gives |
//! | --- | --- |
//! | `inet_hash(sk)`, `inet6_hash(sk)` entry | a listener (TCP's `->hash`, called by `inet_csk_listen_start` once the socket is LISTEN with its port) |
//! | `inet_csk_listen_stop(sk)` entry | a listener gone |
//! | `inet_hash_connect(death_row, sk)`, `inet6_hash_connect` exit | an active open chose its port: 0, it holds one toward its destination (and a minisocket killed inside with that 4-tuple was a `tcp_tw_reuse` takeover); -EADDRNOTAVAIL, port exhaustion |
//! | `inet_bind(sock, uaddr, len)`, `inet6_bind` exit | `bind()` of an IPv4/IPv6 socket; -EADDRINUSE of a TCP one counted by process name |
//! | `inet_put_port(sk)` entry | a full socket releasing its port (`tcp_set_state(CLOSE)`, or destroy for a bound one); its local port is still set here |

use aya_ebpf::{
    helpers::bpf_get_current_pid_tgid,
    macros::{fentry, fexit},
    programs::{FEntryContext, FExitContext},
};
use timewait_common::{Config, EADDRINUSE, EADDRNOTAVAIL, IPPROTO_TCP, TCP_LISTEN, counter};

use crate::{
    connect::{count_failed, is_tcp_socket},
    listen::{connection_added, connection_closed, direction_from_history, listener_added, listener_removed},
    maps::{LAST_KILL, bump, config, observe_lifetime, read, unbump, unobserve_lifetime},
    sock::{listen_key, netns_of, remote_of, watched},
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

/// An active open got its port (0) or found none (-EADDRNOTAVAIL). A
/// minisocket killed as `other` just before in this task with this socket's
/// 4-tuple was a `tcp_tw_reuse` takeover (`__inet_hash_connect` kills it
/// before it returns): its close moves to `reused_by_connect`.
#[inline(always)]
fn connect_exit(sk: u64, ret: i32) -> Result<(), i64> {
    let cfg = config();
    if ret == 0 {
        takeover(&cfg, sk);
    }
    let netns = netns_of(&cfg, sk)?;
    if !watched(&cfg, netns) {
        return Ok(());
    }
    if ret == 0 {
        connection_added(&cfg, sk, netns)?;
    } else if ret == -(EADDRNOTAVAIL as i32) {
        crate::connect::count_no_port(&cfg, sk, netns)?;
    }
    Ok(())
}

/// Moves the last kill of this CPU from `other` to `reused_by_connect` when
/// this task made it and `sk` took its 4-tuple; forgets it either way.
#[inline(always)]
fn takeover(cfg: &Config, sk: u64) {
    let Some(slot) = LAST_KILL.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: this CPU's slot; tracing programs do not migrate.
    let kill = unsafe { &mut *slot };
    if kill.pid_tgid == 0 || kill.pid_tgid != bpf_get_current_pid_tgid() {
        return;
    }
    kill.pid_tgid = 0;
    if same_tuple(cfg, sk, kill) != Ok(true) {
        return;
    }
    unbump(counter::CLOSED_OTHER);
    bump(counter::CLOSED_REUSED_BY_CONNECT);
    if kill.lifetime_ns != u64::MAX {
        unobserve_lifetime(counter::CLOSED_OTHER, kill.lifetime_ns);
        observe_lifetime(counter::CLOSED_REUSED_BY_CONNECT, kill.lifetime_ns);
    }
}

/// Whether `sk` has the 4-tuple of the minisocket `kill` was. A function, not
/// a closure: LLVM may outline a closure into a BPF-to-BPF call, and 5.10's
/// verifier caps the stack of a program and its calls at 512 bytes together.
#[inline(always)]
fn same_tuple(cfg: &Config, sk: u64, kill: &timewait_common::LastKill) -> Result<bool, i64> {
    let family: u16 = read(sk, cfg.offsets.skc_family)?;
    let lport: u16 = read(sk, cfg.offsets.skc_num)?;
    let rport: u16 = read(sk, cfg.offsets.skc_dport)?;
    Ok(family == kill.family && lport == kill.lport && rport == kill.rport && remote_of(cfg, sk, family)? == kill.remote)
}

#[fexit(function = "inet_bind")]
pub fn fexit_inet_bind(ctx: FExitContext) -> u32 {
    let _ = bind_exit(ctx.arg(0), ctx.arg::<i64>(3) as i32);
    0
}

#[fexit(function = "inet6_bind")]
pub fn fexit_inet6_bind(ctx: FExitContext) -> u32 {
    let _ = bind_exit(ctx.arg(0), ctx.arg::<i64>(3) as i32);
    0
}

/// `inet_bind(sock, ...)` returned `ret`: -EADDRINUSE of a TCP socket is
/// counted (UDP and raw sockets bind through the same function).
#[inline(always)]
fn bind_exit(sock: u64, ret: i32) -> Result<(), i64> {
    if ret != -(EADDRINUSE as i32) || !is_tcp_socket(config(), sock)? {
        return Ok(());
    }
    count_failed(i64::from(ret), EADDRINUSE, None)
}

#[fentry(function = "inet_put_port")]
pub fn fentry_put_port(ctx: FEntryContext) -> u32 {
    let sk: u64 = ctx.arg(0);
    let active = connection_closed(sk);
    direction_from_history(sk, active);
    0
}
