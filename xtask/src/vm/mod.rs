//! Debian's own kernels under qemu: the kernels users run (5.10, 6.1, 6.12)
//! boot here with virtme-ng, which shares the host's root file system
//! read-only over 9p, so the host's test binaries, `ip`, `ss` and `bpftool`
//! run inside against that kernel.
//!
//! - [`ensure_tools`] installs qemu, virtme-ng, a static busybox and the
//!   kernel images into a cache outside the repository ([`cache_dir`]);
//! - [`run_in_guest`] boots one kernel, runs a shell command in it and says
//!   how it ended (exit status, time limit, panic, stall, lockup);
//! - `cargo xtask vm --kernel 6.1 -- CMD` runs any command in a guest.
//!
//! Facts this relies on (measured, see shared/KERNEL-NOTES.md): KVM hangs
//! here, so guests always run under TCG emulation (`--disable-kvm`), 5-30x
//! slower than the host; the `-cloud-` images lack 9p, so only the generic
//! `-amd64` ones work; without udev on the host vng always exits 255, so the
//! command's status comes back in a file.

mod guest;
mod tools;

use std::{path::PathBuf, time::Duration};

use anyhow::{Result, bail};

pub use guest::{GuestResult, Hazard, Outcome, run_in_guest};
pub use tools::{Kernel, ensure_tools, release_mirror};

/// Where the kernel packages come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Suite {
    /// The machine's own apt sources (Debian 12 bookworm and its security updates).
    Host,
    /// Debian 11 bullseye (and bullseye-security), through a separate apt
    /// configuration in the cache that points at the machine's own mirrors.
    Bullseye,
}

/// A kernel of the matrix and how to find its newest generic image.
#[derive(Debug, PartialEq, Eq)]
pub struct GuestKernel {
    /// The name used on the command line and in output: `5.10`, `6.1`, `6.12`.
    pub name: &'static str,
    pub suite: Suite,
    /// The metapackage that depends on the newest image of this series, so
    /// that no version is pinned here: apt picks what the sources have now.
    pub metapackage: &'static str,
    /// What the package it depends on must start with (guards against a
    /// metapackage that moved on to another series).
    pub prefix: &'static str,
    /// How long one guest run may take before it is killed.
    ///
    /// Why a limit per kernel: under emulation a kernel that deadlocks, a
    /// test that waits for an event the kernel never sends, or a guest that
    /// hangs in boot would otherwise sit there until CI's 90 minutes run
    /// out, and then no result of any kernel comes back. 20 minutes is about
    /// 5x what the placeholder selection took in the slowest guest (5.10:
    /// 124 s idle, 248 s with other load; boot 10-20 s of it; TIME_WAIT lasts 60 s in every kernel, the
    /// rest is emulation: the daemon's start-up, BPF verification, the
    /// workloads), and three guests in a row at their limits (60 min) plus
    /// the host's ~6 min and the builds stay inside the budget. Override with `TIMEWAIT_VM_TIMEOUT_<name>` (e.g.
    /// `TIMEWAIT_VM_TIMEOUT_6_1=600`) or `TIMEWAIT_VM_TIMEOUT` for all, in seconds.
    pub timeout: Duration,
}

pub const GUEST_KERNELS: &[GuestKernel] = &[
    GuestKernel {
        name: "5.10",
        suite: Suite::Bullseye,
        metapackage: "linux-image-amd64",
        prefix: "linux-image-5.10.",
        timeout: Duration::from_secs(20 * 60),
    },
    GuestKernel {
        name: "6.1",
        suite: Suite::Host,
        metapackage: "linux-image-amd64",
        prefix: "linux-image-6.1.",
        timeout: Duration::from_secs(20 * 60),
    },
    GuestKernel {
        name: "6.12",
        suite: Suite::Host,
        metapackage: "linux-image-6.12-amd64",
        prefix: "linux-image-6.12.",
        timeout: Duration::from_secs(20 * 60),
    },
];

impl GuestKernel {
    pub fn by_name(name: &str) -> Result<&'static Self> {
        match GUEST_KERNELS.iter().find(|k| k.name == name) {
            Some(k) => Ok(k),
            None => {
                let names: Vec<_> = GUEST_KERNELS.iter().map(|k| k.name).collect();
                bail!("unknown guest kernel {name:?}: known are {}", names.join(", "))
            }
        }
    }

    /// The time limit, after the environment's overrides.
    pub fn time_limit(&self) -> Result<Duration> {
        let specific = format!("TIMEWAIT_VM_TIMEOUT_{}", self.name.replace('.', "_"));
        for var in [specific.as_str(), "TIMEWAIT_VM_TIMEOUT"] {
            if let Ok(v) = std::env::var(var) {
                let secs: u64 = v.trim().parse().map_err(|_| anyhow::anyhow!("{var}={v:?} is not a number of seconds"))?;
                return Ok(Duration::from_secs(secs));
            }
        }
        Ok(self.timeout)
    }
}

/// The cache for everything the guests need: `$TIMEWAIT_VM_CACHE`, else
/// `$XDG_CACHE_HOME/timewait-vm`, else `~/.cache/timewait-vm`.
pub fn cache_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("TIMEWAIT_VM_CACHE").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(dir));
    }
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(dir).join("timewait-vm"));
    }
    match std::env::var_os("HOME").filter(|d| !d.is_empty()) {
        Some(home) => Ok(PathBuf::from(home).join(".cache/timewait-vm")),
        None => bail!("no cache directory for the VM tools: set TIMEWAIT_VM_CACHE (or HOME)"),
    }
}

/// `cargo xtask vm --kernel K -- CMD`: runs CMD in a guest, streaming its
/// console, and fails unless CMD exited 0.
pub fn dev_command(kernel: &str, timeout: Option<u64>, cmd: &[String]) -> Result<()> {
    let gk = GuestKernel::by_name(kernel)?;
    if cmd.is_empty() {
        bail!("no command: cargo xtask vm --kernel {kernel} -- <shell command>");
    }
    let kernels = ensure_tools(&[gk])?;
    let limit = match timeout {
        Some(secs) => Duration::from_secs(secs),
        None => gk.time_limit()?,
    };
    let result = run_in_guest(&kernels[0], &cmd.join(" "), limit)?;
    if !result.success() {
        bail!("guest {kernel}: {}", result.outcome);
    }
    Ok(())
}
