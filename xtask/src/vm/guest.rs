//! Boots one kernel with vng, runs a shell command in it, streams the
//! console with a `[KERNEL] ` prefix and watches it: the guest is killed on
//! its time limit, a kernel panic, an RCU stall or a soft lockup.

use std::{
    fmt, fs,
    io::{BufRead as _, BufReader, Read},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, Result};

use super::Kernel;
use crate::cmd::render;

/// What the console shows when the kernel is beyond saving. The test would
/// never finish (or finish meaninglessly): kill the guest at once.
const HAZARDS: &[(&str, Hazard)] = &[
    ("Kernel panic", Hazard::Panic),
    ("rcu: INFO:", Hazard::RcuStall),
    ("detected stall", Hazard::RcuStall), // also "self-detected stall"
    ("soft lockup", Hazard::SoftLockup),
];
/// After a hazard line, the console is read a little longer so that the
/// backtrace that follows it is printed too.
const HAZARD_GRACE: Duration = Duration::from_secs(3);
/// The guest prints these around the command (see `guest_script`).
const STARTED: &str = "timewait-guest: started";
const EXIT_MARKER: &str = "timewait-guest: exit ";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hazard {
    Panic,
    RcuStall,
    SoftLockup,
}

/// How a guest run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The command ran to its end with this exit status.
    Exited(i32),
    /// Killed at the time limit.
    TimedOut(Duration),
    /// Killed because the console showed this line.
    Killed(Hazard, String),
    /// vng ended without the command's status (boot failure, vng error).
    NoStatus(String),
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Exited(0) => write!(f, "command exited 0"),
            Self::Exited(code) => write!(f, "command failed (exit status {code})"),
            Self::TimedOut(limit) => write!(f, "killed: time limit of {} s reached", limit.as_secs()),
            Self::Killed(Hazard::Panic, line) => write!(f, "killed: kernel panic: {line}"),
            Self::Killed(Hazard::RcuStall, line) => write!(f, "killed: RCU stall: {line}"),
            Self::Killed(Hazard::SoftLockup, line) => write!(f, "killed: soft lockup: {line}"),
            Self::NoStatus(why) => write!(f, "no status from the guest: {why}"),
        }
    }
}

#[derive(Debug)]
pub struct GuestResult {
    pub kernel: &'static str,
    pub release: String,
    pub outcome: Outcome,
    /// From starting vng to the guest's first line of our script.
    pub boot: Option<Duration>,
    /// From starting vng to the guest's end.
    pub elapsed: Duration,
    /// Every console line, without the prefix.
    pub console: Vec<String>,
}

impl GuestResult {
    pub fn success(&self) -> bool {
        self.outcome == Outcome::Exited(0)
    }

    pub fn summary(&self) -> String {
        let boot = self.boot.map_or_else(|| "did not boot".to_string(), |b| format!("booted in {:.1} s", b.as_secs_f64()));
        format!("[{}] {}: {boot}, {:.1} s in all; {}", self.kernel, self.release, self.elapsed.as_secs_f64(), self.outcome)
    }
}

/// Boots `kernel` and runs `cmd` (a shell command) inside, in the host's
/// current directory, with `TIMEWAIT_TEST_KERNEL` set to the kernel's name;
/// kills the guest at `limit` or when the console shows a [`Hazard`].
/// An `Err` means the guest could not be started at all.
pub fn run_in_guest(kernel: &Kernel, cmd: &str, limit: Duration) -> Result<GuestResult> {
    let name = kernel.guest.name;
    let outdir = run_dir(kernel)?;
    let cwd = std::env::current_dir()?;
    fs::write(outdir.join("cmd.sh"), format!("{cmd}\n"))?;
    fs::write(outdir.join("guest.sh"), guest_script(name, &outdir, &cwd))?;
    let mut vng = vng_command(kernel, &outdir);
    eprintln!("xtask: [{name}] booting {} ({}; time limit {} s): {cmd}", kernel.release, kernel.package, limit.as_secs());
    eprintln!("xtask: [{name}] $ {}", render(&vng));
    let start = Instant::now();
    let mut child = vng.spawn().with_context(|| format!("cannot start {}", render(&vng)))?;
    let watched = watch(name, &mut child, start, limit);
    let status = child.wait().context("waiting for vng")?;
    let Watched { ended_by, boot, console } = watched;
    let outcome = match ended_by {
        Some(killed) => killed,
        None => exit_status(&outdir, &console).unwrap_or_else(|| {
            Outcome::NoStatus(format!("vng exited ({status}) before the command reported its status"))
        }),
    };
    fs::remove_dir_all(&outdir).ok();
    let result = GuestResult { kernel: name, release: kernel.release.clone(), outcome, boot, elapsed: start.elapsed(), console };
    eprintln!("xtask: {}", result.summary());
    Ok(result)
}

/// A fresh folder for one run, the guest's `--rwdir`: it holds the scripts
/// and gets the command's exit status back.
fn run_dir(kernel: &Kernel) -> Result<PathBuf> {
    sweep_runs(&kernel.cache.join("run"));
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_nanos();
    let dir = kernel.cache.join("run").join(format!("{}-{}-{nanos}", kernel.guest.name, std::process::id()));
    fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    Ok(dir)
}

/// Removes what runs of xtask processes that are gone left in `run/`
/// (folders `KERNEL-PID-NANOS` and `bins-PID`, e.g. after a kill).
fn sweep_runs(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else { return };
    for e in entries.filter_map(|e| e.ok()) {
        let name = e.file_name().to_string_lossy().into_owned();
        let pid = name.split('-').nth(1).and_then(|p| p.parse::<u32>().ok());
        if let Some(pid) = pid
            && pid != std::process::id()
            && !Path::new(&format!("/proc/{pid}")).exists()
        {
            fs::remove_dir_all(e.path()).ok();
        }
    }
}

/// The measured working call (shared/KERNEL-NOTES.md): TCG only, the host's
/// root over 9p, the busybox init, stdin from /dev/null.
fn vng_command(kernel: &Kernel, outdir: &Path) -> Command {
    let mut c = Command::new(&kernel.vng);
    c.arg("--run")
        .arg(&kernel.image)
        .args(["--disable-kvm", "--force-9p", "--memory", "2G", "--cpus", "2"])
        // Under TCG on a busy 2-core host a vCPU can go unscheduled for more
        // than the default 21 s, and the guest reports an RCU stall that is
        // the emulator's, not the kernel's (seen once on 5.10 in CI). A
        // real stall still trips the detector, after 120 s.
        .args(["--append", "rcupdate.rcu_cpu_stall_timeout=120"])
        .arg("--busybox")
        .arg(&kernel.busybox)
        .arg("--rwdir")
        .arg(outdir)
        .arg("--verbose")
        .arg("--exec")
        .arg(format!("sh {}", outdir.join("guest.sh").display()));
    let venv_bin = kernel.vng.parent().map(Path::to_path_buf).unwrap_or_default();
    let path = std::env::var_os("PATH").unwrap_or_default();
    let path = std::env::join_paths(std::iter::once(venv_bin).chain(std::env::split_paths(&path))).unwrap_or(path);
    // vng stays in our process group, so that a Ctrl-C reaches qemu too.
    c.env("PATH", path).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    c
}

/// Single-quotes a string for sh.
fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Runs inside the guest: fixes up what vng's init leaves out and the tests
/// need, runs the command, and writes its status into the rwdir (vng's own
/// exit code is 255 whatever happens, without udev on the host).
fn guest_script(kernel: &str, outdir: &Path, cwd: &Path) -> String {
    let out = quote(&outdir.display().to_string());
    let cwd = quote(&cwd.display().to_string());
    let path = quote(&std::env::var("PATH").unwrap_or_default());
    let kernel = quote(kernel);
    format!(
        r#"echo "{STARTED} $(uname -r)"
export TIMEWAIT_TEST_KERNEL={kernel}
export PATH={path}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
{PRELUDE}
cd {cwd} || exit 1
sh {out}/cmd.sh </dev/null
rc=$?
echo "$rc" > {out}/status
sync
echo "{EXIT_MARKER}$rc"
"#
    )
}

/// What vng's init does not provide (checked in its guests) and the tests
/// use. Console messages up to `err` stay on: panics, stalls and lockups are
/// printed at `err` or above, the rest would only interleave with the output.
const PRELUDE: &str = r#"grep -q ' /sys/kernel/tracing ' /proc/mounts || mount -t tracefs tracefs /sys/kernel/tracing
grep -q ' /sys/kernel/security ' /proc/mounts || mount -t securityfs securityfs /sys/kernel/security
grep -q ' /sys/fs/bpf ' /proc/mounts || mount -t bpf bpf /sys/fs/bpf
grep -q ' cgroup2 ' /proc/mounts || mount -t cgroup2 cgroup2 /sys/fs/cgroup
ip link set lo up
( : > /tmp/.timewait-w && rm -f /tmp/.timewait-w ) 2>/dev/null || mount -t tmpfs tmpfs /tmp
mkdir -p /run/netns 2>/dev/null || { mount -t tmpfs tmpfs /run && mkdir -p /run/netns; }
if ip netns add timewait-probe; then ip netns del timewait-probe; else echo "timewait-guest: warning: ip netns add does not work"; fi
dmesg -n 4"#;

/// The command's status: the file in the rwdir, else the marker line.
fn exit_status(outdir: &Path, console: &[String]) -> Option<Outcome> {
    if let Ok(text) = fs::read_to_string(outdir.join("status"))
        && let Ok(code) = text.trim().parse()
    {
        return Some(Outcome::Exited(code));
    }
    console.iter().rev().find_map(|l| l.split(EXIT_MARKER).nth(1)?.trim().parse().ok()).map(Outcome::Exited)
}

struct Watched {
    /// Set when we killed the guest.
    ended_by: Option<Outcome>,
    boot: Option<Duration>,
    console: Vec<String>,
}

/// Streams the console until vng ends, or kills it (and qemu) at the limit
/// or a hazard.
fn watch(name: &str, child: &mut Child, start: Instant, limit: Duration) -> Watched {
    let (tx, rx) = mpsc::channel();
    if let Some(out) = child.stdout.take() {
        forward(out, tx.clone());
    }
    if let Some(err) = child.stderr.take() {
        forward(err, tx);
    }
    let mut w = Watched { ended_by: None, boot: None, console: Vec::new() };
    let mut hazard: Option<(Outcome, Instant)> = None;
    loop {
        let deadline = hazard.as_ref().map_or(start + limit, |(_, until)| *until);
        let line = match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(line) => line,
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let outcome = hazard.take().map_or(Outcome::TimedOut(limit), |(o, _)| o);
                eprintln!("xtask: [{name}] killing the guest: {outcome}");
                kill_tree(child);
                w.ended_by = Some(outcome);
                break;
            }
        };
        println!("[{name}] {line}");
        if w.boot.is_none() && line.contains(STARTED) {
            w.boot = Some(start.elapsed());
        }
        if hazard.is_none()
            && let Some((_, kind)) = HAZARDS.iter().find(|(pat, _)| line.contains(pat))
        {
            let outcome = Outcome::Killed(*kind, line.trim().to_string());
            eprintln!("xtask: [{name}] {outcome} (reading {} s more)", HAZARD_GRACE.as_secs());
            hazard = Some((outcome, Instant::now() + HAZARD_GRACE));
        }
        w.console.push(line);
    }
    // vng ended by itself just after a hazard: the hazard is still why it failed.
    if w.ended_by.is_none()
        && let Some((outcome, _)) = hazard
    {
        kill_tree(child);
        w.ended_by = Some(outcome);
    }
    w
}

/// One thread per pipe, sending whole lines (console lines end in `\r\n`).
fn forward(pipe: impl Read + Send + 'static, tx: mpsc::Sender<String>) {
    std::thread::spawn(move || {
        let mut reader = BufReader::new(pipe);
        let mut buf = Vec::new();
        while reader.read_until(b'\n', &mut buf).is_ok_and(|n| n > 0) {
            let line = String::from_utf8_lossy(&buf).trim_end_matches(['\r', '\n']).to_string();
            if tx.send(line).is_err() {
                break;
            }
            buf.clear();
        }
    });
}

/// SIGKILL to vng and every process under it (virtme-run, qemu), each by
/// its pid, found by their parent pids in /proc before any is killed.
fn kill_tree(child: &Child) {
    let root = child.id();
    let mut tree = vec![root];
    let parents = parent_pids();
    let mut i = 0;
    while i < tree.len() {
        let pid = tree[i];
        tree.extend(parents.iter().filter(|(_, ppid)| *ppid == pid).map(|(p, _)| *p));
        i += 1;
    }
    for pid in tree.into_iter().rev() {
        let Ok(pid) = i32::try_from(pid) else { continue };
        // SAFETY: kill(2) on a pid we just found under our own child; no
        // memory is involved.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
}

/// (pid, parent pid) of every process, from /proc/PID/stat.
fn parent_pids() -> Vec<(u32, u32)> {
    let Ok(dir) = fs::read_dir("/proc") else { return Vec::new() };
    dir.filter_map(|e| {
        let pid: u32 = e.ok()?.file_name().to_str()?.parse().ok()?;
        let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // `PID (COMM) STATE PPID ...`; COMM may hold spaces and parentheses.
        let ppid = stat.rsplit_once(')')?.1.split_whitespace().nth(1)?.parse().ok()?;
        Some((pid, ppid))
    })
    .collect()
}
