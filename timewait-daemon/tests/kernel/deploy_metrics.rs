//! Issue 5: every `timewait_*` metric name that the shipped dashboard, alert
//! rules and Kubernetes manifests (`deploy/`) use is a metric family in a live
//! daemon's `/metrics`. A renamed metric would otherwise leave an empty panel
//! or an alert that can never fire, with no error anywhere.
//!
//! Families with no series are not exposed at all, so a little traffic first
//! makes each of them exist: server-side and client-side TIME_WAIT, a
//! FIN_WAIT2 orphan, one SYN into a TIME_WAIT (which also ends a minisocket,
//! filling the lifetime histogram) and one `bind()` failing with EADDRINUSE.
//!
//! The NAT side's names (the dashboard's NAT row, the NAT alerts) come from a
//! second daemon with `--nat on` on a router namespace that masquerades two
//! UDP flows onto one port: one gets it, the other is dropped for want of a
//! port. `timewait_nat_allocation_failures_total` (per destination, from
//! kfree_skb's drop reason) is required where the daemon says it serves
//! them (`timewait_probe_path{signal="nat_failures",path="tracepoint"}`);
//! elsewhere (Linux before 5.18, or a daemon without that signal) the rules
//! fall back to conntrack's `insert_failed`, and its absence is only noted.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io;
use std::net::{SocketAddr, SocketAddrV4, TcpListener};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::support::nat::{CLIENT, Nat, Router, have, udp_send};
use crate::support::{Daemon, NetNs, require_root, server_closes_first_clients_stay, v4, wait_eof};
use crate::support::syn::fixed_port_client;

/// The files whose metric names must exist, relative to `deploy/`: a
/// directory means every file in it.
const DEPLOY_SOURCES: [&str; 3] = ["grafana", "prometheus/timewait.rules.yml", "kubernetes"];

/// How long the families may take to appear (a SYN reuse is resolved by the
/// daemon shortly after it happened).
const APPEAR_TIMEOUT: Duration = Duration::from_secs(20);

/// Served only where the kernel tells which destination a NAT drop was for
/// (see the module's comment): (name, the `timewait_probe_path` signal that
/// says so, the path that serves it).
const WHERE_SERVED: [(&str, &str, &str); 1] =
    [("timewait_nat_allocation_failures_total", "nat_failures", "tracepoint")];

#[test]
fn deploy_metrics() {
    if !require_root("deploy_metrics") {
        return;
    }
    let used = names_used_in_deploy();
    assert!(
        used.contains_key("timewait_sockets"),
        "the scan of deploy/ found no timewait_sockets; is it broken? found {used:?}"
    );

    let ns = NetNs::new();
    let inbound = ns.listen("127.0.0.1:8080".parse().unwrap());
    let outbound = ns.listen("127.0.0.1:9090".parse().unwrap());
    // bind() errors are among what the dashboards use: counted on every path.
    let daemon = Daemon::start(&ns, &["--syscall-tracepoints"]);

    // Inbound TIME_WAIT (server closes first) and outbound (client closes
    // first): sockets, inbound_remote_port_ratio, outbound_ports_in_use,
    // port_exhaustion_ratio, created_total.
    ns.server_closes_first(&inbound, &[(v4(127, 0, 0, 3), 5)]);
    ns.client_closes_first(&outbound, Some(v4(127, 0, 0, 4)), 5);
    // One SYN from a fixed client port into the server's TIME_WAIT: syn_total,
    // syn_rejected_total, closed_total{reason="reused_by_syn"}, lifetime.
    syn_into_time_wait(&ns, &inbound);
    // bind() to a listening port: connect_errors_total{errno="EADDRINUSE"}.
    let err = ns
        .run(|| TcpListener::bind("127.0.0.1:8080"))
        .expect_err("binding a second listener to 127.0.0.1:8080 must fail");
    assert_eq!(err.kind(), io::ErrorKind::AddrInUse, "bind: {err}");
    // A FIN_WAIT2 orphan (we closed, the client stays open): kept until the
    // scrapes are done.
    let open_clients =
        ns.run(|| server_closes_first_clients_stay(&inbound, &[(v4(127, 0, 0, 5), 1)]));

    // The NAT side: two UDP flows toward one destination through one NAT
    // port: ports in use, TIME_WAIT (0), ratio, the range from the ruleset,
    // conntrack's entries, limit and stats, the dump's own gauges, and one
    // allocation failure.
    assert!(have("iptables"), "deploy_metrics needs `iptables` (Debian package iptables; `cargo xtask test` installs it)");
    let lab = Router::new(Nat::IptablesMasquerade { protocols: &["udp"], ports: "40000-40000" }, 1);
    let server = Router::server(5000);
    let _udp_server = lab.s.run(|| std::net::UdpSocket::bind(server)).expect("bind the UDP server");
    let nat_daemon = Daemon::start(&lab.r, &["--nat", "on", "--nat-interval", "1"]);
    for _ in 0..2 {
        udp_send(&lab.c, CLIENT, server);
    }

    let start = Instant::now();
    let (families, nat_served, missing) = loop {
        let mut families = live_families(&daemon);
        let (nat_families, nat_paths) = live_families_and_paths(&nat_daemon);
        families.extend(nat_families);
        let served = |name: &str| {
            WHERE_SERVED.iter().filter(|(n, _, _)| *n == name).all(|(_, signal, path)| {
                nat_paths.get(*signal).map(String::as_str) == Some(*path)
            })
        };
        let missing: Vec<String> = used
            .iter()
            .filter(|(name, _)| !exposed(name, &families) && served(name))
            .map(|(name, files)| format!("{name} (used in {})", files.join(", ")))
            .collect();
        if missing.is_empty() || start.elapsed() >= APPEAR_TIMEOUT {
            break (families, nat_paths, missing);
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    drop(open_clients);
    for (name, signal, path) in WHERE_SERVED {
        if used.contains_key(name) && !exposed(name, &families) {
            eprintln!(
                "deploy_metrics: {name} not checked: timewait_probe_path{{signal=\"{signal}\"}} is {:?} here, not {path:?} \
                 (the rules fall back to conntrack's insert_failed)",
                nat_served.get(signal)
            );
        }
    }
    eprintln!(
        "deploy_metrics: {} names used in deploy/, {} families exposed",
        used.len(),
        families.len()
    );
    if !missing.is_empty() {
        panic!(
            "{} metric name(s) used in deploy/ are not families of a live daemon's /metrics \
             (after {APPEAR_TIMEOUT:?}):\n  {}\nexposed families: {:?}",
            missing.len(),
            missing.join("\n  "),
            families.keys().collect::<Vec<_>>()
        );
    }
}

/// `name` is a family, or a histogram/summary family's `_bucket`/`_sum`/`_count`.
fn exposed(name: &str, families: &BTreeMap<String, String>) -> bool {
    if families.contains_key(name) {
        return true;
    }
    ["_bucket", "_sum", "_count"].iter().any(|suffix| {
        name.strip_suffix(suffix).is_some_and(|base| {
            matches!(
                families.get(base).map(String::as_str),
                Some("histogram" | "summary")
            )
        })
    })
}

/// `# TYPE name type` lines of `/metrics`: name -> type.
fn live_families(daemon: &Daemon<'_>) -> BTreeMap<String, String> {
    live_families_and_paths(daemon).0
}

/// The families, and `timewait_probe_path`'s signal -> path.
fn live_families_and_paths(daemon: &Daemon<'_>) -> (BTreeMap<String, String>, BTreeMap<String, String>) {
    let (code, body) = daemon.get("/metrics");
    assert_eq!(code, 200, "GET /metrics: {body}");
    let families = body
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            Some((it.next()?.to_string(), it.next()?.to_string()))
        })
        .collect();
    let paths = crate::support::Metrics::parse(&body)
        .series("timewait_probe_path")
        .into_iter()
        .filter(|(_, v)| *v == 1.0)
        .filter_map(|(l, _)| Some((l.get("signal")?.clone(), l.get("path")?.clone())))
        .collect();
    (families, paths)
}

/// Every `timewait_[a-z0-9_]+` in the deploy files: name -> files using it.
fn names_used_in_deploy() -> BTreeMap<String, Vec<String>> {
    let deploy = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy");
    let mut files: Vec<PathBuf> = Vec::new();
    for source in DEPLOY_SOURCES {
        let path = deploy.join(source);
        if path.is_dir() {
            let mut entries: Vec<PathBuf> = fs::read_dir(&path)
                .unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
                .map(|e| e.expect("directory entry").path())
                .filter(|p| p.is_file())
                .collect();
            entries.sort();
            assert!(!entries.is_empty(), "{} is empty", path.display());
            files.extend(entries);
        } else {
            files.push(path);
        }
    }
    let mut used: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in &files {
        let text =
            fs::read_to_string(file).unwrap_or_else(|e| panic!("read {}: {e}", file.display()));
        let short = file
            .strip_prefix(&deploy)
            .unwrap_or(file)
            .display()
            .to_string();
        for name in scan_metric_names(&text) {
            used.entry(name).or_default().insert(short.clone());
        }
    }
    used.into_iter()
        .map(|(n, f)| (n, f.into_iter().collect()))
        .collect()
}

/// The words `timewait_[a-z0-9_]+` (not part of a longer identifier).
fn scan_metric_names(text: &str) -> BTreeSet<String> {
    const PREFIX: &str = "timewait_";
    let bytes = text.as_bytes();
    let ident = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let mut out = BTreeSet::new();
    let mut from = 0;
    while let Some(i) = text[from..].find(PREFIX).map(|i| from + i) {
        let mut end = i + PREFIX.len();
        while end < bytes.len() && matches!(bytes[end], b'a'..=b'z' | b'0'..=b'9' | b'_') {
            end += 1;
        }
        let standalone = i == 0 || !ident(bytes[i - 1]);
        let name = text[i..end].trim_end_matches('_');
        if standalone && name.len() > PREFIX.len() {
            out.insert(name.to_string());
        }
        from = end;
    }
    out
}

#[test]
fn scan_metric_names_finds_words() {
    let names = scan_metric_names(
        "expr: sum(rate(timewait_syn_total{a=\"b\"}[5m])) / x_timewait_no \
         timewait_lifetime_seconds_bucket timewaitd timewait_",
    );
    let want: BTreeSet<String> = ["timewait_lifetime_seconds_bucket", "timewait_syn_total"]
        .map(String::from)
        .into();
    assert_eq!(names, want);
}

/// Two connections from the same client port to `listener`, the server
/// closing first each time: the second SYN arrives for the 4-tuple the
/// server's TIME_WAIT still holds. Accepted (timestamps newer) or rejected,
/// it counts in `timewait_syn_total`; the connect succeeds either way (a
/// rejected SYN is answered with an ACK, the client resets that minisocket
/// and its retransmitted SYN gets through).
fn syn_into_time_wait(ns: &NetNs, listener: &TcpListener) {
    let client: SocketAddrV4 = "127.0.0.6:40000".parse().unwrap();
    let SocketAddr::V4(server) = listener.local_addr().expect("listener address") else {
        panic!("IPv4 listener expected");
    };
    for round in 0..2 {
        ns.run(|| {
            let c = fixed_port_client(client, server)
                .unwrap_or_else(|e| panic!("round {round}: {e}"));
            let (s, _) = listener.accept().expect("accept");
            drop(s);
            wait_eof(&c);
        });
        ns.wait_settled();
    }
}
