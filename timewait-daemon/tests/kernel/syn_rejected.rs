//! Issue 3, tests 2 and 5: SYNs rejected by a TIME_WAIT minisocket, made
//! deterministic with hand-built SYNs (KERNEL-NOTES).
//!
//! Each round: one connection from a fixed client port to a server that
//! closes first (the server's minisocket holds the 4-tuple in TIME_WAIT);
//! the client's send sequence and timestamp clock are read before it closes.
//! Then a raw SYN from the client's address and port arrives for the
//! minisocket. `tcp_timewait_state_process` (net/ipv4/tcp_minisocks.c)
//! rejects it when
//! - its sequence number is not after `tw_rcv_nxt` and it has no timestamp
//!   (round kind "old sequence"), or
//! - its timestamp is older than `tw_ts_recent` (PAWS), whatever its
//!   sequence (round kind "old timestamp", sent with a NEWER sequence number
//!   to show PAWS alone decides); the kernel counts these in
//!   `TcpExtPAWSTimewait`.
//!
//! A rejected SYN is answered with an ACK (the first out-of-window ACK of a
//! minisocket is never rate limited); the client's port has no socket any
//! more, so the stack answers that ACK with an RST whose sequence is exactly
//! `tw_rcv_nxt`, which kills the minisocket (`tcp_rfc1337 = 0`). So every
//! round is: one SYN, one rejection, one reset, the 4-tuple gone from `ss`.

use crate::support::{Daemon, NetNs, require_root, segments_available};
use crate::support::syn::{
    Segment, ServerTimeWait, TCP_SYN, kdelta, kernel_line, nstat, sa4, server_closes_first_once,
    ss_tuple, wait_count, wait_tuple_gone, paws_tw_delta, tw_created_delta};

/// Rounds with an old sequence number and no timestamp option.
const OLD_SEQ: u16 = 3;
/// Rounds with an old timestamp (and a newer sequence number).
const OLD_TS: u16 = 2;

/// A SYN the minisocket of `tw` rejects: an old sequence number and no
/// timestamp, or (`old_ts`) a newer sequence number with an old timestamp.
pub fn rejected_syn(tw: &ServerTimeWait, old_ts: bool) -> Segment {
    if old_ts {
        Segment {
            src: tw.client,
            dst: tw.server,
            seq: tw.rcv_nxt.wrapping_add(1_000_000),
            ack: 0,
            flags: TCP_SYN,
            timestamp: Some((tw.tsval.wrapping_sub(100_000), 0)),
        }
    } else {
        Segment {
            src: tw.client,
            dst: tw.server,
            seq: tw.rcv_nxt.wrapping_sub(1_000_000),
            ack: 0,
            flags: TCP_SYN,
            timestamp: None,
        }
    }
}

#[test]
fn syn_rejected() {
    if !require_root("syn_rejected") || !segments_available("syn_rejected") {
        return;
    }
    let ns = NetNs::new();
    let listener = ns.listen("127.0.0.1:8080".parse().unwrap());
    let daemon = Daemon::start(&ns, &[]);
    let remote = [("remote", "127.0.0.3")];
    let reset = [("reason", "reset")];

    let m0 = daemon.scrape();
    let k0 = nstat(&ns);
    let mut sent = 0u64;
    for i in 0..(OLD_SEQ + OLD_TS) {
        let old_ts = i >= OLD_SEQ;
        let tw = server_closes_first_once(&ns, &listener, sa4([127, 0, 0, 3], 51000 + i));
        let ki = nstat(&ns);
        let syn = rejected_syn(&tw, old_ts);
        ns.run(|| syn.send());
        sent += 1;
        // The rejection's ACK draws an RST from the client's (socketless)
        // port, which kills the minisocket.
        wait_tuple_gone(&ns, tw.server, tw.client);
        wait_count(&daemon, "timewait_syn_rejected_total", &remote, sent);
        wait_count(&daemon, "timewait_syn_total", &remote, sent);
        let m = wait_count(&daemon, "timewait_closed_total", &reset, sent);
        let kj = nstat(&ns);
        eprintln!(
            "syn_rejected round {i} ({}): syn_total={} rejected={} reset={} segments syn={} rst={} ack={}; kernel: {}",
            if old_ts {
                "old timestamp"
            } else {
                "old sequence"
            },
            m.count("timewait_syn_total", &remote),
            m.count("timewait_syn_rejected_total", &remote),
            m.count("timewait_closed_total", &reset),
            m.count("timewait_segments_total", &[("kind", "syn")]),
            m.count("timewait_segments_total", &[("kind", "rst")]),
            m.count("timewait_segments_total", &[("kind", "ack")]),
            kernel_line(&ki, &kj),
        );
        assert_eq!(
            paws_tw_delta(&ki, &kj),
            u64::from(old_ts),
            "PAWS rejections (TcpExtPAWSTimewait, or TcpExtPAWSEstab up to 6.12) rise by 1 for an old-timestamp SYN, 0 for an old-sequence one"
        );
        assert_eq!(
            kdelta(&ki, &kj, "TcpExtTCPACKSkippedTimeWait"),
            0,
            "the minisocket's ACK was not rate limited (so the RST follows)"
        );
        assert!(ss_tuple(&ns, tw.server, tw.client).is_empty());
    }

    let m = daemon.scrape();
    let k1 = nstat(&ns);
    let d = |name: &str, f: &[(&str, &str)]| m.count(name, f) - m0.count(name, f);
    let syn = d("timewait_syn_total", &remote);
    let rej = d("timewait_syn_rejected_total", &remote);
    let resets = d("timewait_closed_total", &reset);
    let created = d("timewait_created_total", &[]);
    eprintln!(
        "syn_rejected: sent {sent}: syn_total+{syn} syn_rejected+{rej} reset+{resets} created+{created} \
         segments syn+{} rst+{} ack+{}; kernel: {}",
        d("timewait_segments_total", &[("kind", "syn")]),
        d("timewait_segments_total", &[("kind", "rst")]),
        d("timewait_segments_total", &[("kind", "ack")]),
        kernel_line(&k0, &k1)
    );
    assert_eq!(
        rej, sent,
        "syn_rejected_total rose by exactly 1 per SYN sent"
    );
    assert_eq!(syn, sent, "syn_total rose by exactly 1 per SYN sent");
    assert_eq!(
        resets, sent,
        "closed_total{{reason=reset}}: each rejection's ACK drew a killing RST"
    );
    // Both the rejected SYN and the killing RST end in tcp_v4_rcv's
    // discard_it with the minisocket as rx_sk.
    assert_eq!(
        d("timewait_segments_total", &[("kind", "syn")]),
        sent,
        "segments_total{{kind=syn}}"
    );
    assert_eq!(
        d("timewait_segments_total", &[("kind", "rst")]),
        sent,
        "segments_total{{kind=rst}}"
    );
    for reason in ["expired", "reused_by_syn", "reused_by_connect", "other"] {
        assert_eq!(
            d("timewait_closed_total", &[("reason", reason)]),
            0,
            "nothing closed for reason {reason}"
        );
    }
    assert_eq!(
        paws_tw_delta(&k0, &k1),
        u64::from(OLD_TS),
        "TcpExtPAWSTimewait == old-timestamp SYNs sent"
    );
    assert_eq!(created, sent, "one minisocket per round");
    if let Some(tw) = tw_created_delta(&k0, &k1) {
        assert_eq!(tw, created, "created_total == TcpExtTW + TcpExtTWKilled");
    }
    assert_eq!(kdelta(&k0, &k1, "TcpExtTWRecycled"), 0);
    assert_eq!(
        m.count("timewait_sockets", &[]),
        0,
        "every minisocket was reset"
    );
    assert_eq!(ns.ss_tw_total(), 0, "ss: no TIME_WAIT left");
}
