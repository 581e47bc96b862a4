//! Issue 12: the load-balancer case, reproduced with real hosts. Two
//! clients reach a web server through a NAT router with a small source-port
//! range; the server closes first, so it holds TIME_WAIT for (NAT address,
//! NAT port); the router forgets closed flows after a second and reuses the
//! port while the server still holds it, so new SYNs meet TIME_WAIT
//! minisockets; the new connection's timestamp clock is unrelated to the old
//! one's, so about half of them are older and PAWS rejects them.
//!
//! Topology (namespaces this test creates, nothing routed out of them):
//!
//! ```text
//!  c1 10.77.1.2 ─┐
//!                ├─ r (10.77.1.1, 10.77.2.1 | 10.77.3.1 = NAT address) ── s 10.77.3.2:80
//!  c2 10.77.2.2 ─┘     ip_forward=1, MASQUERADE --to-ports 40000-40063     nginx, timewaitd, tshark
//! ```
//!
//! c1 and c2 route only 10.77.3.0/24 via r; s has only its connected
//! subnet (it answers the NAT address on-link); r forwards. Conntrack
//! timeouts for closed TCP states are 1 s in r.
//!
//! Load: from c1 and c2 at once, up to [`REQUESTS`] HTTP/1.1 requests each
//! with `Connection: close` (nginx answers `200 ok` and closes first), each
//! step bounded by [`REQUEST_TIMEOUT`], the whole load by [`LOAD_BUDGET`].
//!
//! Ground truth: `tshark` on s's interface for the whole run; per 4-tuple
//! (NAT address:port, 10.77.3.2:80), in capture order:
//! - the server holds it in TIME_WAIT from the moment the client's FIN
//!   arrives on a connection whose server FIN came first (the server is in
//!   FIN_WAIT2 then and the FIN takes it to TIME_WAIT);
//! - it stops holding it at the first of: the server's SYN-ACK on the tuple
//!   (a SYN was accepted, a new connection took the tuple), an RST from the
//!   client with sequence number exactly the TIME_WAIT's `rcv_nxt` (client
//!   FIN + 1: what a client whose SYN was answered with an out-of-window ACK
//!   sends back, and what kills a minisocket with `tcp_rfc1337 = 0`), or
//!   60 s after it began (`TCP_TIMEWAIT_LEN`; re-armed by rejected segments,
//!   which can only lengthen it; the test asserts the capture spans less
//!   than 60 s, so expiry never decides anything here);
//! - every SYN segment (SYN without ACK) from the client side that arrives
//!   while the tuple is held is one SYN hitting TIME_WAIT; retransmissions
//!   count again each time they arrive while it is held, and not once it is
//!   gone (then they meet the listener, not a minisocket);
//! - a hit is accepted when the server's next SYN-ACK on the tuple, before
//!   the client's next segment on it, acknowledges exactly that SYN
//!   (ack = its seq + 1); otherwise rejected (answered with a bare ACK, or
//!   not at all).
//!
//! Assertions: `timewait_syn_total{remote=NAT}` and
//! `timewait_syn_rejected_total{remote=NAT}` equal the capture's hits and
//! rejected hits (read when the load is over and the counters are quiet);
//! rejected <= the server's PAWS counters' rise (an upper bound: they count
//! non-SYN segments too); the lab reproduced the case (some hits, some
//! rejected, some accepted); tshark dropped nothing and saw every request
//! the clients completed.

use std::net::{SocketAddr, SocketAddrV4, TcpListener};
use std::thread;
use std::time::{Duration, Instant};

use crate::support::{Daemon, Metrics, NetNs, abortive_close, require_root, scaled, segments_available};
use crate::support::nat::{
    Capture, LoadStats, Nginx, ScratchDir, TIME_WAIT_LEN, have, http_close_load, iptables_usable,
    read_capture, route, syn_truth, truth_line, veth,
};
use crate::support::syn::{kernel_line, nstat, paws_tw_delta, tsval};

/// Requests per client host.
const REQUESTS: usize = 400;
/// Client threads per client host, each making `REQUESTS / THREADS` in turn:
/// a rejected SYN costs its client a 1 s retransmission timeout, so one
/// thread alone would spend most of the load waiting.
const THREADS: usize = 4;
/// The whole load stops starting requests after this.
const LOAD_BUDGET: Duration = Duration::from_secs(40);
/// Connect, write and read bounds of one request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// The NAT's source ports: few, so they are reused within seconds.
const NAT_PORTS: &str = "40000-40063";

const NAT: [u8; 4] = [10, 77, 3, 1];
const SERVER: [u8; 4] = [10, 77, 3, 2];

#[test]
#[ignore = "heavy, host only: `cargo xtask test` runs it alone after the parallel suite (--ignored); exact SYN counts need a machine not saturated by the other tests"]
fn nat_lab() {
    if !require_root("nat_lab") || !segments_available("nat_lab") {
        return;
    }
    for (cmd, pkg) in [("iptables", "iptables"), ("nginx", "nginx-light"), ("tshark", "tshark")] {
        assert!(
            have(cmd),
            "nat_lab needs `{cmd}` (Debian package {pkg}; `cargo xtask test` installs it)"
        );
    }
    let t0 = Instant::now();
    let nat_ip = std::net::Ipv4Addr::from(NAT);
    let server = SocketAddrV4::new(SERVER.into(), 80);
    let remote = nat_ip.to_string();

    // --- the hosts ------------------------------------------------------------
    let c1 = NetNs::new();
    let c2 = NetNs::new();
    let r = NetNs::new();
    let s = NetNs::new();
    veth(&c1, "eth0", "10.77.1.2/24", &r, "to-c1", "10.77.1.1/24");
    veth(&c2, "eth0", "10.77.2.2/24", &r, "to-c2", "10.77.2.1/24");
    veth(&r, "to-s", "10.77.3.1/24", &s, "eth0", "10.77.3.2/24");
    route(&c1, "10.77.3.0/24", "10.77.1.1");
    route(&c2, "10.77.3.0/24", "10.77.2.1");
    r.sysctl("net.ipv4.ip_forward", "1");
    let flavour = iptables_usable(&r).unwrap_or_else(|e| panic!("iptables inside a namespace: {e}"));
    r.exec(&[
        "iptables",
        "-t",
        "nat",
        "-A",
        "POSTROUTING",
        "-o",
        "to-s",
        "-p",
        "tcp",
        "-j",
        "MASQUERADE",
        "--to-ports",
        NAT_PORTS,
    ]);
    // The first NAT rule brought conntrack into r; its per-namespace
    // timeouts now exist. Closed flows are forgotten after 1 s.
    for state in ["time_wait", "close", "fin_wait", "close_wait", "last_ack"] {
        r.sysctl(&format!("net.netfilter.nf_conntrack_tcp_timeout_{state}"), "1");
    }
    eprintln!(
        "nat_lab: {flavour}; NAT {nat_ip} ports {NAT_PORTS}; namespaces c1={} c2={} r={} s={}",
        c1.name(),
        c2.name(),
        r.name(),
        s.name()
    );

    let dir = ScratchDir::new("nat-lab");
    let nginx = Nginx::start(&s, server, &dir.path);

    // --- the clients' timestamp clocks -----------------------------------------
    // Read on a side port (no TIME_WAIT left: the probes end with an RST and
    // the listener never accepts), before the daemon and the capture start.
    let probe = SocketAddrV4::new(SERVER.into(), 81);
    let probe_listener: TcpListener = s.listen(SocketAddr::V4(probe));
    let ts = |ns: &NetNs| -> (u32, u32) {
        ns.run(|| {
            let a = std::net::TcpStream::connect_timeout(&probe.into(), REQUEST_TIMEOUT).expect("probe connect");
            let b = std::net::TcpStream::connect_timeout(&probe.into(), REQUEST_TIMEOUT).expect("probe connect");
            let v = (tsval(&a), tsval(&b));
            abortive_close(a).expect("probe close");
            abortive_close(b).expect("probe close");
            v
        })
    };
    let (c1a, c1b) = ts(&c1);
    let (c2a, c2b) = ts(&c2);
    drop(probe_listener);
    let gap = |a: u32, b: u32| (a.wrapping_sub(b) as i32).unsigned_abs();
    eprintln!(
        "nat_lab: TCP timestamps now: c1 {c1a} and {c1b} (two connections, {} apart), c2 {c2a} and {c2b} \
         ({} apart); c1 vs c2 {} apart ({})",
        gap(c1a, c1b),
        gap(c2a, c2b),
        gap(c1a, c2a),
        if gap(c1a, c1b) > 10_000 {
            "offsets differ per connection, not only per client"
        } else {
            "offsets per client"
        }
    );
    assert!(
        gap(c1a, c2a) > 10_000,
        "the two clients' timestamp clocks must differ (c1 {c1a}, c2 {c2a}), else PAWS never rejects"
    );

    // --- daemon, capture, load ---------------------------------------------------
    let daemon = Daemon::start(&s, &[]);
    s.wait_settled();
    assert_eq!(
        s.ss_tw_total(),
        0,
        "no TIME_WAIT in s before the load: {:?}",
        s.ss("time-wait")
    );
    let m0 = daemon.scrape();
    let k0 = nstat(&s);
    let cap = Capture::start(
        &s,
        "eth0",
        &format!("tcp and host {nat_ip} and port 80"),
        dir.path.join("server.pcapng"),
        &r,
        server.ip().to_owned(),
    );

    let load_start = Instant::now();
    let to = SocketAddr::V4(server);
    let budget = scaled(LOAD_BUDGET);
    let per_thread = REQUESTS / THREADS;
    let h1: Vec<_> = (0..THREADS)
        .map(|_| c1.spawn(move || http_close_load(to, per_thread, budget, REQUEST_TIMEOUT)))
        .collect();
    let h2: Vec<_> = (0..THREADS)
        .map(|_| c2.spawn(move || http_close_load(to, per_thread, budget, REQUEST_TIMEOUT)))
        .collect();
    let l1 = LoadStats::sum(h1.into_iter().map(|h| h.join().expect("client c1")));
    let l2 = LoadStats::sum(h2.into_iter().map(|h| h.join().expect("client c2")));
    let load_time = load_start.elapsed();
    eprintln!("nat_lab: load took {load_time:?}: c1 {l1:?}; c2 {l2:?}");

    // Quiet: nothing in transit in s, and the daemon's counters unchanged
    // over a second (it resolves verdicts up to ~200 ms late).
    s.wait_settled();
    let m1 = wait_counters_quiet(&daemon, &remote);
    let k1 = nstat(&s);
    // Program runs the kernel skipped during the load (the daemon's own count).
    let missed = |m: &Metrics| m.count("timewait_program_recursion_misses_total", &[]);
    let misses = missed(&m1) - missed(&m0);
    let summary = cap.stop();
    eprintln!(
        "nat_lab: tshark: captured {:?}, dropped {}",
        summary.captured, summary.dropped
    );

    // --- ground truth -------------------------------------------------------------
    let (packets, frames) = read_capture(&dir.path.join("server.pcapng"));
    let truth = syn_truth(&packets, nat_ip, server);
    eprintln!(
        "nat_lab: capture: {frames} frames, {} TCP segments; {}",
        packets.len(),
        truth_line(&truth)
    );
    for e in &truth.examples {
        eprintln!("nat_lab:   {e}");
    }
    for e in &truth.retransmitted {
        eprintln!("nat_lab:   retransmitted hit: {e}");
    }
    let d = |m: &Metrics, name: &str| m.count(name, &[("remote", &remote)]);
    let syn_total = d(&m1, "timewait_syn_total") - d(&m0, "timewait_syn_total");
    let syn_rejected = d(&m1, "timewait_syn_rejected_total") - d(&m0, "timewait_syn_rejected_total");
    let paws = paws_tw_delta(&k0, &k1);
    let closed: Vec<String> = ["reused_by_syn", "reset", "expired", "reused_by_connect", "other"]
        .iter()
        .map(|r| {
            let c = |m: &Metrics| m.count("timewait_closed_total", &[("reason", r)]);
            format!("{r}+{}", c(&m1) - c(&m0))
        })
        .collect();
    let extra: Vec<String> = [
        "TcpExtSyncookiesSent",
        "TcpExtListenOverflows",
        "TcpExtListenDrops",
        "TcpExtTWKilled",
    ]
    .iter()
    .map(|k| format!("{k}+{}", crate::support::syn::kdelta(&k0, &k1, k)))
    .collect();
    eprintln!(
        "nat_lab: daemon closed_total {}; created+{} (told out of order +{}); kernel {}; capture: TIME_WAITs created {}, \
         reset {}, taken by SYN {}; program runs the kernel skipped during the load (recursion misses): {misses}",
        closed.join(" "),
        m1.count("timewait_created_total", &[]) - m0.count("timewait_created_total", &[]),
        m1.count("timewait_out_of_order_total", &[]) - m0.count("timewait_out_of_order_total", &[]),
        extra.join(" "),
        truth.server_first,
        truth.tw_reset,
        truth.accepted
    );
    eprintln!(
        "nat_lab: FIGURES: SYNs hitting TIME_WAIT {} (accepted {}, rejected {}); PAWS delta {paws}; \
         daemon syn_total {syn_total}, syn_rejected_total {syn_rejected}; kernel: {}; \
         TIME_WAIT in s now {}; whole test so far {:?}",
        truth.hits,
        truth.accepted,
        truth.rejected,
        kernel_line(&k0, &k1),
        s.ss_tw_total(),
        t0.elapsed()
    );

    // The capture is complete and the rule applies.
    assert_eq!(summary.dropped, 0, "tshark dropped packets:\n{}", summary.stderr);
    if let Some(n) = summary.captured {
        assert_eq!(n, frames, "tshark's count vs the frames read back");
    }
    assert!(
        truth.syn_acks >= l1.ok + l2.ok,
        "the capture shows {} connections opened, the clients completed {} requests: it missed some",
        truth.syn_acks,
        l1.ok + l2.ok
    );
    assert!(
        truth.span < TIME_WAIT_LEN,
        "the capture spans {:.1} s: TIME_WAIT expiry would enter the ground truth (keep the load shorter)",
        truth.span
    );
    assert_eq!(
        truth.syn_in_fin_wait2,
        0,
        "SYNs on a 4-tuple in FIN_WAIT2 (outside the rule): {}",
        truth_line(&truth)
    );

    // The lab reproduced the case.
    assert!(
        truth.hits > 0 && truth.rejected > 0 && truth.accepted > 0,
        "the lab did not reproduce the load-balancer case (need SYNs hitting TIME_WAIT, some rejected, some \
         accepted): {}; PAWS delta {paws}; clients c1 {l1:?} c2 {l2:?}",
        truth_line(&truth)
    );
    assert_eq!(truth.accepted + truth.rejected, truth.hits);
    assert_eq!(
        truth.accepted_isn_from_tw,
        truth.accepted,
        "every accepted hit's SYN-ACK must carry the ISN the kernel derives from the minisocket \
         (tw_snd_nxt + 65537), else the rule misread the capture: {}",
        truth_line(&truth)
    );

    // The kernel's own count bounds the rejections.
    assert!(
        truth.rejected <= paws,
        "capture: {} rejected SYNs, but the server's PAWS counters rose by only {paws} ({})",
        truth.rejected,
        kernel_line(&k0, &k1)
    );
    assert!(
        syn_rejected <= paws,
        "daemon: {syn_rejected} rejected SYNs, but the server's PAWS counters rose by only {paws}"
    );

    // The daemon agrees with the wire: never more than the capture, and
    // short by no more than the program runs the kernel skipped (recursion
    // misses, which the daemon reports) plus 1 % of the hits. Races fixed in
    // issue 13 (each was a shortfall here): the NAT reuses a port before the
    // closing CPU tells the minisocket's creation, so a rejected SYN and its
    // RST found no entry (now the segment follows it: `skb::found_by_segment`)
    // or an accepted SYN killed it unseen (now found by its ISN:
    // `lifecycle::gone`); a walk's find whose creation time was reset, which
    // hid its takeover; a minisocket's memory reused before its takeover was
    // told (`lifecycle::displaced`). Measured after them (host 6.18,
    // tracepoint path, 22 runs): exact in 17, short by 1-4 of ~750 (at most
    // 0.53 %) in 5. Traced with bpf_printk, each shortfall is a minisocket
    // whose end reached no program run (no `kfree_skb` with it as `rx_sk`,
    // no state change of the connection that took it over: a handshake that
    // never completed is one such case) and that a later close or walk
    // counted as `other` (README, Known limits). Any over-count fails.
    for (what, got, want) in [("syn_total", syn_total, truth.hits), ("syn_rejected_total", syn_rejected, truth.rejected)] {
        let slack = misses + want / 100;
        assert!(
            got <= want && want - got <= slack,
            "timewait_{what} {{remote={remote}}} {got} vs the capture's {want} (allowed short by {slack}: {misses} skipped runs + 1 %) ({})\n{}",
            truth_line(&truth),
            daemon.log_tail()
        );
        if got != want {
            eprintln!("nat_lab: timewait_{what} {got} is {} short of the capture's {want}", want - got);
        }
    }

    drop(daemon);
    drop(nginx);
    eprintln!("nat_lab: passed in {:?}", t0.elapsed());
}

/// Scrapes until `timewait_syn_total` and `timewait_syn_rejected_total` for
/// `remote` read the same over a second (20 s at most); returns that scrape.
#[track_caller]
fn wait_counters_quiet(daemon: &Daemon, remote: &str) -> Metrics {
    let read = |m: &Metrics| {
        (
            m.count("timewait_syn_total", &[("remote", remote)]),
            m.count("timewait_syn_rejected_total", &[("remote", remote)]),
        )
    };
    let start = Instant::now();
    let mut last = daemon.scrape();
    loop {
        thread::sleep(Duration::from_secs(1));
        let now = daemon.scrape();
        if read(&now) == read(&last) {
            return now;
        }
        if start.elapsed() >= scaled(Duration::from_secs(20)) {
            panic!(
                "SYN counters still moving after 20 s: {:?} -> {:?}",
                read(&last),
                read(&now)
            );
        }
        last = now;
    }
}
