//! timewait's eBPF programs.
//!
//! Two ways into the kernel, sharing the maps and the key code (`maps`,
//! `sock`, `tw`):
//! - `fentry`: programs on the TIME_WAIT functions themselves (fentry/fexit,
//!   or kprobes on the same functions), wherever the kernel allows them;
//! - `tracepoint`: a minisocket followed from its full socket's close, the
//!   connection that takes its 4-tuple over, its timer's expiry and the
//!   segments it drops, for kernels that lock fentry and kprobes away.
//! The daemon picks one per signal by trying to attach. Either way a
//! minisocket is tracked in `TW_SOCKS` by the address of its `tw_timer` from
//! creation to end (`tw`: its life, shared). What one path alone keeps is
//! that path's, chosen when its programs are compiled (`tw::Lifecycle`): the
//! tracepoint lifecycle's maps are in `tracepoint::maps`, and no fentry or
//! kprobe program references them. Listeners and connections (`listen`)
//! and `connect()` (`connect`) serve both; the socket iterators (`iter`:
//! start-up snapshot, reconciliation) walk minisockets with one pair of
//! programs per lifecycle, and the daemon runs the pair of the one attached.
//! Struct offsets come from the running kernel's BTF through the `CONFIG`
//! global, never from this build.
#![no_std]
#![no_main]
// For `atomic_xadd`: the BPF target has no atomic read-modify-write types.
#![feature(core_intrinsics)]
#![expect(internal_features, reason = "core_intrinsics is the only atomic add on the BPF target")]

mod connect;
mod fentry;
mod iter;
mod listen;
mod maps;
mod sock;
mod tracepoint;
mod tw;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

// tp_btf programs and bpf_probe_read_kernel need a GPL-compatible licence.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
