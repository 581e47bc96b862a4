//! `connect()` in progress, so a minisocket cancelled inside it toward the
//! same destination is known to be taken over by `tcp_tw_reuse`
//! (`__inet_check_established`, net/ipv4/inet_hashtables.c).
//! Classic tracepoints `syscalls/sys_enter_connect(fd, uservaddr, addrlen)` and
//! `syscalls/sys_exit_connect(ret)`; their field offsets are the stable
//! syscall tracepoint layout (8 bytes of common fields, the syscall number,
//! then 8-byte arguments).

use aya_ebpf::{
    helpers::{bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_task, bpf_probe_read_user},
    macros::tracepoint,
    programs::TracePointContext,
};
use timewait_common::{AF_INET, AF_INET6, Config, ConnectDst, EADDRINUSE, EADDRNOTAVAIL, ErrKey};

use crate::{
    maps::{CONNECT_ERRORS, CONNECTING, add, config, read},
    sock::{current_cgroup, watched},
};

const ARG1: usize = 24;
/// `ret` of a `sys_exit_*` record.
const RET: usize = 16;

#[tracepoint(category = "syscalls", name = "sys_enter_connect")]
pub fn tw_enter_connect(ctx: TracePointContext) -> u32 {
    let _ = try_enter(&ctx);
    0
}

#[inline(always)]
fn try_enter(ctx: &TracePointContext) -> Result<(), i64> {
    // SAFETY: reads a field of the tracepoint record at a fixed offset.
    let uaddr: u64 = unsafe { ctx.read_at(ARG1) }.map_err(i64::from)?;
    // Only who and where: the destination itself is read by the rare cancel
    // that happens inside this connect() (timer::connect_hint).
    if let Some(slot) = CONNECTING.get_ptr_mut(0) {
        // SAFETY: this CPU's slot; tracing programs do not migrate.
        unsafe { *slot = ConnectDst { pid_tgid: bpf_get_current_pid_tgid(), uaddr } };
    }
    Ok(())
}

/// The destination (family, raw port, address) of the connect() in progress
/// on this CPU, if the current task is the one that called it.
#[inline(always)]
pub fn connecting_to() -> Option<(u16, u16, [u8; 16])> {
    let slot = CONNECTING.get(0)?;
    if slot.pid_tgid == 0 || slot.pid_tgid != bpf_get_current_pid_tgid() {
        return None;
    }
    // sockaddr_in / sockaddr_in6: family, port, then the IPv4 address at 4 or
    // the IPv6 one at 8. The cancel runs in the caller's context (or a
    // softirq on its stack), so its memory is the current one.
    // SAFETY: bpf_probe_read_user copes with any user address.
    let raw: [u8; 24] = unsafe { bpf_probe_read_user(slot.uaddr as *const [u8; 24]) }.ok()?;
    let family = u16::from_ne_bytes([raw[0], raw[1]]);
    let mut addr = [0u8; 16];
    if family == AF_INET {
        addr[..4].copy_from_slice(&raw[4..8]);
    } else if family == AF_INET6 {
        addr.copy_from_slice(&raw[8..24]);
    } else {
        return None;
    }
    Some((family, u16::from_ne_bytes([raw[2], raw[3]]), addr))
}

#[tracepoint(category = "syscalls", name = "sys_exit_connect")]
pub fn tw_exit_connect(ctx: TracePointContext) -> u32 {
    // The destination, for attribution, while the slot still says it.
    let dest = if config().cgroups != 0 { connecting_to() } else { None };
    if let Some(slot) = CONNECTING.get_ptr_mut(0) {
        // SAFETY: this CPU's slot; tracing programs do not migrate.
        unsafe {
            if (*slot).pid_tgid == bpf_get_current_pid_tgid() {
                (*slot).pid_tgid = 0;
            }
        }
    }
    let _ = count_error(&ctx, EADDRNOTAVAIL, dest);
    0
}

#[tracepoint(category = "syscalls", name = "sys_exit_bind")]
pub fn tw_exit_bind(ctx: TracePointContext) -> u32 {
    let _ = count_error(&ctx, EADDRINUSE, None);
    0
}

/// Counts the syscall by process name when it failed with `errno`.
#[inline(always)]
fn count_error(ctx: &TracePointContext, errno: u32, dest: Option<(u16, u16, [u8; 16])>) -> Result<(), i64> {
    // SAFETY: reads a field of the tracepoint record at a fixed offset.
    let ret: i64 = unsafe { ctx.read_at(RET) }.map_err(i64::from)?;
    count_failed(ret, errno, dest)
}

/// The key of a failed call by the current task: its name, and with
/// attribution on its cgroup and the destination (family, raw port,
/// address) when there is one.
#[inline(always)]
pub fn err_key(cfg: &Config, errno: u32, netns: u32, dest: Option<(u16, u16, [u8; 16])>) -> Result<ErrKey, i64> {
    let comm = bpf_get_current_comm().map_err(i64::from)?;
    let mut key = ErrKey { comm, errno, netns, cgroup: current_cgroup(cfg), ..ErrKey::default() };
    if cfg.cgroups != 0
        && let Some((family, port_be, remote)) = dest
    {
        (key.family, key.port, key.remote) = (family, u16::from_be(port_be), remote);
    }
    Ok(key)
}

/// Counts a call that returned `ret` by process name when it failed with
/// `errno`. The namespace is the calling task's (syscall exits and the
/// fexit of `inet_bind` run in its context).
#[inline(always)]
pub fn count_failed(ret: i64, errno: u32, dest: Option<(u16, u16, [u8; 16])>) -> Result<(), i64> {
    if ret != -(errno as i64) {
        return Ok(());
    }
    let cfg = config();
    // SAFETY: helper without preconditions; the pointer is only read through
    // bpf_probe_read_kernel.
    let task = unsafe { bpf_get_current_task() };
    let nsproxy: u64 = read(task, cfg.offsets.task_nsproxy)?;
    let net: u64 = read(nsproxy, cfg.offsets.nsproxy_net_ns)?;
    let netns: u32 = read(net, cfg.offsets.net_inum)?;
    if !watched(&cfg, netns) {
        return Ok(());
    }
    add(&CONNECT_ERRORS, &err_key(&cfg, errno, netns, dest)?, 1);
    Ok(())
}
