//! Active opens on the tracepoint path, told by `inet_sock_set_state` (no
//! syscall tracepoint: enabling any of them sends every system call of every
//! task through the slow path, 50 ns a call here: bench scenario 8):
//! - CLOSE -> SYN_SENT (`tcp_v4_connect`/`tcp_v6_connect`, in the caller's
//!   context, destination set, before `inet_hash_connect`) notes the socket
//!   and the task in `CONNECTING`, so that a kprobe/fentry lifecycle killing
//!   a minisocket inside that `inet_hash_connect` with the socket's 4-tuple
//!   knows it taken over by `tcp_tw_reuse` (`__inet_check_established`,
//!   net/ipv4/inet_hashtables.c); the tracepoint lifecycle has `TW_INDEX`;
//! - SYN_SENT -> CLOSE with no segment sent (`tcp_sock.segs_out` 0) is a
//!   `connect()` that failed before its SYN: `inet_hash_connect` found no
//!   free port (-EADDRNOTAVAIL), the one such failure that is not a
//!   memory or routing error. A SYN that left and was refused or timed out
//!   counts a segment; `tcp_disconnect` zeroes the count for a reused socket.
//! `bind()` errors have no such state change: `syscalls/sys_enter_bind` and
//! `sys_exit_bind`, only with `--syscall-tracepoints` (the exit has only the
//! return value: the enter notes the descriptor, whose socket the exit reads
//! to count TCP's alone); the fentry path has `inet_bind`'s exit.

use aya_ebpf::{
    helpers::{bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_task},
    macros::tracepoint,
    programs::TracePointContext,
};
use timewait_common::{Config, ConnectDst, EADDRINUSE, EADDRNOTAVAIL, ErrKey, IPPROTO_TCP, SOCK_STREAM, TCP_SYN_SENT};

use crate::{
    maps::{BINDING, BPF_ANY, CONNECTING, config, count_error, read},
    sock::{current_cgroup, remote_of, watched},
};

/// `ret` of a `sys_exit_*` record.
const RET: usize = 16;

/// CLOSE -> SYN_SENT of `sk` by the current task: the active open in progress
/// on this CPU.
#[inline(always)]
pub fn connect_started(sk: u64) {
    if let Some(slot) = CONNECTING.get_ptr_mut(0) {
        // SAFETY: this CPU's slot; tracing programs do not migrate.
        unsafe { *slot = ConnectDst { pid_tgid: bpf_get_current_pid_tgid(), sk } };
    }
}

/// The active open of the current task on this CPU, while its socket is
/// still in SYN_SENT: (family, raw remote port, remote address, local port).
/// Inside `inet_hash_connect` the local port is the one just chosen.
#[inline(always)]
pub fn connecting_to() -> Option<(u16, u16, [u8; 16], u16)> {
    let slot = CONNECTING.get(0)?;
    if slot.pid_tgid == 0 || slot.pid_tgid != bpf_get_current_pid_tgid() {
        return None;
    }
    let cfg = config();
    let sk = slot.sk;
    if read::<u8>(sk, cfg.offsets.skc_state).ok()? != TCP_SYN_SENT {
        return None;
    }
    let family: u16 = read(sk, cfg.offsets.skc_family).ok()?;
    let rport: u16 = read(sk, cfg.offsets.skc_dport).ok()?;
    let lport: u16 = read(sk, cfg.offsets.skc_num).ok()?;
    Some((family, rport, remote_of(&cfg, sk, family).ok()?, lport))
}

/// SYN_SENT -> CLOSE of `sk` (TCP, in a watched namespace): counts the
/// connect() that failed before its SYN left as port exhaustion, by the
/// calling task's name (this runs in its context).
#[inline(always)]
pub fn connect_ended(cfg: &Config, sk: u64, netns: u32) -> Result<(), i64> {
    if let Some(slot) = CONNECTING.get_ptr_mut(0) {
        // SAFETY: this CPU's slot; tracing programs do not migrate.
        unsafe {
            if (*slot).sk == sk {
                (*slot).pid_tgid = 0;
            }
        }
    }
    if read::<u32>(sk, cfg.offsets.tcp_segs_out)? != 0 {
        return Ok(());
    }
    count_no_port(cfg, sk, netns)
}

/// Counts the connect() of `sk` that found no local port (EADDRNOTAVAIL),
/// by the calling task's name; with attribution, with its destination.
#[inline(always)]
pub fn count_no_port(cfg: &Config, sk: u64, netns: u32) -> Result<(), i64> {
    let dest = if cfg.cgroups != 0 {
        let family: u16 = read(sk, cfg.offsets.skc_family)?;
        Some((family, read::<u16>(sk, cfg.offsets.skc_dport)?, remote_of(cfg, sk, family)?))
    } else {
        None
    };
    count_error(&mut err_key(cfg, EADDRNOTAVAIL, netns, dest)?);
    Ok(())
}

/// `fd` of a `sys_enter_*` record whose first argument is a file descriptor.
const FD: usize = 16;

/// bind() starting (`--syscall-tracepoints` only): notes the descriptor, for
/// the exit to find its socket. One hash update per bind() of the system.
#[tracepoint(category = "syscalls", name = "sys_enter_bind")]
pub fn tw_enter_bind(ctx: TracePointContext) -> u32 {
    // SAFETY: reads a field of the tracepoint record at a fixed offset.
    if let Ok(fd) = unsafe { ctx.read_at::<u64>(FD) } {
        let _ = BINDING.insert(&bpf_get_current_pid_tgid(), &fd, BPF_ANY);
    }
    0
}

#[tracepoint(category = "syscalls", name = "sys_exit_bind")]
pub fn tw_exit_bind(ctx: TracePointContext) -> u32 {
    let _ = exit_bind(&ctx);
    0
}

/// Counts the bind() that failed with EADDRINUSE when its socket is TCP: the
/// exit record has only the return value, so the socket is found from the
/// descriptor `sys_enter_bind` noted, through the task's file table.
#[inline(always)]
fn exit_bind(ctx: &TracePointContext) -> Result<(), i64> {
    let id = bpf_get_current_pid_tgid();
    // SAFETY: the value is copied out before the entry is removed.
    let fd = unsafe { BINDING.get(&id) }.copied();
    let _ = BINDING.remove(&id);
    // SAFETY: reads a field of the tracepoint record at a fixed offset.
    let ret: i64 = unsafe { ctx.read_at(RET) }.map_err(i64::from)?;
    if ret != -(EADDRINUSE as i64) {
        return Ok(());
    }
    // Attached after the entry program: a bind() already inside then has none.
    let Some(fd) = fd else { return Ok(()) };
    let cfg = config();
    // SAFETY: helper without preconditions; the pointer is only read through
    // bpf_probe_read_kernel.
    let task = unsafe { bpf_get_current_task() };
    if !is_tcp_socket(&cfg, socket_of_fd(&cfg, task, fd)?)? {
        return Ok(());
    }
    count_failed(ret, EADDRINUSE, None)
}

/// The `struct socket *` behind descriptor `fd` of `task`:
/// `task->files->fdt->fd[fd]->private_data` (fs/file.c `files_lookup_fd_raw`;
/// bind() returned EADDRINUSE, so `sockfd_lookup` found a socket file there).
#[inline(always)]
fn socket_of_fd(cfg: &Config, task: u64, fd: u64) -> Result<u64, i64> {
    let files: u64 = read(task, cfg.offsets.task_files)?;
    let fdt: u64 = read(files, cfg.offsets.files_fdt)?;
    let max: u32 = read(fdt, cfg.offsets.fdtable_max_fds)?;
    if fd >= u64::from(max) {
        return Err(0);
    }
    let fds: u64 = read(fdt, cfg.offsets.fdtable_fd)?;
    let file: u64 = read(fds + fd * 8, 0)?;
    if file == 0 {
        return Err(0);
    }
    read(file, cfg.offsets.file_private_data)
}

/// Whether `sock` (a `struct socket *`) is a TCP socket: `SOCK_STREAM` of
/// protocol `IPPROTO_TCP` (not UDP, raw, SCTP or MPTCP), so that a failed
/// bind() of a UDP or raw socket, which any user can make under any name,
/// is not counted as TCP port exhaustion.
#[inline(always)]
pub fn is_tcp_socket(cfg: &Config, sock: u64) -> Result<bool, i64> {
    if read::<u16>(sock, cfg.offsets.socket_type)? != SOCK_STREAM {
        return Ok(false);
    }
    let sk: u64 = read(sock, cfg.offsets.socket_sk)?;
    Ok(sk != 0 && read::<u16>(sk, cfg.offsets.sk_protocol)? == IPPROTO_TCP)
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
/// fexit of `inet_bind` run in its context). The caller has checked the
/// socket is TCP's.
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
    count_error(&mut err_key(&cfg, errno, netns, dest)?);
    Ok(())
}
