//! The bench's network namespaces (deleted on drop, stale ones removed), and timewaitd processes it did not start.

#[allow(clippy::wildcard_imports)]
use super::*;

/// A network namespace, deleted on drop.
pub(super) struct Netns {
    pub(super) name: String,
    pub(super) file: File,
}

impl Netns {
    pub(super) fn new(tag: &str) -> Result<Self> {
        let name = format!("twbench-{}-{tag}", std::process::id());
        quiet(Command::new("ip").args(["netns", "add", &name]))?;
        let file = match File::open(format!("/run/netns/{name}")) {
            Ok(f) => f,
            Err(e) => {
                let _ = quiet(Command::new("ip").args(["netns", "del", &name]));
                return Err(e).context("open /run/netns");
            }
        };
        let ns = Netns { name, file };
        quiet(Command::new("ip").args(["-n", &ns.name, "link", "set", "lo", "up"]))?;
        Ok(ns)
    }

    /// Room for the sockets: TIME_WAIT buckets and the whole port range.
    pub(super) fn roomy(tag: &str, sockets: usize) -> Result<Self> {
        let ns = Self::new(tag)?;
        ns.sysctl("net.ipv4.tcp_max_tw_buckets", &(sockets * 2).max(262_144).to_string())?;
        ns.sysctl("net.ipv4.ip_local_port_range", "1024 65535")?;
        Ok(ns)
    }

    pub(super) fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        quiet(self.command("sysctl").args(["-qw", &format!("{key}={value}")]))
    }

    /// A command that runs inside the namespace (setns between fork and exec).
    pub(super) fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new(program);
        let fd = self.file.as_raw_fd();
        // SAFETY: setns is async-signal-safe; fd stays open while self lives,
        // and the command is spawned while self is borrowed.
        unsafe {
            c.pre_exec(move || {
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        c
    }

    /// Moves the calling thread into the namespace (worker threads only).
    pub(super) fn enter(&self) -> std::io::Result<()> {
        // SAFETY: plain syscall on a valid fd; affects this thread only.
        if unsafe { libc::setns(self.file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Runs `f` on a thread inside the namespace.
    pub(super) fn within<R: Send>(&self, f: impl FnOnce() -> std::io::Result<R> + Send) -> std::io::Result<R> {
        std::thread::scope(|s| {
            s.spawn(|| {
                self.enter()?;
                f()
            })
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("thread panicked")))
        })
    }

    /// Minisockets in the namespace (`tw` of /proc/net/sockstat: TIME_WAIT and FIN_WAIT2).
    pub(super) fn tw_count(&self) -> Result<u64> {
        let text = self.within(|| std::fs::read_to_string("/proc/thread-self/net/sockstat"))?;
        text.lines()
            .find_map(|l| l.strip_prefix("TCP: "))
            .and_then(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                f.windows(2).find(|w| w[0] == "tw").and_then(|w| w[1].parse().ok())
            })
            .context("no tw in /proc/net/sockstat")
    }

    pub(super) fn connect(&self, addr: SocketAddrV4) -> std::io::Result<TcpStream> {
        self.within(|| TcpStream::connect_timeout(&SocketAddr::V4(addr), Duration::from_secs(2)))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = quiet(Command::new("ip").args(["netns", "del", &self.name])) {
            eprintln!("bench: cannot delete namespace {}: {e:#}", self.name);
        }
    }
}

/// Namespaces left by a bench that was killed (its pid is gone).
pub(super) fn remove_stale_namespaces() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else { return };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let Some(rest) = name.strip_prefix("twbench-") else { continue };
        let pid = rest.split('-').next().unwrap_or("");
        if !Path::new(&format!("/proc/{pid}")).exists() {
            progress(format!("removing namespace {name} left by an earlier run"));
            let _ = quiet(Command::new("ip").args(["netns", "del", name]));
        }
    }
}

pub(super) fn quiet(cmd: &mut Command) -> Result<()> {
    let out = cmd.stdin(Stdio::null()).output().with_context(|| format!("cannot start {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// timewaitd processes not started by this bench.
pub(super) fn foreign_daemons() -> Vec<u32> {
    let mut v = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else { return v };
    for e in dir.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else { continue };
        if std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "timewaitd") {
            v.push(pid);
        }
    }
    v
}
