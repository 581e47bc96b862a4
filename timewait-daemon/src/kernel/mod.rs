//! The kernel room: what the running kernel offers, loading and attaching the eBPF programs, reading their maps.
//!
//! - `offsets`: struct offsets from BTF and `tw_timer_handler`'s address,
//!   handed to the programs; `procfs`: sysctls, netstat counters, the port
//!   range, our namespace.
//! - `load`: the object, the maps, the start-up snapshot; `paths`: which way
//!   in (fentry, kprobe, tracepoint) serves each signal.
//! - `maps`: reading whole maps; `rcu`: waiting until no program still runs
//!   (the drain's grace period); `netns`: entering other network namespaces.
//!
//! Nothing here knows about series, HTTP or the command line.

pub mod load;
pub mod maps;
pub mod nat_drops;
pub mod netns;
pub mod offsets;
pub mod paths;
pub mod procfs;
pub mod rcu;

use offsets::KernelError;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum LoadError {
    #[error(transparent)]
    Kernel(#[from] KernelError),
    #[error("loading the eBPF object failed: {0} (needs root, or CAP_BPF + CAP_PERFMON)")]
    Load(String),
    #[error("eBPF program {program} failed to {step}: {err}")]
    Program { program: &'static str, step: &'static str, err: String },
    #[error("eBPF map {0} missing or of the wrong type: {1}")]
    Map(&'static str, String),
    #[error("{0}")]
    Path(String),
}

/// `e` and its sources on one line: aya's errors keep the useful part (the
/// verifier's or the kernel's word) in the source chain.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}
