//! Where the tests run: root or a skip, the kernel of the matrix, and the path each signal must take there.

use std::io::{self, Write};

/// True when the tests can run. Otherwise says why on stderr (never a silent
/// pass) and the test returns early.
pub fn require_root(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    if euid != 0 {
        // Straight to fd 2, not eprintln!: libtest captures the print macros
        // of a passing test, and a skip must never look like a silent pass.
        let _ = writeln!(
            io::stderr(),
            "SKIPPED {test}: needs root (network namespaces, BPF programs; euid is {euid})"
        );
        return false;
    }
    true
}


/// The matrix kernel the tests run on (`cargo xtask test` sets
/// `TIMEWAIT_TEST_KERNEL` in each guest): `host`, `5.10`, `6.1` or `6.12`.
pub fn test_kernel() -> String {
    std::env::var("TIMEWAIT_TEST_KERNEL").unwrap_or_else(|_| "host".into())
}

/// Whether the tests run in an emulated guest of the kernel matrix (where
/// time bounds on the kernel's own speed are 10x wider).
pub fn emulated() -> bool {
    test_kernel() != "host"
}

/// The `--probe-path` every daemon under test gets (`TIMEWAIT_TEST_PROBE_PATH`;
/// the matrix forces the fallbacks on kernels that would not pick them).
pub fn test_probe_path() -> String {
    std::env::var("TIMEWAIT_TEST_PROBE_PATH").unwrap_or_else(|_| "auto".into())
}

/// (lifecycle path, segments path) the daemon must report on this kernel,
/// so that a silent fallback fails the test. The host of these machines
/// refuses fentry (lockdown) and has no kprobes; Debian's 5.10, 6.1 and 6.12
/// allow both; kfree_skb has `rx_sk` (segments on the tracepoint path) from
/// 6.11. `TIMEWAIT_TEST_EXPECT=LIFECYCLE,SEGMENTS` overrides it for a host
/// that is not one of these machines.
pub fn expected_paths() -> (String, String) {
    if let Ok(v) = std::env::var("TIMEWAIT_TEST_EXPECT")
        && let Some((l, s)) = v.split_once(',')
    {
        return (l.to_string(), s.to_string());
    }
    let kernel = test_kernel();
    let (l, s) = match (kernel.as_str(), test_probe_path().as_str()) {
        ("host", _) => ("tracepoint", "tracepoint"),
        ("5.10" | "6.1", "tracepoint") => ("tracepoint", "unavailable"),
        (_, "tracepoint") => ("tracepoint", "tracepoint"),
        (_, "kprobe") => ("kprobe", "kprobe"),
        _ => ("fentry", "fentry"),
    };
    (l.to_string(), s.to_string())
}

/// The path of the full-socket hooks here: fentry or the tracepoints (they
/// have no kprobe fallback and are taken whole), fentry wherever the
/// lifecycle gets it.
pub fn expected_sockets_path() -> String {
    if expected_paths().0 == "fentry" { "fentry" } else { "tracepoint" }.to_string()
}

/// The path of bind() errors: with the fentry sockets hooks, else the
/// `sys_exit_bind` tracepoint when asked for (`--syscall-tracepoints`), else off.
pub fn expected_bind_errors_path(syscall_tracepoints: bool) -> String {
    match (expected_sockets_path().as_str(), syscall_tracepoints) {
        ("fentry", _) => "fentry",
        (_, true) => "tracepoint",
        _ => "off",
    }
    .to_string()
}

/// Whether SYN verdicts, segment kinds and reset reasons are served here.
/// Tests of them skip, saying why, where the path cannot serve them.
pub fn segments_available(test: &str) -> bool {
    let (_, segments) = expected_paths();
    if segments == "unavailable" {
        let _ = writeln!(
            io::stderr(),
            "SKIPPED {test}: kernel {} on the {} path has no segment hooks (kfree_skb has no rx_sk before 6.11)",
            test_kernel(),
            test_probe_path()
        );
        return false;
    }
    true
}
