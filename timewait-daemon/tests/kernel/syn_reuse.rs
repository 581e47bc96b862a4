//! Issue 3, test 1: SYNs accepted on a 4-tuple held in TIME_WAIT.
//!
//! A client bound to one fixed address:port (SO_REUSEADDR) connects K = 20
//! times to a server that closes first. Each connection leaves the server a
//! TIME_WAIT minisocket on the same 4-tuple; the next connection's SYN (newer
//! sequence number and timestamp) arrives for it and is accepted: the
//! minisocket is killed and the listener takes the SYN
//! (`tcp_timewait_state_process` -> TCP_TW_SYN, net/ipv4/tcp_minisocks.c).
//! So 19 SYNs hit a minisocket, none rejected, 19 minisockets reused, each
//! within milliseconds of its birth; the 20th is still in TIME_WAIT.

use std::net::{SocketAddr, SocketAddrV4, TcpListener};

use crate::support::{Daemon, NetNs, require_root, segments_available};
use crate::support::syn::{
    fixed_port_client, kdelta, kernel_line, lifetime_bucket, nstat, sa4, wait_count, wait_eof,
    wait_only_time_wait, paws_tw_delta, tw_created_delta};

const K: u64 = 20;

/// `k` connections from exactly `client` to `listener`, the server closing
/// first each time; before the next one, waits until `ss` shows the
/// server's minisocket in TIME_WAIT and nothing else on the 4-tuple, so each
/// SYN after the first meets a TIME_WAIT minisocket (not FIN_WAIT2, not the
/// client's own LAST_ACK socket).
#[track_caller]
pub fn reconnect_from_fixed_port(ns: &NetNs, listener: &TcpListener, client: SocketAddrV4, k: u64) {
    let server = match listener.local_addr().expect("listener address") {
        SocketAddr::V4(a) => a,
        other => panic!("IPv4 listener expected, got {other}"),
    };
    for i in 0..k {
        ns.run(|| {
            let c = fixed_port_client(client, server)
                .unwrap_or_else(|e| panic!("connection {i} from {client}: {e}"));
            let (srv, peer) = listener.accept().expect("accept");
            assert_eq!(
                peer,
                SocketAddr::V4(client),
                "connection {i} comes from the fixed port"
            );
            drop(srv);
            wait_eof(&c);
            drop(c);
        });
        wait_only_time_wait(ns, server, client);
    }
}

#[test]
fn syn_reuse() {
    if !require_root("syn_reuse") || !segments_available("syn_reuse") {
        return;
    }
    let ns = NetNs::new();
    let listener = ns.listen("127.0.0.1:8080".parse().unwrap());
    let client = sa4([127, 0, 0, 2], 50000);
    let daemon = Daemon::start(&ns, &[]);
    let remote = [("remote", "127.0.0.2")];

    let m0 = daemon.scrape();
    let k0 = nstat(&ns);

    reconnect_from_fixed_port(&ns, &listener, client, K);

    let syn0 = m0.count("timewait_syn_total", &remote);
    let rej0 = m0.count("timewait_syn_rejected_total", &remote);
    let reuse0 = m0.count("timewait_closed_total", &[("reason", "reused_by_syn")]);
    let life0 = m0.count(
        "timewait_lifetime_seconds_count",
        &[("reason", "reused_by_syn")],
    );
    // A reuse follows its minisocket's creation within a second on the host;
    // emulated guests of the kernel matrix run 10-30x slower.
    let bound = if crate::support::emulated() { 10.0 } else { 1.0 };
    let le1_0 = lifetime_bucket(&m0, "reused_by_syn", bound);

    wait_count(
        &daemon,
        "timewait_closed_total",
        &[("reason", "reused_by_syn")],
        reuse0 + K - 1,
    );
    let m = wait_count(&daemon, "timewait_syn_total", &remote, syn0 + K - 1);
    let k1 = nstat(&ns);
    let syn = m.count("timewait_syn_total", &remote) - syn0;
    let rej = m.count("timewait_syn_rejected_total", &remote) - rej0;
    let reuse = m.count("timewait_closed_total", &[("reason", "reused_by_syn")]) - reuse0;
    let life = m.count(
        "timewait_lifetime_seconds_count",
        &[("reason", "reused_by_syn")],
    ) - life0;
    let le1 = lifetime_bucket(&m, "reused_by_syn", bound) - le1_0;
    let created = m.count("timewait_created_total", &[]) - m0.count("timewait_created_total", &[]);
    eprintln!(
        "syn_reuse: syn_total+{syn} syn_rejected+{rej} reused_by_syn+{reuse} \
         lifetime_count{{reused_by_syn}}+{life} (le=1: +{le1}) created+{created}; kernel: {}",
        kernel_line(&k0, &k1)
    );
    assert_eq!(
        syn,
        K - 1,
        "timewait_syn_total{{remote=127.0.0.2}} rose by K-1"
    );
    assert_eq!(
        rej, 0,
        "timewait_syn_rejected_total{{remote=127.0.0.2}} did not rise"
    );
    assert_eq!(
        reuse,
        K - 1,
        "closed_total{{reason=reused_by_syn}} rose by K-1"
    );
    assert_eq!(
        life,
        K - 1,
        "lifetime_seconds_count{{reason=reused_by_syn}} rose by K-1"
    );
    assert_eq!(le1, K - 1, "every reused_by_syn lifetime is <= {bound} s");
    for reason in ["expired", "reused_by_connect", "reset", "other"] {
        assert_eq!(
            m.count("timewait_closed_total", &[("reason", reason)]),
            m0.count("timewait_closed_total", &[("reason", reason)]),
            "nothing closed for reason {reason}"
        );
    }
    // Accepted SYNs go to the listener, never to a minisocket's drop path
    // (other kinds may be: whether the client's FIN meets the full socket or
    // the FIN_WAIT2 minisocket depends on timing, so they are not asserted).
    for kind in ["syn", "rst"] {
        assert_eq!(
            m.count("timewait_segments_total", &[("kind", kind)]),
            m0.count("timewait_segments_total", &[("kind", kind)]),
            "no {kind} segment dropped by a minisocket"
        );
    }
    // Kernel: every minisocket is counted once when scheduled, in TcpExtTW
    // (timeout > 4 s) or TcpExtTWKilled (<= 4 s) (__inet_twsk_schedule,
    // net/ipv4/inet_timewait_sock.c). An accepted SYN has no counter of its
    // own; it bumps neither PAWSTimewait nor TWRecycled.
    assert_eq!(created, K, "one minisocket per connection");
    if let Some(tw) = tw_created_delta(&k0, &k1) {
        assert_eq!(tw, created, "created_total == TcpExtTW + TcpExtTWKilled");
    }
    assert_eq!(paws_tw_delta(&k0, &k1), 0);
    assert_eq!(kdelta(&k0, &k1, "TcpExtTWRecycled"), 0);
    // The last connection's minisocket is still there.
    assert_eq!(ns.ss_tw_total(), 1, "ss: one TIME_WAIT left");
    assert_eq!(
        m.count("timewait_sockets", &[]),
        1,
        "timewait_sockets: one left"
    );
}
