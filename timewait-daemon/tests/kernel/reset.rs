//! Issue 3, tests 3 and 5: RSTs that kill a TIME_WAIT minisocket.
//!
//! `tcp_timewait_state_process` (net/ipv4/tcp_minisocks.c): an RST whose
//! sequence number is exactly `tw_rcv_nxt` is "TIME_WAIT assassination" and,
//! with `tcp_rfc1337 = 0`, kills the minisocket; an RST with any other
//! sequence is out of window and only dropped. So: N minisockets on the
//! server side (the server closes first; the client's send sequence is read
//! with TCP_REPAIR before it closes), one out-of-window RST first (dropped,
//! nothing dies), then one in-window RST per minisocket (all die).
//! `closed_total{reason="reset"}` rises by N, `ss` shows none left. The
//! kernel has no counter for a kill by RST; it counts each minisocket once
//! when scheduled (`TcpExtTW` / `TcpExtTWKilled`).

use crate::support::{Daemon, NetNs, require_root, segments_available};
use crate::support::syn::{
    Segment, TCP_RST, in_time_wait, kdelta, kernel_line, nstat, sa4, server_closes_first_once,
    wait_count, wait_tuple_gone, paws_tw_delta, tw_created_delta};

const N: u16 = 4;

#[test]
fn reset() {
    if !require_root("reset") || !segments_available("reset") {
        return;
    }
    let ns = NetNs::new();
    let listener = ns.listen("127.0.0.1:8080".parse().unwrap());
    let daemon = Daemon::start(&ns, &[]);
    let reset = [("reason", "reset")];
    let rst_segs = [("kind", "rst")];

    let m0 = daemon.scrape();
    let k0 = nstat(&ns);
    let tws: Vec<_> = (0..N)
        .map(|i| server_closes_first_once(&ns, &listener, sa4([127, 0, 0, 4], 52000 + i)))
        .collect();
    assert_eq!(
        ns.ss_tw_total(),
        u64::from(N),
        "ss: {N} TIME_WAIT before the RSTs"
    );
    let reset0 = m0.count("timewait_closed_total", &reset);
    let seg0 = m0.count("timewait_segments_total", &rst_segs);

    // Out of window: dropped by the minisocket, which lives on.
    let first = tws[0];
    let oow = Segment {
        src: first.client,
        dst: first.server,
        seq: first.rcv_nxt.wrapping_add(100_000),
        ack: 0,
        flags: TCP_RST,
        timestamp: None,
    };
    ns.run(|| oow.send());
    wait_count(&daemon, "timewait_segments_total", &rst_segs, seg0 + 1);
    let m = wait_count(&daemon, "timewait_closed_total", &reset, reset0);
    assert!(
        in_time_wait(&ns, first.server, first.client),
        "an out-of-window RST does not kill the minisocket"
    );
    assert_eq!(m.count("timewait_sockets", &[]), u64::from(N));

    // In window: each kills its minisocket.
    for (i, tw) in tws.iter().enumerate() {
        let rst = Segment {
            src: tw.client,
            dst: tw.server,
            seq: tw.rcv_nxt,
            ack: 0,
            flags: TCP_RST,
            timestamp: None,
        };
        ns.run(|| rst.send());
        wait_tuple_gone(&ns, tw.server, tw.client);
        wait_count(
            &daemon,
            "timewait_closed_total",
            &reset,
            reset0 + i as u64 + 1,
        );
    }
    let m = wait_count(
        &daemon,
        "timewait_segments_total",
        &rst_segs,
        seg0 + 1 + u64::from(N),
    );
    let k1 = nstat(&ns);
    let d = |name: &str, f: &[(&str, &str)]| m.count(name, f) - m0.count(name, f);
    let resets = d("timewait_closed_total", &reset);
    let created = d("timewait_created_total", &[]);
    eprintln!(
        "reset: {N} in-window RSTs + 1 out-of-window: closed{{reset}}+{resets} segments{{rst}}+{} \
         created+{created} sockets now {}, ss time-wait now {}; kernel: {}",
        d("timewait_segments_total", &rst_segs),
        m.count("timewait_sockets", &[]),
        ns.ss_tw_total(),
        kernel_line(&k0, &k1)
    );
    assert_eq!(
        resets,
        u64::from(N),
        "closed_total{{reason=reset}} rose by the number killed"
    );
    assert_eq!(
        d("timewait_lifetime_seconds_count", &reset),
        u64::from(N),
        "one lifetime observation per reset"
    );
    for reason in ["expired", "reused_by_syn", "reused_by_connect", "other"] {
        assert_eq!(
            d("timewait_closed_total", &[("reason", reason)]),
            0,
            "nothing closed for reason {reason}"
        );
    }
    assert_eq!(
        d("timewait_syn_total", &[]),
        0,
        "no SYN reached a minisocket"
    );
    assert_eq!(ns.ss_tw_total(), 0, "ss: none left");
    assert_eq!(
        m.count("timewait_sockets", &[]),
        0,
        "timewait_sockets: none left"
    );
    assert_eq!(created, u64::from(N));
    if let Some(tw) = tw_created_delta(&k0, &k1) {
        assert_eq!(tw, created, "created_total == TcpExtTW + TcpExtTWKilled");
    }
    assert_eq!(kdelta(&k0, &k1, "TcpExtTWRecycled"), 0);
    assert_eq!(paws_tw_delta(&k0, &k1), 0);
}
