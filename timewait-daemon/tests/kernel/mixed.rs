//! Issue 3, tests 5 and 6: every kind of minisocket death at once, in one
//! namespace watched by one daemon, from concurrent threads:
//! - A: K = 20 reconnects from one fixed port (19 SYNs accepted: reused_by_syn),
//! - B: 3 old-sequence + 2 old-timestamp raw SYNs (5 rejected; each
//!   rejection's ACK draws an RST that kills the minisocket: reset),
//! - C: 1 out-of-window RST (harmless) and 4 in-window RSTs (reset),
//! - D: a `connect()` taking over its own TIME_WAIT port (reused_by_connect),
//! - E: minisockets that stay: 5 in TIME_WAIT, 5 in FIN_WAIT2 (peer still open).
//!
//! The namespace has `tcp_tw_reuse = 1` and, while the workloads run, one
//! ephemeral port (40000) for D; every other client binds an explicit port,
//! and nothing scrapes until the full port range is back.
//!
//! Afterwards, at a quiet moment: each counter rose by exactly its share,
//! `created = closed (all reasons) + timewait_sockets + fin_wait2_orphans`,
//! the gauges equal `ss`, and the kernel agrees: created == TcpExtTW +
//! TcpExtTWKilled, reused_by_connect == TcpExtTWRecycled, old-timestamp SYNs
//! == TcpExtPAWSTimewait.

use std::net::{SocketAddr, TcpStream};
use std::thread;

use crate::connect_reuse::{take_over_own_time_wait, with_one_port};
use crate::support::{Daemon, NetNs, abortive_close, quiet_equal, require_root};
use crate::support::syn::{
    Segment, TCP_RST, fixed_port_client, in_time_wait, kdelta, kernel_line, nstat, sa4,
    server_closes_first_once, wait_balanced, wait_count, wait_eof, wait_settled_keeping_half_open,
    wait_tuple_gone, paws_tw_delta, tw_created_delta};
use crate::syn_rejected::rejected_syn;
use crate::syn_reuse::reconnect_from_fixed_port;

const K: u64 = 20;
const OLD_SEQ: u16 = 3;
const OLD_TS: u16 = 2;
const RESETS: u16 = 4;
const STAY_TW: u16 = 5;
const STAY_FW2: u16 = 5;

#[test]
fn mixed() {
    if !require_root("mixed") {
        return;
    }
    let ns = NetNs::new();
    ns.sysctl("net.ipv4.tcp_tw_reuse", "1");
    let l_reuse = ns.listen("127.0.0.1:8080".parse().unwrap());
    let l_connect = ns.listen("127.0.0.1:8081".parse().unwrap());
    let l_reject = ns.listen("127.0.0.1:8082".parse().unwrap());
    let l_reset = ns.listen("127.0.0.1:8083".parse().unwrap());
    let l_stay = ns.listen("127.0.0.1:8084".parse().unwrap());
    let daemon = Daemon::start(&ns, &[]);

    let m0 = daemon.scrape();
    let k0 = nstat(&ns);

    let (kept, second) = with_one_port(&ns, || {
        thread::scope(|s| {
            let a =
                s.spawn(|| reconnect_from_fixed_port(&ns, &l_reuse, sa4([127, 0, 0, 2], 50000), K));
            let b = s.spawn(|| {
                for i in 0..(OLD_SEQ + OLD_TS) {
                    let tw =
                        server_closes_first_once(&ns, &l_reject, sa4([127, 0, 0, 3], 51000 + i));
                    let syn = rejected_syn(&tw, i >= OLD_SEQ);
                    ns.run(|| syn.send());
                    wait_tuple_gone(&ns, tw.server, tw.client);
                }
            });
            let c = s.spawn(|| {
                let tws: Vec<_> = (0..RESETS)
                    .map(|i| {
                        server_closes_first_once(&ns, &l_reset, sa4([127, 0, 0, 4], 52000 + i))
                    })
                    .collect();
                let oow = Segment {
                    src: tws[0].client,
                    dst: tws[0].server,
                    seq: tws[0].rcv_nxt.wrapping_add(100_000),
                    ack: 0,
                    flags: TCP_RST,
                    timestamp: None,
                };
                ns.run(|| oow.send());
                for tw in &tws {
                    let rst = Segment {
                        seq: tw.rcv_nxt,
                        src: tw.client,
                        dst: tw.server,
                        ..oow
                    };
                    ns.run(|| rst.send());
                    wait_tuple_gone(&ns, tw.server, tw.client);
                }
            });
            let d = s.spawn(|| take_over_own_time_wait(&ns, &l_connect));
            // (The one-port range is set around the whole scope, below.)
            let e = s.spawn(|| {
                let server = sa4([127, 0, 0, 1], 8084);
                for i in 0..STAY_TW {
                    server_closes_first_once(&ns, &l_stay, sa4([127, 0, 0, 5], 53000 + i));
                }
                // The clients stay open: the server's minisockets stay in FIN_WAIT2.
                let kept: Vec<TcpStream> = (0..STAY_FW2)
                    .map(|i| {
                        let client = sa4([127, 0, 0, 6], 54000 + i);
                        ns.run(|| {
                            let c = fixed_port_client(client, server)
                                .unwrap_or_else(|e| panic!("connect {client}: {e}"));
                            let (srv, _) = l_stay.accept().expect("accept");
                            drop(srv);
                            wait_eof(&c);
                            c
                        })
                    })
                    .collect();
                kept
            });
            let join = |name: &str, h: thread::ScopedJoinHandle<'_, ()>| {
                h.join().unwrap_or_else(|p| {
                    eprintln!("workload {name} failed");
                    std::panic::resume_unwind(p)
                })
            };
            join("A (syn reuse)", a);
            join("B (rejected SYNs)", b);
            join("C (RSTs)", c);
            let second = d.join().unwrap_or_else(|p| std::panic::resume_unwind(p));
            let kept = e.join().unwrap_or_else(|p| std::panic::resume_unwind(p));
            (kept, second)
        })
    });
    assert_eq!(
        second.0.local_addr().expect("local addr"),
        SocketAddr::V4(sa4([127, 0, 0, 1], 40000)),
        "D's second connection took over port 40000"
    );
    wait_settled_keeping_half_open(&ns);
    assert!(!in_time_wait(
        &ns,
        sa4([127, 0, 0, 1], 40000),
        sa4([127, 0, 0, 1], 8081)
    ));

    let rejected = u64::from(OLD_SEQ + OLD_TS);
    let resets = rejected + u64::from(RESETS);
    let base = |name: &str, f: &[(&str, &str)]| m0.count(name, f);
    let reason = |r: &'static str| [("reason", r)];
    wait_count(
        &daemon,
        "timewait_closed_total",
        &reason("reused_by_syn"),
        base("timewait_closed_total", &reason("reused_by_syn")) + K - 1,
    );
    wait_count(
        &daemon,
        "timewait_closed_total",
        &reason("reset"),
        base("timewait_closed_total", &reason("reset")) + resets,
    );
    wait_count(
        &daemon,
        "timewait_closed_total",
        &reason("reused_by_connect"),
        base("timewait_closed_total", &reason("reused_by_connect")) + 1,
    );
    let (created, closed, sockets, orphans) = wait_balanced(&daemon);
    let m = daemon.scrape();
    let k1 = nstat(&ns);
    let d = |name: &str, f: &[(&str, &str)]| m.count(name, f) - m0.count(name, f);
    let r2 = [("remote", "127.0.0.2")];
    let r3 = [("remote", "127.0.0.3")];
    eprintln!(
        "mixed: created {created} = closed {closed:?} + sockets {sockets} + fin_wait2 orphans {orphans}; \
         syn_total 127.0.0.2+{} 127.0.0.3+{} (all +{}), syn_rejected 127.0.0.2+{} 127.0.0.3+{} (all +{}); \
         segments syn+{} rst+{} ack+{}; kernel: {}",
        d("timewait_syn_total", &r2),
        d("timewait_syn_total", &r3),
        d("timewait_syn_total", &[]),
        d("timewait_syn_rejected_total", &r2),
        d("timewait_syn_rejected_total", &r3),
        d("timewait_syn_rejected_total", &[]),
        d("timewait_segments_total", &[("kind", "syn")]),
        d("timewait_segments_total", &[("kind", "rst")]),
        d("timewait_segments_total", &[("kind", "ack")]),
        kernel_line(&k0, &k1)
    );

    // Each workload's share.
    assert_eq!(d("timewait_syn_total", &r2), K - 1, "A: syn_total");
    assert_eq!(d("timewait_syn_rejected_total", &r2), 0, "A: syn_rejected");
    assert_eq!(d("timewait_syn_total", &r3), rejected, "B: syn_total");
    assert_eq!(
        d("timewait_syn_rejected_total", &r3),
        rejected,
        "B: syn_rejected"
    );
    assert_eq!(
        d("timewait_syn_total", &[]),
        K - 1 + rejected,
        "syn_total, all remotes"
    );
    assert_eq!(
        d("timewait_syn_rejected_total", &[]),
        rejected,
        "syn_rejected, all remotes"
    );
    assert_eq!(closed["reused_by_syn"], K - 1, "A: reused_by_syn");
    assert_eq!(closed["reset"], resets, "B + C: reset");
    assert_eq!(closed["reused_by_connect"], 1, "D: reused_by_connect");
    assert_eq!(closed["expired"], 0, "nothing expired (60 s)");
    assert_eq!(closed["other"], 0, "nothing closed for another reason");
    assert_eq!(
        d("timewait_lifetime_seconds_count", &[]),
        closed.values().sum::<u64>(),
        "one lifetime observation per close"
    );
    // Dropped by minisockets: B's rejected SYNs; B's and C's killing RSTs
    // and C's out-of-window one.
    assert_eq!(
        d("timewait_segments_total", &[("kind", "syn")]),
        rejected,
        "segments_total{{kind=syn}}"
    );
    assert_eq!(
        d("timewait_segments_total", &[("kind", "rst")]),
        resets + 1,
        "segments_total{{kind=rst}}"
    );
    // Still open: A's last + E's TIME_WAITs; E's FIN_WAIT2s.
    assert_eq!(sockets, 1 + u64::from(STAY_TW), "timewait_sockets");
    assert_eq!(orphans, u64::from(STAY_FW2), "timewait_fin_wait2_orphans");
    let expected_created = K + rejected + u64::from(RESETS) + 1 + u64::from(STAY_TW + STAY_FW2);
    assert_eq!(created, expected_created, "created_total");

    // The gauges equal ss.
    quiet_equal(
        "timewait_sockets vs ss",
        || ns.ss_tw_total(),
        || daemon.scrape().count("timewait_sockets", &[]),
    );
    quiet_equal(
        "timewait_fin_wait2_orphans vs ss",
        || {
            ns.ss_fw2_orphan_series(&[8080, 8081, 8082, 8083, 8084])
                .values()
                .sum::<u64>()
        },
        || daemon.scrape().count("timewait_fin_wait2_orphans", &[]),
    );

    // The kernel's own counters for the same events.
    if let Some(tw) = tw_created_delta(&k0, &k1) {
        assert_eq!(tw, created, "created_total == TcpExtTW + TcpExtTWKilled");
    }
    assert_eq!(
        kdelta(&k0, &k1, "TcpExtTWRecycled"),
        closed["reused_by_connect"],
        "reused_by_connect == TcpExtTWRecycled"
    );
    assert_eq!(
        paws_tw_delta(&k0, &k1),
        u64::from(OLD_TS),
        "TcpExtPAWSTimewait == old-timestamp SYNs"
    );
    assert_eq!(kdelta(&k0, &k1, "TcpExtTCPACKSkippedTimeWait"), 0);
    assert_eq!(
        m.count("timewait_events_lost_total", &[]),
        0,
        "no events lost"
    );

    abortive_close(second.0).expect("close D's connection");
    drop(second.1);
    drop(kept);
}
