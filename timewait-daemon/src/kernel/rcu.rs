//! Waiting, from userspace, until every eBPF program that was running has returned: an RCU grace period.
//!
//! Tracing programs (fentry, kprobe, tracepoints, iterators) run inside an
//! RCU read-side section. The kernel offers no syscall that only waits for a
//! grace period, but an update of a map-in-map does: `BPF_MAP_UPDATE_ELEM` on
//! a `BPF_MAP_TYPE_ARRAY_OF_MAPS` calls `synchronize_rcu()` before returning
//! (`maybe_wait_bpf_programs`, kernel/bpf/syscall.c, since 4.19), so that
//! userspace knows no program still uses the old inner map. We keep a tiny
//! outer map of our own and update it: no program uses it; the wait is what
//! we want. aya 0.14 has no map-in-map support, hence the raw syscalls.

use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};

use aya_obj::generated::{bpf_cmd, bpf_map_type};

/// `union bpf_attr` for BPF_MAP_CREATE (the fields up to `inner_map_fd`).
#[repr(C)]
struct CreateAttr {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
    inner_map_fd: u32,
    _rest: [u8; 128 - 24],
}

/// `union bpf_attr` for BPF_MAP_UPDATE_ELEM.
#[repr(C)]
struct UpdateAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
    _rest: [u8; 128 - 32],
}

fn bpf<T>(cmd: bpf_cmd, attr: &mut T) -> std::io::Result<i64> {
    // SAFETY: attr is a zero-padded `union bpf_attr` prefix for `cmd`, valid
    // for the duration of the call; the kernel reads at most its size.
    let rc = unsafe {
        libc::syscall(libc::SYS_bpf, cmd as libc::c_long, std::ptr::from_mut(attr), size_of::<T>() as libc::c_uint)
    };
    if rc < 0 { Err(std::io::Error::last_os_error()) } else { Ok(rc) }
}

fn create(map_type: bpf_map_type, inner: Option<&OwnedFd>) -> std::io::Result<OwnedFd> {
    let mut attr = CreateAttr {
        map_type: map_type as u32,
        key_size: 4,
        value_size: 4,
        max_entries: 1,
        map_flags: 0,
        inner_map_fd: inner.map_or(0, |f| f.as_raw_fd() as u32),
        _rest: [0; 128 - 24],
    };
    let fd = bpf(bpf_cmd::BPF_MAP_CREATE, &mut attr)?;
    // SAFETY: BPF_MAP_CREATE returned a new file descriptor we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// An outer map and its one inner map, updated to wait for a grace period.
pub struct GracePeriod {
    outer: OwnedFd,
    inner: OwnedFd,
}

impl GracePeriod {
    pub fn new() -> std::io::Result<Self> {
        let inner = create(bpf_map_type::BPF_MAP_TYPE_ARRAY, None)?;
        let outer = create(bpf_map_type::BPF_MAP_TYPE_ARRAY_OF_MAPS, Some(&inner))?;
        Ok(Self { outer, inner })
    }

    /// Returns once every eBPF program running when it was called has
    /// returned (typically a few milliseconds; it sleeps, it does not spin).
    pub fn wait(&self) -> std::io::Result<()> {
        let key: u32 = 0;
        let value: u32 = self.inner.as_raw_fd() as u32;
        let mut attr = UpdateAttr {
            map_fd: self.outer.as_raw_fd() as u32,
            _pad: 0,
            key: (&raw const key) as u64,
            value: (&raw const value) as u64,
            flags: 0,
            _rest: [0; 128 - 32],
        };
        bpf(bpf_cmd::BPF_MAP_UPDATE_ELEM, &mut attr).map(|_| ())
    }
}
