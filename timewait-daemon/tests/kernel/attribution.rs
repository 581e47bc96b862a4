//! Issue 14: which service holds the ports. With `--attribute-cgroups`, two
//! clients in cgroups of their own (made here, in the cgroup2 hierarchy
//! found from /proc/self/mountinfo) run `bash`, which no one here wrote,
//! opening connections with `/dev/tcp` toward one destination of the test's
//! namespace (100 local ports). Client B holds 5 connections open, client A
//! opens and closes first the rest until `connect()` fails with
//! EADDRNOTAVAIL. The ports in use, A's TIME_WAIT and the error carry each
//! client's cgroup (and
//! the error its destination); the exhaustion ratio stays per destination;
//! the server's own TIME_WAIT carry the cgroup of the process that listens.

use std::collections::{BTreeMap, BTreeSet};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::support::{Daemon, Metrics, NetNs, connect_from_port, quiet_equal, require_root, v4};
use crate::support::ports::{exhaustion_ratio, lo4, set_port_range};

const LO: u16 = 42000;
const HI: u16 = 42099;
const PORT: u16 = 5400;
const B_PORTS: u64 = 5;
const RANGE: u64 = (HI - LO + 1) as u64;

/// The cgroup2 mount point of this process's mount namespace.
fn cgroup2_root() -> Option<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    text.lines().find_map(|l| {
        let (left, right) = l.split_once(" - ")?;
        if right.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        Some(PathBuf::from(left.split_whitespace().nth(4)?))
    })
}

/// A cgroup made for the test, removed when dropped (its processes gone).
struct Cgroup {
    path: PathBuf,
    /// Its path inside the hierarchy: the daemon's label for it.
    label: String,
}

impl Cgroup {
    #[track_caller]
    fn new(root: &Path, name: &str) -> Cgroup {
        let path = root.join(name);
        std::fs::create_dir(&path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
        Cgroup { path, label: format!("/{name}") }
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir(&self.path) {
            eprintln!("warning: rmdir {}: {e}", self.path.display());
        }
    }
}

/// `bash -c script` as a process of cgroup `cg` (it joins before it execs)
/// in namespace `ns`.
fn bash_in(cg: &Cgroup, ns: &NetNs, script: &str) -> Command {
    let procs = cg.path.join("cgroup.procs");
    let mut c = Command::new("sh");
    c.args(["-c", &format!("echo $$ > '{}' && exec ip netns exec {} bash -c '{script}'", procs.display(), ns.name())]);
    c
}

/// Runs `bash` in cgroup `cg` and namespace `ns`: up to `n` connections to
/// 127.0.0.1:`port`, each closed by bash first; returns how many it made and
/// whether one failed (bash prints the failure).
#[track_caller]
fn bash_client(cg: &Cgroup, ns: &NetNs, port: u16, n: u64) -> (u64, bool) {
    let script = format!(
        "i=0; while [ $i -lt {n} ]; do \
           if ! : 2>/dev/null <>/dev/tcp/127.0.0.1/{port}; then echo \"made $i, then failed\"; exit 0; fi; \
           i=$((i+1)); \
         done; echo \"made $i\""
    );
    let out = bash_in(cg, ns, &script)
        .output()
        .unwrap_or_else(|e| panic!("sh: {e}"));
    let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(out.status.success(), "client in {}: {:?} {text} {}", cg.label, out.status, String::from_utf8_lossy(&out.stderr));
    let made = text
        .strip_prefix("made ")
        .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|d| d.parse().ok())
        .unwrap_or_else(|| panic!("client in {}: {text:?}", cg.label));
    (made, text.ends_with("failed"))
}

/// Runs `bash` in cgroup `cg` and namespace `ns` holding `n` connections to
/// 127.0.0.1:`port` open until the returned child's stdin closes (open
/// connections hold their ports however slow an emulated guest is, where
/// TIME_WAIT made early in a test can end before its last check).
#[track_caller]
fn bash_holder(cg: &Cgroup, ns: &NetNs, port: u16, n: u64) -> std::process::Child {
    let script = format!(
        "for ((i = 0; i < {n}; i++)); do exec {{fd}}<>/dev/tcp/127.0.0.1/{port} || exit 1; done; echo \"holding {n}\"; read -r _ || exit 0"
    );
    let mut child = bash_in(cg, ns, &script)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("sh: {e}"));
    let mut line = String::new();
    let out = child.stdout.take().expect("stdout");
    std::io::BufRead::read_line(&mut std::io::BufReader::new(out), &mut line).expect("holder's output");
    assert_eq!(line.trim(), format!("holding {n}"), "client in {} did not open its {n} connections", cg.label);
    child
}

/// Local ports of the namespace's sockets toward 127.0.0.1:`PORT`, any state.
fn ss_ports(ns: &NetNs, state: &str) -> Vec<u16> {
    ns.exec(&["ss", "-Htan", "state", state, "dst", &format!("127.0.0.1:{PORT}")])
        .lines()
        .filter_map(|l| {
            // With one state asked for, ss leaves the state column out.
            let f: Vec<&str> = l.split_whitespace().collect();
            let local = if f.first()?.parse::<u64>().is_ok() { f.get(2)? } else { f.get(3)? };
            local.rsplit(':').next()?.parse().ok()
        })
        .collect()
}

/// Accepts until `stop` (then one more connection wakes it): each
/// connection on a thread of its own that reads to the client's EOF and
/// closes. Blocking, not polling: a polling loop took a CPU of the emulated
/// guests for the whole test, and the tests beside it ran past the 60 s
/// their TIME_WAIT live.
fn serve(listener: TcpListener, stop: Arc<AtomicBool>) {
    for s in listener.incoming() {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let Ok(s) = s else { continue };
        std::thread::spawn(move || {
            let mut b = [0u8; 16];
            while matches!(std::io::Read::read(&mut &s, &mut b), Ok(n) if n > 0) {}
        });
    }
}

/// `name` series by (cgroup label) for one destination.
fn by_cgroup(m: &Metrics, name: &str, filters: &[(&str, &str)]) -> BTreeMap<String, u64> {
    m.series(name)
        .into_iter()
        .filter(|(l, _)| filters.iter().all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v)))
        .map(|(l, v)| (l.get("cgroup").cloned().unwrap_or_else(|| "<none>".into()), v as u64))
        .collect()
}

#[test]
fn cgroups_own_ports_sockets_and_errors() {
    if !require_root("attribution::cgroups_own_ports_sockets_and_errors") {
        return;
    }
    let root = cgroup2_root().expect("no cgroup2 hierarchy in /proc/self/mountinfo (the kernel matrix mounts one)");
    let ns = NetNs::new();
    set_port_range(&ns, LO, HI);
    let listener = ns.listen(lo4(PORT));
    let server = ns.listen("127.0.0.1:8080".parse().unwrap());
    let stop = Arc::new(AtomicBool::new(false));
    let accepter = {
        let stop = stop.clone();
        std::thread::spawn(move || serve(listener, stop))
    };
    // nsenter, not `ip netns exec`: the latter hides /sys/fs/cgroup, and on
    // hosts where /proc/1/root is closed to us the names would be ids.
    let daemon = Daemon::start_nsenter(&ns, &["--attribute-cgroups"]);
    let pid = std::process::id();
    let a = Cgroup::new(&root, &format!("tw-{pid}-client-a"));
    let b = Cgroup::new(&root, &format!("tw-{pid}-client-b"));

    let mut holder = bash_holder(&b, &ns, PORT, B_PORTS);
    let made_b = B_PORTS;
    // B's local ports: what ss shows toward the destination now.
    let b_ports: BTreeSet<u16> = ss_ports(&ns, "all").into_iter().collect();
    assert_eq!(b_ports.len() as u64, B_PORTS, "ss after client B");
    let (made_a, failed_a) = bash_client(&a, &ns, PORT, 2 * RANGE);
    assert!(failed_a, "client A never saw connect() fail ({made_a} made)");
    assert!(made_a + made_b >= RANGE, "{made_a} + {made_b} connections, yet connect() failed with {RANGE} ports");
    ns.wait_settled();
    let own = std::fs::read_to_string("/proc/self/cgroup").expect("/proc/self/cgroup");
    let own = own.lines().find_map(|l| l.strip_prefix("0::")).expect("a cgroup v2 line in /proc/self/cgroup");

    let dest = [("remote", "127.0.0.1"), ("port", "5400")];
    // The oracle: ss's sockets toward the destination, B's by their ports,
    // the others A's (bash reopening its sockets fast sees a few of its
    // TIME_WAIT end early, on this kernel without the daemon too: counting
    // what is there, not what was made, keeps the comparison exact).
    let by_owner = |state: &str| -> BTreeMap<String, u64> {
        let mut m = BTreeMap::new();
        for p in ss_ports(&ns, state) {
            let owner = if b_ports.contains(&p) { &b.label } else { &a.label };
            *m.entry(owner.clone()).or_default() += 1;
        }
        m
    };
    let want = quiet_equal(
        "outbound ports in use toward 127.0.0.1:5400 by cgroup, daemon vs ss",
        || by_owner("all"),
        || by_cgroup(&daemon.scrape(), "timewait_outbound_ports_in_use", &dest),
    );
    assert_eq!(want.keys().collect::<Vec<_>>(), [&a.label, &b.label], "both clients' cgroups: {want:?}");
    let mut tw_dest = dest.to_vec();
    tw_dest.push(("direction", "outbound"));
    // Their TIME_WAIT too: the owner read before the socket let go.
    quiet_equal(
        "TIME_WAIT toward 127.0.0.1:5400 by cgroup, daemon vs ss",
        || by_owner("time-wait"),
        || by_cgroup(&daemon.scrape(), "timewait_sockets", &tw_dest),
    );
    // One ratio per destination (the cgroups share its range), of what ss
    // shows held toward it.
    quiet_equal(
        "ports held toward 127.0.0.1:5400, exhaustion ratio x range vs ss",
        || ss_ports(&ns, "all").len() as u64,
        || (exhaustion_ratio(&daemon.scrape(), "127.0.0.1", PORT) * RANGE as f64).round() as u64,
    );
    let m = daemon.scrape();
    let ratios = m.series("timewait_port_exhaustion_ratio").into_iter().filter(|(l, _)| l.get("port").map(String::as_str) == Some("5400")).count();
    assert_eq!(ratios, 1, "one ratio series for the destination, no cgroup label");
    // The server's own TIME_WAIT: owned by whoever listens (this process).
    // Made last, so that no slow comparison above (seconds per `ss` under an
    // emulator) outlasts their 60 s.
    ns.server_closes_first(&server, &[(v4(127, 0, 0, 2), 3)]);
    let inbound_filter = [("direction", "inbound"), ("remote", "127.0.0.2")];
    let inbound = quiet_equal(
        "the server's TIME_WAIT from 127.0.0.2, daemon vs ss",
        || ns.ss_tw_series(&[8080]).get(&("inbound".to_string(), "127.0.0.2".to_string(), 8080)).copied().unwrap_or(0),
        || by_cgroup(&daemon.scrape(), "timewait_sockets", &inbound_filter).values().sum::<u64>(),
    );
    assert_eq!(inbound, 3, "ss shows the server's 3 TIME_WAIT");
    let own_label = timewait_label(own);
    assert_eq!(
        by_cgroup(&daemon.scrape(), "timewait_sockets", &inbound_filter),
        [(own_label.clone(), 3)].into(),
        "the server's TIME_WAIT belong to the listener's cgroup ({own})"
    );

    let (reserved, errors): (Vec<_>, Vec<_>) = m
        .series("timewait_connect_errors_total")
        .into_iter()
        .filter(|(l, _)| l.get("errno").map(String::as_str) == Some("EADDRNOTAVAIL"))
        .partition(|(l, _)| l.get("comm").map(String::as_str) == Some("other"));
    // comm="other" (errors beyond the table or the busiest names) exists
    // from the start; nothing went there.
    assert_eq!(reserved.iter().map(|(_, v)| *v).sum::<f64>(), 0.0, "EADDRNOTAVAIL under comm=\"other\": {reserved:?}");
    let expected_labels: BTreeMap<String, String> = [
        ("errno", "EADDRNOTAVAIL"),
        ("comm", "bash"),
        ("cgroup", a.label.as_str()),
        ("remote", "127.0.0.1"),
        ("port", "5400"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    assert_eq!(errors, vec![(expected_labels, 1.0)], "one EADDRNOTAVAIL, client A's, toward its destination");

    drop(holder.stdin.take());
    let status = holder.wait().expect("client B");
    assert!(status.success(), "client B: {status}");
    stop.store(true, Ordering::Relaxed);
    // The range may still be full: wake the accept from a port outside it.
    ns.run(|| connect_from_port("127.0.0.1:5999".parse().unwrap(), lo4(PORT))).expect("waking the accept thread");
    accepter.join().expect("accept thread");
    drop(daemon);
    drop(ns);
}

/// What the daemon calls a cgroup path (the rule of `src/model/cgroups.rs`,
/// restated: a systemd service, else a scope, else the path).
fn timewait_label(path: &str) -> String {
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    if let Some(u) = parts.iter().rev().find(|p| p.ends_with(".service")) {
        return (*u).to_string();
    }
    if let Some(s) = parts.last().filter(|p| p.ends_with(".scope")) {
        return (*s).to_string();
    }
    format!("/{}", parts.join("/"))
}
