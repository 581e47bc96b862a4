//! Issue 25: what folded series say is true of one real destination, and
//! counters never go back while the folding moves.
//!
//! - Four outbound destinations holding 70, 60, 60 and 60 ports of a 100-port
//!   range, shown with `--top-remotes 1 --top-ports 1` (and with
//!   `--aggregate-ipv4-prefix 24`): the folded series sum 120 or 190 ports,
//!   yet no ratio is above the busiest real destination's 0.70 and no time
//!   to exhaustion is 0 while no range is full; once one destination inside
//!   a fold does fill its range, that series reads 1.0 and 0 s.
//! - SYNs hitting TIME_WAIT from remotes whose rank changes (`--top-remotes
//!   1`): no counter or histogram series decreases between two scrapes
//!   (every scrape a test takes is checked, `support/counters.rs`), and the
//!   series sum to every SYN sent.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use crate::support::{Daemon, Metrics, NetNs, require_root, segments_available, v4};
use crate::support::ports::{set_port_range, ss_outbound_in_use};
use crate::support::syn::{sa4, wait_count};
use crate::syn_reuse::reconnect_from_fixed_port;

const LO: u16 = 40000;
const HI: u16 = 40099;

/// (remote, port) label -> value of one family.
fn by_series(m: &Metrics, name: &str) -> BTreeMap<(String, String), f64> {
    m.series(name)
        .into_iter()
        .map(|(l, v)| ((l["remote"].clone(), l["port"].clone()), v))
        .collect()
}

fn key(remote: &str, port: &str) -> (String, String) {
    (remote.to_string(), port.to_string())
}

/// Ports held per destination, as `ss` shows them: the oracle.
type Held = BTreeMap<(String, u16), u64>;

/// The four destinations of the issue, `n` client-first closes each: their
/// client side holds the ports in TIME_WAIT. Returns once the daemon's
/// ports in use sum to what `ss` shows, with what `ss` shows per
/// destination: 70, 60, 60 and 60, or one short where the kernel left one
/// close without TIME_WAIT (seen in clean-clone CI: 59 toward 127.0.0.2;
/// the daemon agreed with ss), so the expectations below come from ss.
fn four_destinations(ns: &NetNs, daemon: &Daemon) -> (Vec<std::net::TcpListener>, Held) {
    let dests: [(IpAddr, u16, usize); 4] =
        [(v4(127, 0, 0, 1), 5000, 70), (v4(127, 0, 0, 1), 5001, 60), (v4(127, 0, 0, 2), 5000, 60), (v4(127, 0, 0, 3), 5000, 60)];
    let mut listeners = Vec::new();
    for (ip, port, n) in dests {
        let l = ns.listen(SocketAddr::new(ip, port));
        ns.client_closes_first(&l, None, n);
        listeners.push(l);
    }
    let agreed = crate::support::quiet_equal(
        "ports in use toward the four destinations, summed",
        || ss_outbound_in_use(ns, LO, HI).values().sum::<u64>(),
        // Less the scrape's own connection (toward 127.0.0.1:19868, folded
        // into port="other" with the others), which ss never sees.
        || by_series(&daemon.scrape(), "timewait_outbound_ports_in_use").values().sum::<f64>() as u64 - 1,
    );
    let held = ss_outbound_in_use(ns, LO, HI);
    assert_eq!(agreed, held.values().sum::<u64>(), "ss at the quiet moment and after: {held:?}");
    for (ip, port, n) in dests {
        let got = held.get(&(ip.to_string(), port)).copied().unwrap_or(0);
        assert!(got == n as u64 || got + 1 == n as u64, "{n} client-first closes toward {ip}:{port} left {got} (ss): {held:?}");
    }
    (listeners, held)
}

/// The folded sums themselves equal what ss shows, summed the same way;
/// `scrapes` (the series holding 127.0.0.1:19868) also holds the test's own
/// HTTP connection, and the one before it where the daemon has not yet seen
/// that one close (seen on 6.1's kprobe path): 1 or 2 more.
#[track_caller]
fn assert_sums(m: &Metrics, want: &BTreeMap<(String, String), u64>, scrapes: &(String, String)) {
    let got = by_series(m, "timewait_outbound_ports_in_use");
    assert_eq!(got.keys().collect::<Vec<_>>(), want.keys().collect::<Vec<_>>(), "the folded series: {got:?}");
    for (k, n) in want {
        let v = got[k] as u64;
        let ok = if k == scrapes { (n + 1..=n + 2).contains(&v) } else { v == *n };
        assert!(ok, "ports in use of {k:?}: {v}, ss {n} (the scrape's own in {scrapes:?}); all: {got:?}");
    }
}

/// What `ss` shows toward ip:port.
fn held_toward(held: &Held, ip: &str, port: u16) -> u64 {
    held.get(&(ip.to_string(), port)).copied().unwrap_or(0)
}

/// `n` of the 100 ports, as the daemon computes it.
fn of_range(n: u64) -> f64 {
    n as f64 / 100.0
}

/// A scrape with a time to exhaustion for every series that has a ratio
/// (the estimates follow the first walk of the per-socket tables, within a
/// second or so of the load).
#[track_caller]
fn with_estimates(daemon: &Daemon) -> Metrics {
    let mut m = daemon.scrape();
    crate::support::wait_until(std::time::Duration::from_secs(10), "an estimate for every series with a ratio", || {
        m = daemon.scrape();
        let ratios: Vec<_> = by_series(&m, "timewait_port_exhaustion_ratio").into_keys().collect();
        let secs: Vec<_> = by_series(&m, "timewait_port_exhaustion_seconds").into_keys().collect();
        !ratios.is_empty() && ratios == secs
    });
    m
}

/// Every ratio is of one real destination: exactly `want`, and no time to
/// exhaustion of 0 unless some series' ratio is 1.
#[track_caller]
fn assert_worst(m: &Metrics, want: &BTreeMap<(String, String), f64>) {
    let ratios = by_series(m, "timewait_port_exhaustion_ratio");
    assert_eq!(&ratios, want, "ratio per series = its busiest real destination's (in use per series: {:?})",
        by_series(m, "timewait_outbound_ports_in_use"));
    for ((remote, port), secs) in by_series(m, "timewait_port_exhaustion_seconds") {
        let full = ratios.get(&(remote.clone(), port.clone())).is_some_and(|r| *r >= 1.0);
        assert!(
            full || secs > 0.0,
            "timewait_port_exhaustion_seconds{{remote={remote},port={port}}} = {secs} while no destination in it is full \
             (ratios {ratios:?})"
        );
    }
}

/// Fills the range toward 127.0.0.3:5000 to all 100 ports (as ss counts
/// them; a few rounds at most): the fold holding it must now say 1.0 and
/// 0 s.
fn fill_one(ns: &NetNs, daemon: &Daemon, listeners: &[std::net::TcpListener], series: (String, String)) {
    for _ in 0..5 {
        let now = held_toward(&ss_outbound_in_use(ns, LO, HI), "127.0.0.3", 5000);
        if now >= 100 {
            break;
        }
        ns.client_closes_first(&listeners[3], None, (100 - now) as usize);
    }
    assert_eq!(held_toward(&ss_outbound_in_use(ns, LO, HI), "127.0.0.3", 5000), 100, "the range toward 127.0.0.3:5000 full");
    let mut last = BTreeMap::new();
    crate::support::wait_until(std::time::Duration::from_secs(10), "the fold holding the full destination at 1.0", || {
        last = by_series(&daemon.scrape(), "timewait_port_exhaustion_ratio");
        last.get(&series) == Some(&1.0)
    });
    let secs = by_series(&with_estimates(daemon), "timewait_port_exhaustion_seconds");
    assert_eq!(secs.get(&series), Some(&0.0), "{series:?} is full: 0 s left; all: {secs:?}");
}

/// The 100-port range of the issue, with no TIME_WAIT reuse on loopback
/// (it would let connect() take held ports).
fn hundred_ports(ns: &NetNs) {
    set_port_range(ns, LO, HI);
    ns.sysctl("net.ipv4.tcp_tw_reuse", "0");
}

#[test]
fn ratios_of_folded_remotes_and_ports() {
    if !require_root("folded::ratios_of_folded_remotes_and_ports") {
        return;
    }
    let ns = NetNs::new();
    hundred_ports(&ns);
    let daemon = Daemon::start(&ns, &["--top-remotes", "1", "--top-ports", "1"]);
    let (listeners, held) = four_destinations(&ns, &daemon);
    let m = with_estimates(&daemon);
    let (a, b) = (held_toward(&held, "127.0.0.1", 5000), held_toward(&held, "127.0.0.1", 5001));
    let (c, d) = (held_toward(&held, "127.0.0.2", 5000), held_toward(&held, "127.0.0.3", 5000));
    // 127.0.0.1 (~130 ports) is kept with its port 5000; its 5001 folds into
    // port="other"; 127.0.0.2 and .3 fold into remote="other" (~120 ports,
    // more than the range: the old ratio of the sum read 1.0).
    assert_sums(
        &m,
        &[(key("127.0.0.1", "5000"), a), (key("127.0.0.1", "other"), b), (key("other", "5000"), c + d)].into(),
        &key("127.0.0.1", "other"),
    );
    let want: BTreeMap<_, _> =
        [(key("127.0.0.1", "5000"), of_range(a)), (key("127.0.0.1", "other"), of_range(b)), (key("other", "5000"), of_range(c.max(d)))]
            .into();
    assert_worst(&m, &want);
    fill_one(&ns, &daemon, &listeners, key("other", "5000"));
}

#[test]
fn ratios_of_cidr_blocks() {
    if !require_root("folded::ratios_of_cidr_blocks") {
        return;
    }
    let ns = NetNs::new();
    hundred_ports(&ns);
    let daemon = Daemon::start(&ns, &["--aggregate-ipv4-prefix", "24", "--top-ports", "1"]);
    let (listeners, held) = four_destinations(&ns, &daemon);
    let m = with_estimates(&daemon);
    let (a, b) = (held_toward(&held, "127.0.0.1", 5000), held_toward(&held, "127.0.0.1", 5001));
    let (c, d) = (held_toward(&held, "127.0.0.2", 5000), held_toward(&held, "127.0.0.3", 5000));
    let block = "127.0.0.0/24";
    assert_sums(&m, &[(key(block, "5000"), a + c + d), (key(block, "other"), b)].into(), &key(block, "other"));
    assert_worst(&m, &[(key(block, "5000"), of_range(a.max(c).max(d))), (key(block, "other"), of_range(b))].into());
    fill_one(&ns, &daemon, &listeners, key(block, "5000"));
}

/// SYN totals of every `timewait_syn_total` series, summed.
fn syn_sum(m: &Metrics) -> u64 {
    m.count("timewait_syn_total", &[])
}

#[test]
fn syn_counters_never_go_back() {
    if !require_root("folded::syn_counters_never_go_back") || !segments_available("folded::syn_counters_never_go_back") {
        return;
    }
    let ns = NetNs::new();
    let listener = ns.listen("127.0.0.1:8080".parse().unwrap());
    let daemon = Daemon::start(&ns, &["--top-remotes", "1"]);
    // Three remotes reconnect from one port each: 10, 5 and 2 SYNs meet
    // the server's TIME_WAIT. The busiest by SYNs (.2) is kept; .3 and .4
    // share remote="other" (7 SYNs by the old folding).
    let mut sent = 0;
    for (last, k) in [(2u8, 11u64), (3, 6), (4, 3)] {
        reconnect_from_fixed_port(&ns, &listener, sa4([127, 0, 0, last], 50000), k);
        sent += k - 1;
        daemon.scrape();
    }
    wait_count(&daemon, "timewait_syn_total", &[], sent);
    // .3 now holds the most TIME_WAIT (the server closes 30 connections from
    // it first): the socket series keep it, so by the old folding its 5
    // SYNs left other, which fell from 7 to 2.
    ns.server_closes_first(&listener, &[(v4(127, 0, 0, 3), 30)]);
    crate::support::wait_until(std::time::Duration::from_secs(10), "127.0.0.3 the busiest remote", || {
        daemon.scrape().tw_by_remote().get("127.0.0.3").copied().unwrap_or(0) >= 30
    });
    // And back: .4 sends the most SYNs now, .2 holds the most sockets.
    // Its earlier TIME_WAIT is still there: all 13 SYNs meet one.
    reconnect_from_fixed_port(&ns, &listener, sa4([127, 0, 0, 4], 50000), 13);
    sent += 13;
    ns.server_closes_first(&listener, &[(v4(127, 0, 0, 2), 40)]);
    for _ in 0..5 {
        daemon.scrape();
    }
    let m = wait_count(&daemon, "timewait_syn_total", &[], sent);
    assert_eq!(syn_sum(&m), sent, "the series sum to every SYN sent: {:?}", m.series("timewait_syn_total"));
    assert!(
        m.series("timewait_syn_total").len() <= 4,
        "at most --top-remotes own series per thing that keeps them, plus other: {:?}",
        m.series("timewait_syn_total")
    );
}
