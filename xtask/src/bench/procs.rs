//! Child processes stopped on drop, and what a process costs: CPU seconds, RSS.

#[allow(clippy::wildcard_imports)]
use super::*;

/// A child process, stopped (SIGTERM, then SIGKILL) on drop.
pub(super) struct Proc {
    pub(super) what: String,
    pub(super) child: Child,
    pub(super) log: PathBuf,
}

impl Proc {
    pub(super) fn spawn(what: &str, mut cmd: Command, log: PathBuf) -> Result<Self> {
        let f = File::create(&log).with_context(|| format!("create {}", log.display()))?;
        cmd.stdin(Stdio::null()).stdout(f.try_clone()?).stderr(f);
        let child = cmd.spawn().with_context(|| format!("cannot start {what}"))?;
        Ok(Proc { what: what.to_string(), child, log })
    }

    pub(super) fn pid(&self) -> u32 {
        self.child.id()
    }

    pub(super) fn check_alive(&mut self) -> Result<()> {
        if let Some(st) = self.child.try_wait()? {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(10).collect::<Vec<_>>().into_iter().rev().collect();
            bail!("{} exited ({st}); last lines of {}:\n{}", self.what, self.log.display(), tail.join("\n"));
        }
        Ok(())
    }

    pub(super) fn stop(&mut self) {
        if self.child.try_wait().ok().flatten().is_some() {
            return;
        }
        let pid = self.child.id() as libc::pid_t;
        // SAFETY: signalling our own child, which has not been reaped.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if self.child.try_wait().ok().flatten().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

/// utime + stime of a process (all its threads), in seconds.
pub(super) fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')').context("bad /proc/PID/stat")? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); utime is field 14, stime 15.
    let ticks: u64 = f[11].parse::<u64>()? + f[12].parse::<u64>()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok(ticks as f64 / hz)
}

/// (VmRSS, VmHWM) in kB.
pub(super) fn rss_kb(pid: u32) -> Result<(u64, u64)> {
    let st = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let get = |k: &str| -> u64 {
        st.lines()
            .find_map(|l| l.strip_prefix(k))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    Ok((get("VmRSS:"), get("VmHWM:")))
}
