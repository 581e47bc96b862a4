//! timewait's eBPF programs.
//!
//! Only tracepoints are used: on the kernels we target fentry/kprobes may be
//! locked down or compiled out (see KERNEL-NOTES.md). A TIME_WAIT minisocket
//! never shows up in `inet_sock_set_state`; it is seen through its timer
//! (`tw->tw_timer`, function `tw_timer_handler`), and tracked in `TW_SOCKS` by
//! that timer's address from creation to end. Struct offsets come from the
//! running kernel's BTF through the `CONFIG` global, never from this build.
#![no_std]
#![no_main]
// For `atomic_xadd`: the BPF target has no atomic read-modify-write types.
#![feature(core_intrinsics)]
#![expect(internal_features, reason = "core_intrinsics is the only atomic add on the BPF target")]

mod connect;
mod iter;
mod listen;
mod maps;
mod skb;
mod sock;
mod timer;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

// tp_btf programs and bpf_probe_read_kernel need a GPL-compatible licence.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
