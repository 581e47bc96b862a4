//! `cargo xtask test`: the kernel matrix. The host runs what it always ran
//! (bench smoke, unit tests, every integration test); Debian's 5.10, 6.1 and
//! 6.12 under qemu each run the real-kernel test binary (timewait-daemon's
//! `kernel` integration test, built on the host and read by the guest over
//! 9p) with their filters from `GUEST_TESTS` in main.rs.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Context as _, Result, bail};

use crate::{
    bench,
    cmd::{cargo, render, workspace_root},
    part::PartResult,
    setup,
    vm::{self, GUEST_KERNELS, GuestKernel, Kernel, Outcome},
};

/// libtest threads inside a guest. The tests mostly wait on the kernel
/// (TIME_WAIT lasts 60 s), but each one starts a daemon whose start-up (BTF,
/// BPF verification) is slow under emulation on the guest's 2 vCPUs.
/// `TIMEWAIT_VM_TEST_THREADS` overrides it.
const GUEST_TEST_THREADS: usize = 4;
/// Guests boot one after another unless `TIMEWAIT_VM_PARALLEL=1`. Measured
/// with the placeholder selection (7 tests per kernel, release daemon), on
/// an otherwise idle machine: in a row 300 s for the three (5.10 124 s, 6.1
/// 92 s, 6.12 85 s), every test on 6.1 and 6.12 passed; at once 282 s, but
/// the three guests' 6 vCPUs share the machine's 2 cores, the daemons start
/// slower, sockets expire before the first scrape and 4 of those 14 tests
/// failed (with other load on the machine: 567 s in a row, all passed, vs
/// 386 s at once, 8 of 14 failed). Parallel gains little and breaks timing.
const PARALLEL_DEFAULT: bool = false;
/// How long a daemon may take to become ready in a guest (the tests' own
/// default of 60 s is for the host; emulation is 5-30x slower).
const GUEST_READY_SECS: u64 = 300;

/// One guest run of the matrix: (kernel, `--probe-path`, test filters).
pub type GuestRun = (&'static str, &'static str, &'static [&'static str]);

/// One part of the matrix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Host,
    Guest(&'static GuestKernel),
    /// The .deb installed on Debian bookworm and driven through systemd.
    Package,
}

/// Runs the parts `kernels` names, prints a line per kernel and, last, the
/// summed `N passed, N failed`; fails when any part failed.
pub fn test(kernels: &[String], args: &[String], table: &[GuestRun]) -> Result<()> {
    let targets = parse_targets(kernels)?;
    setup::toolchain()?;
    setup::test_packages()?;
    let mut parts = Vec::new();
    if targets.contains(&Target::Host) {
        parts.push(test_host(args)?);
    }
    let guests: Vec<_> = targets.iter().filter_map(|t| if let Target::Guest(k) = t { Some(*k) } else { None }).collect();
    if !guests.is_empty() {
        parts.extend(run_guests(&guests, table, args)?);
    }
    if targets.contains(&Target::Package) {
        parts.push(match crate::deb::build() {
            Ok(deb) => crate::debtest::test_package(&deb),
            Err(e) => PartResult::broken("deb", format!("the package did not build: {e:#}")),
        });
    }
    for p in &parts {
        println!("{}", p.line());
    }
    let passed: u64 = parts.iter().map(|p| p.passed).sum();
    let failed: u64 = parts.iter().map(|p| p.failed).sum();
    println!("{passed} passed, {failed} failed");
    let bad: Vec<&str> = parts.iter().filter(|p| !p.ok()).map(|p| p.name.as_str()).collect();
    if !bad.is_empty() {
        bail!("tests failed on kernel {}", bad.join(", "));
    }
    Ok(())
}

/// `--kernel` values: `host`, `5.10`, `6.1`, `6.12`, `deb` (the package on
/// Debian with systemd) or `all`, repeated or
/// comma-separated; none means `all`. Order kept, duplicates dropped.
fn parse_targets(values: &[String]) -> Result<Vec<Target>> {
    let mut out = Vec::new();
    let mut add = |t: Target| {
        if !out.contains(&t) {
            out.push(t);
        }
    };
    let words: Vec<&str> = values.iter().flat_map(|v| v.split(',')).map(str::trim).filter(|w| !w.is_empty()).collect();
    for w in if words.is_empty() { vec!["all"] } else { words } {
        match w {
            "all" => {
                add(Target::Host);
                GUEST_KERNELS.iter().for_each(|k| add(Target::Guest(k)));
                add(Target::Package);
            }
            "host" => add(Target::Host),
            "deb" => add(Target::Package),
            name => add(Target::Guest(GuestKernel::by_name(name)?)),
        }
    }
    Ok(out)
}

/// Adds the counts of a libtest `test result:` line (anywhere in `line`:
/// a console line may carry kernel output before it); false if it is none.
fn count_result(line: &str, passed: &mut u64, failed: &mut u64) -> bool {
    let Some((_, rest)) = line.split_once("test result: ") else { return false };
    for part in rest.split(';') {
        let mut it = part.split_whitespace().rev();
        let (Some(what), Some(n)) = (it.next(), it.next()) else { continue };
        let n: u64 = n.parse().unwrap_or(0);
        match what {
            "passed" => *passed += n,
            "failed" => *failed += n,
            _ => {}
        }
    }
    true
}

/// The host part: the bench smoke run, the unit tests and every integration
/// test, the `#[ignore]`d heavy ones alone at the end.
fn test_host(args: &[String]) -> Result<PartResult> {
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
    let mut part = test_summed(
        cargo()
            .args(["test", "--workspace", "--exclude", "timewait-ebpf", "--lib", "--bins", "--tests", "--"])
            .args(["--test-threads", "16"])
            .args(args),
    )?;
    // The heavy ones (`#[ignore]`d: nginx under wrk load, 70,000 TIME_WAIT,
    // the NAT lab whose SYN counts are exact only on a machine not saturated)
    // alone, after the rest: run among 16 others on 2 cores (every other
    // test's daemon runs its programs on every TCP event of every
    // namespace), making 70,000 connections took 60 s instead of 3, and
    // TIME_WAIT lasts 60 s. Same cargo selection as above, so no rebuild.
    let heavy = test_summed(
        cargo()
            .args(["test", "--workspace", "--exclude", "timewait-ebpf", "--lib", "--bins", "--tests", "--"])
            .args(["--ignored", "--test-threads", "1"])
            .args(args),
    )?;
    part.passed += heavy.passed;
    part.failed += heavy.failed;
    part.problem = part.problem.or(heavy.problem);
    Ok(part)
}

/// Runs `cargo test`, passing its output through, and sums every test
/// binary's result line.
fn test_summed(cmd: &mut Command) -> Result<PartResult> {
    use std::io::{BufRead as _, BufReader};
    eprintln!("xtask: $ {}", render(cmd));
    let mut child = cmd.stdout(Stdio::piped()).spawn().with_context(|| format!("cannot start {}", render(cmd)))?;
    let (mut passed, mut failed) = (0u64, 0u64);
    let stdout = child.stdout.take().context("no stdout")?;
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        println!("{line}");
        if line.starts_with("test result: ") {
            count_result(&line, &mut passed, &mut failed);
        }
    }
    let status = child.wait()?;
    let problem = (!status.success()).then(|| format!("{} failed ({status})", render(cmd)));
    if problem.is_some() && failed == 0 {
        failed = 1; // a build error or a crashed harness: never "0 failed"
    }
    Ok(PartResult { name: "host".into(), passed, failed, problem, retried: false })
}

/// The binaries a guest runs, copied out of target/ so that a rebuild on
/// the host while a guest reads them over 9p cannot change them under it.
struct Binaries {
    dir: PathBuf,
    tests: PathBuf,
    daemon: PathBuf,
}

impl Drop for Binaries {
    fn drop(&mut self) {
        fs::remove_dir_all(&self.dir).ok();
    }
}

/// The guest parts: installs the VM tools, builds the binaries, then runs
/// each guest (in a row, or at once with `TIMEWAIT_VM_PARALLEL=1`).
/// `args`, when given, replace the table's filters (e.g. one test name).
fn run_guests(guests: &[&'static GuestKernel], table: &[GuestRun], args: &[String]) -> Result<Vec<PartResult>> {
    let kernels = vm::ensure_tools(guests)?;
    let bins = build_binaries(&kernels[0].cache)?;
    let parallel = match std::env::var("TIMEWAIT_VM_PARALLEL").as_deref() {
        Ok("1") => true,
        Ok("0") => false,
        _ => PARALLEL_DEFAULT,
    };
    // One job per row of the table for the kernels asked for; with filters
    // given on the command line, one auto run per kernel.
    let mut jobs: Vec<(Kernel, String, String)> = Vec::new();
    for k in kernels {
        let rows: Vec<(&str, Vec<String>)> = if args.is_empty() {
            table
                .iter()
                .filter(|(name, _, _)| *name == k.guest.name)
                .map(|(_, path, f)| (*path, f.iter().map(|s| (*s).to_string()).collect()))
                .collect()
        } else {
            vec![("auto", args.to_vec())]
        };
        for (path, filters) in rows {
            let label = if path == "auto" { k.guest.name.to_string() } else { format!("{} ({path})", k.guest.name) };
            jobs.push((k.clone(), label, guest_command(&bins, path, &filters)));
        }
    }
    let start = Instant::now();
    let results = if parallel {
        std::thread::scope(|s| {
            let handles: Vec<_> = jobs.iter().map(|(k, label, cmd)| s.spawn(move || run_part(k, label, cmd))).collect();
            handles.into_iter().map(|h| h.join().expect("guest thread panicked")).collect()
        })
    } else {
        jobs.iter().map(|(k, label, cmd)| run_part(k, label, cmd)).collect::<Vec<_>>()
    };
    let how = if parallel { "at once" } else { "one after another" };
    eprintln!("xtask: {} guest kernel(s) {how} in {:.0} s", jobs.len(), start.elapsed().as_secs_f64());
    Ok(results)
}

fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The shell command run in the guest: the test binary from its package
/// directory (as cargo runs it), with the release daemon and a start-up
/// deadline for emulation; libtest's output goes to the console.
fn guest_command(bins: &Binaries, probe_path: &str, filters: &[String]) -> String {
    let dir = workspace_root().join("timewait-daemon");
    let threads = std::env::var("TIMEWAIT_VM_TEST_THREADS").unwrap_or_else(|_| GUEST_TEST_THREADS.to_string());
    let mut words = vec![bins.tests.display().to_string(), "--test-threads".into(), threads];
    // The guest's console is a terminal: no colour codes in what is parsed.
    words.extend(["--color".into(), "never".into()]);
    words.extend(filters.iter().cloned());
    let words: Vec<String> = words.iter().map(|w| quote(w)).collect();
    format!(
        "export TIMEWAIT_TEST_DAEMON={} TIMEWAIT_TEST_READY_SECS={GUEST_READY_SECS} TIMEWAIT_TEST_PROBE_PATH={}; cd {} && {}",
        quote(&bins.daemon.display().to_string()),
        quote(probe_path),
        quote(&dir.display().to_string()),
        words.join(" ")
    )
}

/// One guest: boots it, runs the tests, counts what they said. A run the
/// emulator spoiled (see [`emulator_fault`]) is run once more, and the line
/// says so.
fn run_part(kernel: &Kernel, label: &str, cmd: &str) -> PartResult {
    let first = run_part_once(kernel, label, cmd);
    let Err((fault, _)) = &first else {
        return first.unwrap_or_else(|(_, r)| r);
    };
    eprintln!("xtask: [{label}] spoiled by the emulator ({fault}): running it once more");
    let mut second = run_part_once(kernel, label, cmd).unwrap_or_else(|(_, r)| r);
    let note = format!("second run; the first was spoiled by the emulator: {fault}");
    second.problem = Some(match second.problem.take() {
        Some(p) => format!("{p}; {note}"),
        None => note,
    });
    if second.failed == 0 {
        // Passed the second time: the note is information, not a failure.
        second.retried = true;
    }
    second
}

/// Console lines that mean the emulator, not the kernel under test or our
/// programs, broke the run: a vCPU thread descheduled on the busy host long
/// enough for the guest's RCU-stall or soft-lockup detector (every vCPU
/// "stuck" at the same instant), or a stale translation of code the kernel
/// was patching (`Oops: int3` while text_poke_bp patched a jump label or a
/// trampoline: TCG ran the breakpoint after the patch was done), or a
/// double fault with no BPF frame in sight ([`double_fault_outside_bpf`]).
/// A second run shows whether it was that: our bug would come back.
fn emulator_fault(result: &vm::GuestResult) -> Option<String> {
    if let Outcome::Killed(vm::Hazard::RcuStall | vm::Hazard::SoftLockup, line) = &result.outcome {
        return Some(line.clone());
    }
    if let Some(l) = result.console.iter().find(|l| l.contains("Oops: int3")) {
        return Some(l.clone());
    }
    double_fault_outside_bpf(&result.console)
}

/// A double fault with no BPF program or trampoline in any trace: seen once
/// under TCG in the 6.12 guest (issue 27's CI), in `__kmalloc_node` under
/// `clone3` of a test thread, with a garbage EFLAGS (`c2671722`): the
/// emulator's state, not a stack our programs could have overflowed (they
/// run on the stack of what they trace, and none was in the trace). One
/// with a BPF frame is ours and is never retried.
fn double_fault_outside_bpf(console: &[String]) -> Option<String> {
    let fault = console.iter().find(|l| l.contains("traps: PANIC: double fault"))?;
    let bpf = console.iter().any(|l| l.contains("bpf_prog_") || l.contains("bpf_trampoline"));
    (!bpf).then(|| fault.clone())
}

#[cfg(test)]
mod emulator_tests {
    use super::double_fault_outside_bpf;

    #[test]
    fn double_faults_are_the_emulators_only_without_bpf_frames() {
        let lines = |v: &[&str]| v.iter().map(|s| (*s).to_string()).collect::<Vec<_>>();
        let ours = lines(&["[   18.1] traps: PANIC: double fault, error_code: 0x0", "[   18.1]  bpf_prog_1234_nat_kfree_skb+0x40/0x90"]);
        assert_eq!(double_fault_outside_bpf(&ours), None);
        let tcg = lines(&["[   18.1] traps: PANIC: double fault, error_code: 0x0", "[   18.1]  copy_process+0xe1a/0x2800"]);
        assert!(double_fault_outside_bpf(&tcg).is_some());
        assert_eq!(double_fault_outside_bpf(&lines(&["[ 1.0] Oops: general protection fault"])), None);
    }
}

fn run_part_once(kernel: &Kernel, label: &str, cmd: &str) -> Result<PartResult, (String, PartResult)> {
    let name = label;
    let limit = match kernel.guest.time_limit() {
        Ok(l) => l,
        Err(e) => return Ok(PartResult::broken(name, format!("{e:#}"))),
    };
    let result = match vm::run_in_guest(kernel, cmd, limit) {
        Ok(r) => r,
        Err(e) => return Ok(PartResult::broken(name, format!("{e:#}"))),
    };
    let (mut passed, mut failed, mut reported) = (0, 0, false);
    for line in &result.console {
        reported |= count_result(line, &mut passed, &mut failed);
    }
    let problem = match &result.outcome {
        Outcome::Exited(_) if !reported => Some("the test binary reported no result".to_string()),
        Outcome::Exited(0) if passed == 0 && failed == 0 => Some("no test matched the selection".to_string()),
        Outcome::Exited(0) => None,
        Outcome::Exited(_) if failed > 0 => None, // the failed tests say it
        other => Some(format!("guest {other}")),
    };
    // A guest that ended without its tests' verdict counts as one failure,
    // so that the summed line never reads "0 failed" for a broken run.
    if problem.is_some() && failed == 0 {
        failed = 1;
    }
    let part = PartResult { name: name.to_string(), passed, failed, problem, retried: false };
    match emulator_fault(&result) {
        Some(fault) if !part.ok() => Err((fault, part)),
        _ => Ok(part),
    }
}

/// Builds the test binaries and the release daemon (a debug daemon takes
/// a minute to start under emulation) and copies the two a guest runs into
/// the VM cache. `TIMEWAIT_VM_TEST_BIN` names a test binary to use instead
/// of building one, for trying a given build.
fn build_binaries(cache: &Path) -> Result<Binaries> {
    let tests = match std::env::var_os("TIMEWAIT_VM_TEST_BIN").filter(|b| !b.is_empty()) {
        Some(bin) => {
            eprintln!("xtask: using TIMEWAIT_VM_TEST_BIN={}", bin.to_string_lossy());
            PathBuf::from(bin)
        }
        None => built_executable(&["test", "--workspace", "--exclude", "timewait-ebpf", "--no-run"], "kernel", "test")?,
    };
    let daemon = built_executable(&["build", "--release", "--package", "timewait-daemon"], "timewaitd", "bin")?;
    let dir = cache.join("run").join(format!("bins-{}", std::process::id()));
    fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let bins = Binaries { tests: dir.join("kernel-tests"), daemon: dir.join("timewaitd"), dir };
    for (from, to) in [(&tests, &bins.tests), (&daemon, &bins.daemon)] {
        fs::copy(from, to).with_context(|| format!("cannot copy {} to {}", from.display(), to.display()))?;
    }
    Ok(bins)
}

/// Runs `cargo ARGS --message-format=json` and returns the executable of
/// timewait-daemon's target `name` of kind `kind`.
fn built_executable(args: &[&str], name: &str, kind: &str) -> Result<PathBuf> {
    let mut cmd = cargo();
    cmd.args(args).arg("--message-format=json");
    eprintln!("xtask: $ {}", render(&cmd));
    let out = cmd.stderr(Stdio::inherit()).output().with_context(|| format!("cannot start {}", render(&cmd)))?;
    if !out.status.success() {
        bail!("{} failed ({})", render(&cmd), out.status);
    }
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else { continue };
        let wanted = msg["reason"] == "compiler-artifact"
            && msg["target"]["name"] == name
            && msg["target"]["kind"].as_array().is_some_and(|k| k.iter().any(|k| k == kind))
            && msg["package_id"].as_str().is_some_and(|p| p.contains("timewait-daemon"));
        if wanted && let Some(exe) = msg["executable"].as_str() {
            return Ok(PathBuf::from(exe));
        }
    }
    bail!("{} built no {kind} `{name}` of timewait-daemon", render(&cmd))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn result_lines_are_summed() {
        let (mut p, mut f) = (0, 0);
        assert!(count_result("test result: ok. 3 passed; 0 failed; 1 ignored; 0 measured; 26 filtered out", &mut p, &mut f));
        assert!(count_result("[  1.5] junk test result: FAILED. 2 passed; 5 failed; 0 ignored", &mut p, &mut f));
        assert!(!count_result("running 7 tests", &mut p, &mut f));
        assert_eq!((p, f), (5, 5));
    }

    #[test]
    fn kernel_lists() {
        let all = parse_targets(&[]).unwrap();
        assert_eq!(all.len(), 2 + GUEST_KERNELS.len());
        assert_eq!(all.last(), Some(&Target::Package));
        assert_eq!(all[0], Target::Host);
        let some = parse_targets(&["6.1,host".into(), "6.1".into()]).unwrap();
        assert_eq!(some, vec![Target::Guest(GuestKernel::by_name("6.1").unwrap()), Target::Host]);
        assert!(parse_targets(&["5.15".into()]).is_err());
    }
}
