//! Network namespaces: finding and entering them, and what `--all-netns` needs and may remove.
//!
//! `--all-netns`: whether the daemon can find and enter every network
//! namespace (checked once at start), and which namespaces' entries a
//! reconciliation walk may remove (only those it could look into).

use std::collections::HashSet;

use super::LoadError;

/// Why `--all-netns` cannot work here, as one line for stderr; None when it
/// can. The kernel programs see every namespace's events without this; the
/// start-up snapshot and the reconciliation walks must enter each namespace
/// (a TCP iterator walks its creator's), and find them all from `/proc`.
/// A daemon that could not would show other namespaces' sockets from events
/// alone, never heal a lost one, and miss every socket older than itself:
/// counts that look right and are not. So it is refused.
pub fn all_netns_unavailable() -> Option<String> {
    const HOW: &str = "run without --all-netns, or see README \"Every namespace\" for what it needs";
    // setns() into our own namespace: the same check (CAP_SYS_ADMIN, and
    // systemd's RestrictNamespaces= seccomp filter) as into any other.
    let tried = std::thread::spawn(|| -> Result<(), std::io::Error> {
        use std::os::fd::AsRawFd as _;
        let own = std::fs::File::open("/proc/thread-self/ns/net")?;
        // SAFETY: a valid namespace fd; only this short-lived thread moves,
        // and into the namespace it is already in.
        if unsafe { libc::setns(own.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    })
    .join();
    match tried {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            return Some(format!(
                "--all-netns: cannot enter network namespaces (setns: {e}): it needs CAP_SYS_ADMIN, and under systemd \
                 RestrictNamespaces= that allows net; {HOW}"
            ));
        }
        Err(_) => return Some(format!("--all-netns: the namespace check failed; {HOW}")),
    }
    if let Ok(status) = std::fs::read_to_string("/proc/self/status")
        && let Some(line) = status.lines().find(|l| l.starts_with("NSpid:"))
        && line.split_whitespace().count() > 2
    {
        return Some(format!(
            "--all-netns: this process is in a child PID namespace (a container without hostPID: true) and cannot \
             see the host's processes, so not their network namespaces either; {HOW}"
        ));
    }
    if let Some(hidepid) = proc_hidepid() {
        return Some(format!(
            "--all-netns: /proc hides other users' processes (hidepid={hidepid}, e.g. systemd's ProtectProc=), so \
             their network namespaces cannot be found; {HOW}"
        ));
    }
    None
}

/// The `hidepid=` of the `/proc` this process sees, when it hides anything
/// (`/proc/self/mountinfo`: mount point, then after ` - ` the type, source
/// and super options).
fn proc_hidepid() -> Option<String> {
    hidepid_in(&std::fs::read_to_string("/proc/self/mountinfo").ok()?)
}

fn hidepid_in(mountinfo: &str) -> Option<String> {
    mountinfo
        .lines()
        .filter(|l| l.split(' ').nth(4) == Some("/proc"))
        .filter_map(|l| l.split_once(" - ").map(|(_, rest)| rest))
        .filter(|rest| rest.starts_with("proc "))
        .filter_map(|rest| rest.split(' ').nth(2))
        .flat_map(|opts| opts.split(','))
        .filter_map(|o| o.strip_prefix("hidepid="))
        .find(|v| !matches!(*v, "0" | "off"))
        .map(str::to_string)
}

/// One path per network namespace other than `own` (by inode), from
/// processes' `/proc/PID/ns/net` and the named ones in /var/run/netns.
pub fn other_namespaces(own: u32) -> Vec<std::path::PathBuf> {
    use std::os::unix::fs::MetadataExt as _;
    let mut seen = std::collections::BTreeSet::from([u64::from(own)]);
    let mut out = Vec::new();
    let named = std::fs::read_dir("/var/run/netns").into_iter().flatten().flatten().map(|e| e.path());
    let procs = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().bytes().all(|b| b.is_ascii_digit()))
        .map(|e| e.path().join("ns/net"));
    for path in named.chain(procs) {
        if let Ok(md) = std::fs::metadata(&path)
            && seen.insert(md.ino())
        {
            out.push(path);
        }
    }
    out
}

/// Runs `f` in the network namespace at `path`, on a thread of its own
/// that enters it and ends with `f`: no thread that entered another
/// namespace ever runs anything else (a pool thread sent back after a
/// failed return would read the wrong namespace's sysctls and sockets).
pub fn in_netns<T: Send>(
    path: &std::path::Path,
    f: impl FnOnce() -> Result<T, LoadError> + Send,
) -> Result<T, LoadError> {
    use std::os::fd::AsRawFd as _;
    let io = |e: std::io::Error| LoadError::Program { program: "iter_timewait", step: "enter namespace", err: e.to_string() };
    let target = std::fs::File::open(path).map_err(io)?;
    std::thread::scope(|scope| {
        let entered = std::thread::Builder::new().name("in-netns".into()).spawn_scoped(scope, move || {
            // SAFETY: a valid namespace fd; CLONE_NEWNET moves only this
            // thread, which ends when `f` returns.
            if unsafe { libc::setns(target.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(io(std::io::Error::last_os_error()));
            }
            f()
        });
        match entered {
            Ok(handle) => handle.join().unwrap_or_else(|_| {
                Err(LoadError::Program { program: "iter_timewait", step: "enter namespace", err: "the thread panicked".into() })
            }),
            Err(e) => Err(io(e)),
        }
    })
}

/// What one walk looked into.
#[derive(Debug, Default, Clone)]
pub struct Walked {
    /// Namespaces (inode numbers) the walk went through, the daemon's own
    /// included.
    pub walked: HashSet<u32>,
    /// Namespaces found (walked or not).
    pub listed: HashSet<u32>,
    /// Whether every namespace found was entered.
    pub complete: bool,
}

impl Walked {
    /// A walk of the daemon's own namespace only.
    pub fn own(netns: u32) -> Self {
        Self { walked: [netns].into(), listed: [netns].into(), complete: true }
    }

    /// Whether an entry of namespace `netns` that this walk did not find
    /// is gone: the walk looked into its namespace; or that namespace no
    /// longer exists (not found by a walk that entered every namespace it
    /// found; the kernel purged its sockets with it). An entry of a
    /// namespace the walk could not enter is never taken for gone.
    pub fn may_remove(&self, netns: u32) -> bool {
        self.walked.contains(&netns) || (self.complete && !self.listed.contains(&netns))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hidepid_is_read_from_the_proc_mount() {
        let plain = "22 27 0:21 / /proc rw,relatime - proc proc rw\n";
        assert_eq!(hidepid_in(plain), None);
        let off = "22 27 0:21 / /proc rw - proc proc rw,hidepid=0\n";
        assert_eq!(hidepid_in(off), None);
        let unit = "30 29 0:5 / /proc rw,nosuid - proc proc rw,hidepid=invisible\n\
                    31 29 0:6 / /run/x rw - proc proc rw,hidepid=2\n";
        assert_eq!(hidepid_in(unit).as_deref(), Some("invisible"));
    }

    #[test]
    fn only_namespaces_looked_into_or_gone_lose_entries() {
        let mut w = Walked::own(1);
        w.listed.extend([2, 3]);
        w.walked.insert(2);
        w.complete = false; // 3 could not be entered
        assert!(w.may_remove(1) && w.may_remove(2));
        assert!(!w.may_remove(3), "a namespace that could not be entered keeps its counts");
        assert!(!w.may_remove(4), "nor one that may just be out of sight while a walk failed");
        w.complete = true;
        w.listed.remove(&3);
        assert!(w.may_remove(4), "gone: every namespace found was walked and 4 was not found");
    }

    #[test]
    fn in_netns_runs_on_a_thread_of_its_own_that_ends() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            use std::io::Write as _;
            let _ = writeln!(std::io::stderr(), "SKIPPED in_netns_runs_on_a_thread_of_its_own_that_ends: setns needs root");
            return;
        }
        let caller = std::thread::current().id();
        let own = std::fs::read_link("/proc/thread-self/ns/net").unwrap();
        let (ran_on, inside) = in_netns(std::path::Path::new("/proc/self/ns/net"), || {
            Ok((std::thread::current().id(), std::fs::read_link("/proc/thread-self/ns/net").unwrap()))
        })
        .unwrap();
        assert_ne!(ran_on, caller, "a thread of its own");
        assert_eq!(inside, own);
        assert_eq!(std::fs::read_link("/proc/thread-self/ns/net").unwrap(), own, "the caller never moved");
        let e = in_netns(std::path::Path::new("/nonexistent/ns"), || Ok(())).unwrap_err();
        assert!(e.to_string().contains("enter namespace"), "{e}");
    }
}
