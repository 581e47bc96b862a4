//! `cargo xtask <task>`: timewait's build, run and test tasks. Each task first
//! installs what it needs when it is missing (and says so), so that a fresh
//! machine needs nothing but cargo.

mod bench;
mod setup;

use std::{
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};

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
    /// Run the whole test suite: unit tests and real-kernel integration tests.
    Test {
        /// Extra arguments for the test harness (after `--`), e.g. a test name filter.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Run the performance scenarios (as root) and write BENCHMARKS.md; `--smoke` for a quick run at small sizes.
    Bench(bench::BenchArgs),
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask is inside the workspace").to_path_buf()
}

/// Runs `cmd`, echoing it first; fails when it fails.
pub fn sh(cmd: &mut Command) -> Result<()> {
    eprintln!("xtask: $ {}", render(cmd));
    let status = cmd.status().with_context(|| format!("cannot start {}", render(cmd)))?;
    if !status.success() {
        bail!("{} failed ({status})", render(cmd));
    }
    Ok(())
}

/// Runs `cargo test`, passing its output through, and ends with one line
/// that sums every test binary's result: `N passed, N failed`.
fn test_summed(cmd: &mut Command) -> Result<()> {
    use std::io::{BufRead as _, BufReader};
    eprintln!("xtask: $ {}", render(cmd));
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start {}", render(cmd)))?;
    let (mut passed, mut failed) = (0u64, 0u64);
    let stdout = child.stdout.take().context("no stdout")?;
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        println!("{line}");
        if let Some(rest) = line.strip_prefix("test result: ") {
            for part in rest.split(';') {
                let mut it = part.split_whitespace().rev();
                let (Some(what), Some(n)) = (it.next(), it.next()) else { continue };
                let n: u64 = n.parse().unwrap_or(0);
                match what {
                    "passed" => passed += n,
                    "failed" => failed += n,
                    _ => {}
                }
            }
        }
    }
    let status = child.wait()?;
    println!("{passed} passed, {failed} failed");
    if !status.success() {
        bail!("{} failed ({status})", render(cmd));
    }
    Ok(())
}

fn render(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|s| s.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

fn cargo() -> Command {
    let mut c = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    c.current_dir(workspace_root());
    c
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
        Task::Bench(args) => bench::run(args),
        Task::Test { args } => {
            setup::toolchain()?;
            setup::test_packages()?;
            if setup::is_root() {
                // The benchmark's code paths at small sizes, so that a broken
                // bench shows up here; it never fails on a missed target.
                bench::run(bench::BenchArgs::smoke())?;
            } else {
                eprintln!("xtask: not root: the real-kernel tests will print SKIPPED and return; bench smoke SKIPPED: needs root");
            }
            // Unit tests and the integration binaries. The kernel tests spend
            // most of their time waiting on the kernel (TIME_WAIT lasts 60 s),
            // so they run many at once on few cores.
            test_summed(
                cargo()
                    .args(["test", "--workspace", "--exclude", "timewait-ebpf", "--lib", "--bins", "--tests", "--"])
                    .args(["--test-threads", "16"])
                    .args(&args),
            )
        }
    }
}
