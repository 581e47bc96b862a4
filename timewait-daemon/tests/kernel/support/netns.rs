//! The network-namespace guard: a namespace per test, work run inside it on a thread that joined it, its `ss`.

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use crate::support::sockets::{client_closes_first, server_closes_first};
use crate::support::ss::{SeriesKey, SsSocket, group_by_remote, group_by_series, parse_ss};
use crate::support::wait::scaled;

/// How long the workloads wait for their sockets to finish closing.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(10);

static NETNS_COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A named network namespace (`ip netns add`), loopback up, deleted on drop.
pub struct NetNs {
    name: String,
}

impl NetNs {
    #[track_caller]
    pub fn new() -> NetNs {
        let n = NETNS_COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!("tw-{}-{n}", std::process::id());
        run_cmd("ip", &["netns", "add", &name]);
        let ns = NetNs { name };
        run_cmd("ip", &["-n", &ns.name, "link", "set", "lo", "up"]);
        // Workloads count the TIME_WAIT they leave. With loopback reuse (the
        // default, 2), a connect() whose port search comes back to one of its
        // own TIME_WAIT ports (the search's offset is shared with every other
        // namespace's tests) takes that socket over and the count falls one
        // short. The tests of that takeover turn it on themselves.
        ns.run(|| std::fs::write("/proc/sys/net/ipv4/tcp_tw_reuse", "0"))
            .unwrap_or_else(|e| panic!("net.ipv4.tcp_tw_reuse=0 in {}: {e}", ns.name));
        ns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from("/var/run/netns").join(&self.name)
    }

    /// Runs `f` on a fresh thread that first joins this namespace. Sockets
    /// created there belong to the namespace for their whole life, so they
    /// may be handed back to (and used from) any thread.
    #[track_caller]
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = self.path();
        thread::scope(|s| {
            s.spawn(move || {
                enter_netns(&path);
                f()
            })
            .join()
            .unwrap_or_else(|e| std::panic::resume_unwind(e))
        })
    }

    /// Like [`NetNs::run`] but in the background.
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> thread::JoinHandle<T> {
        let path = self.path();
        thread::spawn(move || {
            enter_netns(&path);
            f()
        })
    }

    /// `sysctl -w key=value` inside the namespace (sysctls such as
    /// `ip_local_port_range` are per network namespace).
    #[track_caller]
    pub fn sysctl(&self, key: &str, value: &str) {
        run_cmd(
            "ip",
            &[
                "netns",
                "exec",
                &self.name,
                "sysctl",
                "-w",
                &format!("{key}={value}"),
            ],
        );
    }

    /// Runs a command inside the namespace and returns its stdout.
    #[track_caller]
    pub fn exec(&self, args: &[&str]) -> String {
        let mut all = vec!["netns", "exec", &self.name];
        all.extend_from_slice(args);
        run_cmd("ip", &all)
    }

    // --- ss readers --------------------------------------------------------

    /// Parsed `ss -Htano state <state>` lines.
    pub fn ss(&self, state: &str) -> Vec<SsSocket> {
        parse_ss(&self.exec(&["ss", "-Htano", "state", state]))
    }

    /// `ss -Htan state time-wait | wc -l`.
    pub fn ss_tw_total(&self) -> u64 {
        self.ss("time-wait").len() as u64
    }

    /// TIME_WAIT sockets grouped by peer address (port stripped, IPv4-mapped
    /// IPv6 shown as plain IPv4, as the daemon labels it).
    pub fn ss_tw_by_remote(&self) -> BTreeMap<String, u64> {
        group_by_remote(&self.ss("time-wait"))
    }

    /// TIME_WAIT sockets grouped the way the daemon labels them, given the
    /// listening ports: `(direction, remote, port)`.
    pub fn ss_tw_series(&self, listening: &[u16]) -> BTreeMap<SeriesKey, u64> {
        group_by_series(&self.ss("time-wait"), listening)
    }

    /// TIME_WAIT sockets grouped by `(direction, port)` only.
    pub fn ss_tw_by_direction_port(&self, listening: &[u16]) -> BTreeMap<(String, u16), u64> {
        let mut out = BTreeMap::new();
        for ((d, _r, p), n) in self.ss_tw_series(listening) {
            *out.entry((d, p)).or_insert(0) += n;
        }
        out
    }

    /// FIN-WAIT-2 sockets that are minisockets (the kernel shows a
    /// `timewait` timer for those; an orphaned full socket in FIN_WAIT2 shows
    /// `keepalive`), grouped like [`NetNs::ss_tw_series`].
    pub fn ss_fw2_orphan_series(&self, listening: &[u16]) -> BTreeMap<SeriesKey, u64> {
        let orphans: Vec<SsSocket> = self
            .ss("fin-wait-2")
            .into_iter()
            .filter(|s| {
                s.timer
                    .as_deref()
                    .is_some_and(|t| t.starts_with("timewait"))
            })
            .collect();
        group_by_series(&orphans, listening)
    }

    /// Sockets still on their way to closed (or to TIME_WAIT).
    pub fn ss_transient(&self) -> Vec<SsSocket> {
        // One ss for all of them (the filters OR): under emulation each
        // `ip netns exec ss` takes about a second, and seven per check made
        // a wait_settled take longer than a TIME_WAIT lives.
        let mut args = vec!["ss", "-Htano"];
        for st in ["syn-sent", "syn-recv", "fin-wait-1", "fin-wait-2", "close-wait", "last-ack", "closing"] {
            args.extend(["state", st]);
        }
        parse_ss(&self.exec(&args))
    }

    /// Waits until no socket in the namespace is half-closed, so every close
    /// of a workload has been ACKed and every TIME_WAIT exists.
    #[track_caller]
    pub fn wait_settled(&self) {
        let start = Instant::now();
        loop {
            let last = self.ss_transient();
            if last.is_empty() {
                return;
            }
            if start.elapsed() >= scaled(SETTLE_TIMEOUT) {
                panic!(
                    "sockets in {} still half-closed after {SETTLE_TIMEOUT:?}: {} left, e.g. {:?}",
                    self.name,
                    last.len(),
                    &last[..last.len().min(5)]
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    // --- workloads, run inside the namespace --------------------------------

    /// A listener inside the namespace (kept open by the caller, so the port
    /// is a listening port while the daemon watches).
    #[track_caller]
    pub fn listen(&self, addr: SocketAddr) -> TcpListener {
        self.run(|| TcpListener::bind(addr))
            .unwrap_or_else(|e| panic!("bind listener {addr} in {}: {e}", self.name))
    }

    /// See [`server_closes_first`]; then waits until every close is ACKed.
    #[track_caller]
    pub fn server_closes_first(&self, listener: &TcpListener, clients: &[(IpAddr, usize)]) {
        self.run(|| server_closes_first(listener, clients));
        self.wait_settled();
    }

    /// See [`client_closes_first`]; then waits until every close is ACKed.
    #[track_caller]
    pub fn client_closes_first(&self, listener: &TcpListener, client: Option<IpAddr>, n: usize) {
        self.run(|| client_closes_first(listener, client, n));
        self.wait_settled();
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let out = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
        match out {
            Ok(o) if o.status.success() => {}
            Ok(o) => eprintln!(
                "warning: ip netns del {}: {}",
                self.name,
                String::from_utf8_lossy(&o.stderr).trim()
            ),
            Err(e) => eprintln!("warning: ip netns del {}: {e}", self.name),
        }
    }
}

fn enter_netns(path: &std::path::Path) {
    let f = File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    // SAFETY: `f` is an open namespace file descriptor for the duration of the
    // call; setns only changes this (fresh, test-owned) thread's namespace.
    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        panic!("setns({}): {}", path.display(), io::Error::last_os_error());
    }
}

/// Runs a command to completion; panics with its stderr if it fails.
#[track_caller]
pub fn run_cmd(prog: &str, args: &[&str]) -> String {
    let out = Command::new(prog)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {prog} {args:?}: {e}"));
    if !out.status.success() {
        panic!(
            "{prog} {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    String::from_utf8(out.stdout).expect("command output is UTF-8")
}
