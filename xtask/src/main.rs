//! `cargo xtask <task>`: timewait's build, run and test tasks. Each task first
//! installs what it needs when it is missing (and says so), so that a fresh
//! machine needs nothing but cargo.

mod bench;
mod cmd;
mod deb;
mod debtest;
mod matrix;
mod part;
mod setup;
mod vm;

use std::process::{Command, ExitCode};

use anyhow::Result;
use clap::{Parser, Subcommand};

use crate::cmd::{cargo, sh, workspace_root};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "timewait's build, run and test tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install the eBPF toolchain (nightly rust-src, bpf-linker) and the Debian packages the tests use.
    Setup,
    /// Build timewaitd in release mode (the eBPF object is embedded).
    Build,
    /// Build and start timewaitd (as root); arguments after `--` go to `timewaitd run`.
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Run the whole test suite: unit tests and real-kernel integration tests, on
    /// the host and in Debian's 5.10, 6.1 and 6.12 kernels under qemu.
    Test {
        /// Where to run: host, 5.10, 6.1, 6.12, deb (the package on Debian bookworm under systemd) or all; repeatable or comma-separated [default: all].
        #[arg(long = "kernel", value_name = "K")]
        kernels: Vec<String>,
        /// Extra arguments for the test harness (after `--`), e.g. a test name filter;
        /// in the guests, they replace the filters of GUEST_TESTS.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Run a shell command inside a Debian kernel under qemu (host root fs shared read-only, as root), e.g.
    /// `cargo xtask vm --kernel 6.1 -- bpftool prog`. Fails unless the command exits 0.
    Vm {
        /// The guest kernel: 5.10, 6.1 or 6.12.
        #[arg(long, default_value = "6.12")]
        kernel: String,
        /// Kill the guest after this many seconds [default: the kernel's matrix time limit].
        #[arg(long, value_name = "SECS")]
        timeout: Option<u64>,
        /// The shell command (words are joined with spaces and run by sh).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
        cmd: Vec<String>,
    },
    /// Build the Debian package target/debian/timewaitd_<version>-1_amd64.deb (cargo-deb; installed when missing).
    Deb,
    /// Run the performance scenarios (as root) and write BENCHMARKS.md; `--smoke` for a quick run at small sizes.
    Bench(Box<bench::BenchArgs>),
}

/// The real-kernel tests each guest of the matrix runs: (kernel, the
/// `--probe-path` every daemon gets there, test-name filters of
/// timewait-daemon's `kernel` test binary, libtest substring matches). The
/// host runs every test. Emulation is 10-30x slower, so the guests run what
/// exercises every hook path and feature (README, "Tests"): the fentry path
/// on each Debian kernel, the kprobe fallback on one, the tracepoint path
/// where kfree_skb has no `rx_sk` (5.10) and where it has (6.12). Each test
/// asserts the path its kernel must report, so a silent fallback fails it.
pub const GUEST_TESTS: &[matrix::GuestRun] = &[
    ("5.10", "auto", FENTRY_TESTS),
    ("6.1", "auto", FENTRY_TESTS),
    ("6.12", "auto", FENTRY_TESTS),
    // kprobes: the sockets signal on its tracepoint (connect() errors from
    // state changes, tcp_tw_reuse takeovers told from the active open).
    // connect_errors: bind() errors through sys_enter/exit_bind and the
    // descriptor's socket (--syscall-tracepoints) on a Debian kernel.
    ("6.1", "kprobe", &["check_paths", "server_side_500", "syn_reuse", "syn_rejected", "reset", "exhaustion", "connect_reuse", "connect_errors", "folded::"]),
    // connect_errors: the syscall tracepoints' bind() errors (the socket of
    // the descriptor, offsets from BTF) on the oldest kernel.
    ("5.10", "tracepoint", &["check_paths", "netns_isolation", "connect_errors"]),
    // The kprobes (and syscall tracepoints) load on a kernel that WARNs and
    // taints itself when such a program uses a map allocated at run time
    // (5.6-6.0): no warning, no taint (issue 26).
    ("5.10", "kprobe", &["load_taint"]),
    // The tracepoint lifecycle: creation from the close, takeovers told by
    // the next connection with the 4-tuple, resets from kfree_skb's rx_sk.
    ("6.12", "tracepoint", &["check_paths", "server_side_500", "syn_reuse", "syn_rejected", "reset", "connect_reuse", "folded::"]),
];

/// Counts vs `ss` per remote, direction, IPv6, FIN_WAIT2, pre-existing and
/// restart, a stopped server, netns; expiry; SYN accepted and rejected; reset; tcp_tw_reuse;
/// overflow; port exhaustion and the time to it; cgroup attribution; `check`.
const FENTRY_TESTS: &[&str] = &[
    "check_paths",
    "server_side_500",
    "direction",
    "ipv6",
    "fin_wait2_orphans",
    "preexisting_and_restart",
    // Not "dead_listener": libtest matches substrings, and that would also
    // run the host-only dead_listener_70k.
    "dead_listener::",
    "netns_isolation",
    "expiry",
    "syn_reuse",
    "syn_rejected",
    "reset",
    "connect_reuse",
    "overflow",
    // Also time_to_exhaustion (issue 14): libtest matches substrings.
    "exhaustion",
    // The owning cgroup of ports, TIME_WAIT and errors (issue 14).
    "attribution",
    // connect()/bind() errors: TCP only, the table cannot be blinded,
    // never backwards (issue 25).
    "connect_errors",
    // The delta tables drained behind an RCU grace period, and losses
    // healed by walks (issue 12); "direction" above also runs
    // direction_history (direction from the connection's own history).
    "tiny_maps_reconcile_to_exact",
    // Folded series' ratios and estimates of one real destination, SYN
    // counters that never go back while the busiest change (issue 25).
    "folded::",
    // The balancer's side (issue 27): conntrack through ctnetlink, the
    // ruleset's ranges, module-loaded conntrack and nf_tables.
    "nat_ports::",
    // NAT allocation failures per destination: nf_conn from module BTF
    // (6.1, 6.12), unavailable without kfree_skb's reason (5.10) (issue 27).
    "nat_failures",
];

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.task {
        Task::Setup => {
            setup::toolchain()?;
            setup::test_packages()
        }
        Task::Build => {
            setup::toolchain()?;
            sh(cargo().args(["build", "--release", "--package", "timewait-daemon"]))
        }
        Task::Run { args } => {
            setup::toolchain()?;
            sh(cargo().args(["build", "--release", "--package", "timewait-daemon"]))?;
            let bin = workspace_root().join("target/release/timewaitd");
            let mut cmd = if setup::is_root() {
                Command::new(&bin)
            } else {
                eprintln!("xtask: timewaitd needs root (or CAP_BPF + CAP_PERFMON): running it with sudo");
                let mut c = Command::new("sudo");
                c.arg(&bin);
                c
            };
            cmd.arg("run").args(&args);
            sh(&mut cmd)
        }
        Task::Bench(args) => bench::run(*args),
        Task::Deb => deb::build().map(|_| ()),
        Task::Vm { kernel, timeout, cmd } => vm::dev_command(&kernel, timeout, &cmd),
        Task::Test { kernels, args } => matrix::test(&kernels, &args, GUEST_TESTS),
    }
}
