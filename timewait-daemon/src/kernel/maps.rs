//! Reading the programs' maps whole: batched where the kernel can, else entry by entry.
//!
//! A whole BPF hash map in a few syscalls (`BPF_MAP_LOOKUP_BATCH`,
//! Linux 5.6+) instead of two per entry (get-next-key + lookup, which is what
//! aya's iterator does and what dominated a scrape's cost). aya 0.14 has no
//! wrapper for it.

use std::{
    os::fd::{AsFd as _, AsRawFd as _},
    sync::atomic::{AtomicU64, Ordering},
};

use aya::{Pod, maps::MapData};

/// Entries per syscall.
const CHUNK: usize = 4096;

#[repr(C)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// `union bpf_attr` is at least this large; the rest must be zero.
#[repr(C)]
struct Attr {
    batch: BatchAttr,
    _rest: [u8; 128 - size_of::<BatchAttr>()],
}

/// Every (key, value) of hash map `map` (not per-CPU). A map being updated
/// meanwhile is read as a hash walk is: each entry at most once.
pub fn lookup_all<K: Pod, V: Pod>(map: &MapData) -> std::io::Result<Vec<(K, V)>> {
    let mut out = Vec::new();
    for_each(map, |k: &K, v: &V| out.push((*k, *v)))?;
    Ok(out)
}

/// Calls `f` for every (key, value) of hash map `map`, CHUNK entries per
/// syscall, so that a table of a million entries is never held whole (the
/// reconciliation walks read the per-socket tables this way). On an error
/// after some chunks, `f` has seen those.
pub fn for_each<K: Pod, V: Pod>(map: &MapData, mut f: impl FnMut(&K, &V)) -> std::io::Result<()> {
    // SAFETY: Pod types are plain old data; all-zero is a valid value.
    let (zk, zv): (K, V) = unsafe { (std::mem::zeroed(), std::mem::zeroed()) };
    let mut keys = vec![zk; CHUNK];
    let mut values = vec![zv; CHUNK];
    let fd = map.fd().as_fd().as_raw_fd() as u32;
    let (mut token_in, mut token_out) = (0u64, 0u64);
    let mut first = true;
    loop {
        let mut attr = Attr {
            batch: BatchAttr {
                in_batch: if first { 0 } else { (&raw const token_in) as u64 },
                out_batch: (&raw mut token_out) as u64,
                keys: keys.as_mut_ptr() as u64,
                values: values.as_mut_ptr() as u64,
                count: CHUNK as u32,
                map_fd: fd,
                elem_flags: 0,
                flags: 0,
            },
            _rest: [0; 128 - size_of::<BatchAttr>()],
        };
        // SAFETY: the kernel writes at most `count` keys and values into the
        // buffers (each CHUNK long) and a u32 token into token_out; all
        // outlive the call. The attr is zero beyond the batch fields.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                aya_obj::generated::bpf_cmd::BPF_MAP_LOOKUP_BATCH as libc::c_long,
                &raw mut attr,
                size_of::<Attr>() as libc::c_uint,
            )
        };
        let err = (rc != 0).then(std::io::Error::last_os_error);
        let n = (attr.batch.count as usize).min(CHUNK);
        match &err {
            None => {}
            Some(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            Some(_) => return Err(err.unwrap_or_else(|| std::io::Error::other("bpf batch"))),
        }
        for (k, v) in keys[..n].iter().zip(values[..n].iter()) {
            f(k, v);
        }
        if err.is_some() {
            // ENOENT: the walk is over.
            return Ok(());
        }
        token_in = token_out;
        first = false;
    }
}

/// Every entry of a hash map: batched where the kernel can (5.6+), else two
/// syscalls per entry.
pub fn read_all<K: aya::Pod + Eq + std::hash::Hash, V: aya::Pod>(
    map: &aya::maps::HashMap<aya::maps::MapData, K, V>,
    errors: &AtomicU64,
) -> Vec<(K, V)> {
    use aya::maps::IterableMap as _;
    if let Ok(all) = lookup_all::<K, V>(map.map()) {
        return all;
    }
    let mut out = Vec::new();
    for item in map.iter() {
        match item {
            Ok(kv) => out.push(kv),
            Err(aya::maps::MapError::KeyNotFound) => {}
            Err(_) => {
                errors.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    out
}

/// Calls `f` for every entry of `map` without holding the table whole (the
/// walks read tables of up to millions of entries; collecting them first
/// made the daemon's memory peak at twice the table). When the batch read
/// fails part-way and the iterator takes over, `f` may see an entry twice:
/// callers collect into sets.
pub fn for_each_entry<K: aya::Pod + Eq + std::hash::Hash, V: aya::Pod>(
    map: &aya::maps::HashMap<aya::maps::MapData, K, V>,
    errors: &AtomicU64,
    mut f: impl FnMut(K, V),
) {
    use aya::maps::IterableMap as _;
    if for_each::<K, V>(map.map(), |k, v| f(*k, *v)).is_ok() {
        return;
    }
    for item in map.iter() {
        match item {
            Ok((k, v)) => f(k, v),
            Err(aya::maps::MapError::KeyNotFound) => {}
            Err(_) => {
                errors.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// A second handle on the same kernel map (a duplicated file descriptor).
pub fn second_handle<K: aya::Pod, V: aya::Pod>(
    m: &aya::maps::HashMap<aya::maps::MapData, K, V>,
) -> Option<aya::maps::HashMap<aya::maps::MapData, K, V>> {
    use aya::maps::IterableMap as _;
    let fd = m.map().fd().as_fd().try_clone_to_owned().ok()?;
    let data = aya::maps::MapData::from_fd(fd).ok()?;
    aya::maps::HashMap::try_from(aya::maps::Map::HashMap(data)).ok()
}
