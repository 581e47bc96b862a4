//! Ground truth from the capture: which SYNs met a TIME_WAIT minisocket, and which of those the server refused.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddrV4};

use crate::support::nat::capture::{ACK, FIN, Packet, RST, SYN};

/// How long a minisocket holds its 4-tuple (`TCP_TIMEWAIT_LEN`).
pub const TIME_WAIT_LEN: f64 = 60.0;

/// What the server holds on one 4-tuple, as the capture shows it.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Tuple {
    /// Nothing (never used, reset, or closed by the client first).
    Free,
    /// A connection (from its SYN-ACK on) and who has sent a FIN so far.
    Open { server_fin: bool, client_fin: bool },
    /// The server closed first and the client's FIN arrived at `since`: the
    /// server's minisocket is in TIME_WAIT, expecting `rcv_nxt` next.
    TimeWait { since: f64, rcv_nxt: u32 },
}

/// A SYN that met a TIME_WAIT and waits for the server's verdict.
#[derive(Debug, Clone, Copy)]
struct Pending {
    t: f64,
    seq: u32,
    answered_ack: bool,
    /// The minisocket's `tw_snd_nxt` (the server's FIN + 1): a SYN it lets
    /// through gets the ISN `tw_snd_nxt + 65535 + 2` (`tcp_tw_isn`).
    tw_snd_nxt: Option<u32>,
}

#[derive(Debug, Default, Clone)]
pub struct SynTruth {
    /// SYNs (without ACK) from the remote.
    pub syns: u64,
    /// Of those, the ones that met a TIME_WAIT minisocket.
    pub hits: u64,
    /// Hits answered with a SYN-ACK for that very SYN.
    pub accepted: u64,
    /// Of those, the ones whose SYN-ACK carries the ISN the kernel derives
    /// from the minisocket (`tw_snd_nxt + 65537`): proof on the wire that the
    /// SYN went through the TIME_WAIT and was let through by it.
    pub accepted_isn_from_tw: u64,
    /// Hits not accepted.
    pub rejected: u64,
    /// Rejected hits the server answered with a bare ACK.
    pub rejected_acked: u64,
    /// Rejected hits the server did not answer at all.
    pub rejected_silent: u64,
    /// Hits whose sequence number repeats an earlier SYN on the 4-tuple (a
    /// retransmission).
    pub hits_retransmitted: u64,
    /// Connections the server closed first (each left a TIME_WAIT).
    pub server_first: u64,
    /// Connections the client closed first.
    pub client_first: u64,
    /// TIME_WAITs killed by the client's RST at exactly `rcv_nxt`.
    pub tw_reset: u64,
    /// SYNs on a 4-tuple in FIN_WAIT2 (server FIN sent, client FIN not in
    /// yet): not TIME_WAIT, reported apart.
    pub syn_in_fin_wait2: u64,
    /// SYN-ACKs from the server (connections opened).
    pub syn_acks: u64,
    /// First to last packet of the capture, seconds.
    pub span: f64,
    /// Distinct remote ports.
    pub ports: u64,
    /// A few rejected and accepted hits, for the report.
    pub examples: Vec<String>,
    /// Every hit that was a retransmission, for the report.
    pub retransmitted: Vec<String>,
}

/// The ground-truth rule (see `nat_lab`'s doc comment), over every segment
/// between `remote` (any port) and `server`, in capture order.
pub fn syn_truth(packets: &[Packet], remote: Ipv4Addr, server: SocketAddrV4) -> SynTruth {
    let mut tuples: BTreeMap<u16, Tuple> = BTreeMap::new();
    let mut pending: BTreeMap<u16, Pending> = BTreeMap::new();
    let mut syn_seqs: BTreeMap<u16, Vec<u32>> = BTreeMap::new();
    let mut server_nxt: BTreeMap<u16, u32> = BTreeMap::new();
    let mut out = SynTruth::default();
    let (mut first, mut last) = (None, 0.0f64);
    let reject = |out: &mut SynTruth, port: u16, p: Pending, why: &str| {
        out.rejected += 1;
        if p.answered_ack {
            out.rejected_acked += 1;
        } else {
            out.rejected_silent += 1;
        }
        if out.examples.len() < 6 {
            out.examples.push(format!(
                "rejected: SYN {remote}:{port} seq {} at {:.6} ({}; {why})",
                p.seq,
                p.t,
                if p.answered_ack {
                    "answered with an ACK"
                } else {
                    "not answered"
                }
            ));
        }
    };
    for p in packets {
        let from_remote = *p.src.ip() == remote && p.dst == server;
        let to_remote = p.src == server && *p.dst.ip() == remote;
        if !from_remote && !to_remote {
            continue;
        }
        first.get_or_insert(p.t);
        last = p.t;
        let port = if from_remote { p.src.port() } else { p.dst.port() };
        let state = tuples.entry(port).or_insert(Tuple::Free);
        if from_remote {
            // Any later segment from the remote settles a verdict still
            // open: the server did not answer the SYN with its SYN-ACK.
            if let Some(pend) = pending.remove(&port) {
                reject(&mut out, port, pend, "the remote's next segment came first");
            }
            if p.has(SYN) && !p.has(ACK) {
                out.syns += 1;
                let seqs = syn_seqs.entry(port).or_default();
                let retransmitted = seqs.contains(&p.seq);
                seqs.push(p.seq);
                match *state {
                    Tuple::TimeWait { since, .. } if p.t - since < TIME_WAIT_LEN => {
                        out.hits += 1;
                        if retransmitted {
                            out.hits_retransmitted += 1;
                            out.retransmitted.push(format!(
                                "SYN {remote}:{port} seq {} at {:.6} (TIME_WAIT since {since:.6})",
                                p.seq, p.t
                            ));
                        }
                        pending.insert(
                            port,
                            Pending {
                                t: p.t,
                                seq: p.seq,
                                answered_ack: false,
                                tw_snd_nxt: server_nxt.get(&port).copied(),
                            },
                        );
                    }
                    Tuple::TimeWait { .. } => *state = Tuple::Free,
                    Tuple::Open {
                        server_fin: true,
                        client_fin: false,
                    } => out.syn_in_fin_wait2 += 1,
                    _ => {}
                }
            } else if p.has(RST) {
                if let Tuple::TimeWait { rcv_nxt, .. } = *state
                    && p.seq == rcv_nxt
                {
                    out.tw_reset += 1;
                    *state = Tuple::Free;
                }
            } else if p.has(FIN)
                && let Tuple::Open { server_fin, .. } = *state
            {
                if server_fin {
                    out.server_first += 1;
                    *state = Tuple::TimeWait {
                        since: p.t,
                        rcv_nxt: p.seq.wrapping_add(p.len).wrapping_add(1),
                    };
                } else {
                    *state = Tuple::Open {
                        server_fin: false,
                        client_fin: true,
                    };
                }
            }
        } else if p.has(SYN) && p.has(ACK) {
            out.syn_acks += 1;
            if let Some(pend) = pending.remove(&port) {
                if p.ack == pend.seq.wrapping_add(1) {
                    out.accepted += 1;
                    if pend.tw_snd_nxt.map(|n| n.wrapping_add(65537)) == Some(p.seq) {
                        out.accepted_isn_from_tw += 1;
                    }
                    if out.examples.len() < 6 {
                        out.examples.push(format!(
                            "accepted: SYN {remote}:{port} seq {} at {:.6}, SYN-ACK at {:.6}",
                            pend.seq, pend.t, p.t
                        ));
                    }
                } else {
                    reject(&mut out, port, pend, "a SYN-ACK for another sequence number");
                }
            }
            *state = Tuple::Open {
                server_fin: false,
                client_fin: false,
            };
        } else if p.has(RST) {
            *state = Tuple::Free;
        } else if p.has(FIN) {
            server_nxt.insert(port, p.seq.wrapping_add(p.len).wrapping_add(1));
            if let Tuple::Open { client_fin, .. } = *state {
                if client_fin {
                    out.client_first += 1;
                    *state = Tuple::Free;
                } else {
                    *state = Tuple::Open {
                        server_fin: true,
                        client_fin: false,
                    };
                }
            }
        } else if p.has(ACK)
            && let Some(pend) = pending.get_mut(&port)
        {
            pend.answered_ack = true;
        }
    }
    for (port, pend) in std::mem::take(&mut pending) {
        reject(&mut out, port, pend, "the capture ended");
    }
    out.span = first.map_or(0.0, |f| last - f);
    out.ports = tuples.len() as u64;
    out
}

/// `SynTruth` as one line for the report.
pub fn truth_line(t: &SynTruth) -> String {
    let mut s = String::new();
    let _ = write!(
        s,
        "SYNs {} (SYN-ACKs {}), hitting TIME_WAIT {} (retransmissions {}): accepted {} (ISN from the TIME_WAIT {}), rejected {} \
         ({} answered with an ACK, {} silent); server closed first {}, client first {}; \
         TIME_WAIT reset by the client {}; SYNs in FIN_WAIT2 {}; {} remote ports; span {:.1} s",
        t.syns,
        t.syn_acks,
        t.hits,
        t.hits_retransmitted,
        t.accepted,
        t.accepted_isn_from_tw,
        t.rejected,
        t.rejected_acked,
        t.rejected_silent,
        t.server_first,
        t.client_first,
        t.tw_reset,
        t.syn_in_fin_wait2,
        t.ports,
        t.span
    );
    s
}

/// The rule on a hand-written capture (no root needed): a rejected SYN
/// answered with an ACK and followed by the client's RST at `rcv_nxt` (its
/// retransmission then meets the listener: no hit), a silent rejection whose
/// retransmission meets the TIME_WAIT again and is accepted, a client-first
/// close (no TIME_WAIT on the server), and expiry after 60 s.
#[test]
fn syn_truth_rule() {
    let nat = Ipv4Addr::new(10, 77, 3, 1);
    let server = SocketAddrV4::new(Ipv4Addr::new(10, 77, 3, 2), 80);
    let c = |port| SocketAddrV4::new(nat, port);
    let mut t = 0.0;
    let mut pk = Vec::new();
    let mut push = |dt: f64, from_client: bool, port: u16, flags: u16, seq: u32, ack: u32| {
        t += dt;
        let (src, dst) = if from_client {
            (c(port), server)
        } else {
            (server, c(port))
        };
        pk.push(Packet {
            t,
            src,
            dst,
            flags,
            seq,
            ack,
            len: 0,
        });
    };
    // A connection the server closes first: SYN, SYN-ACK, ACK, server FIN,
    // client FIN (TIME_WAIT from here, rcv_nxt = fin_seq + 1), last ACK.
    let conn = |push: &mut dyn FnMut(f64, bool, u16, u16, u32, u32), port, isn: u32, server_first: bool| {
        push(0.001, true, port, SYN, isn, 0);
        push(0.001, false, port, SYN | ACK, 5000, isn + 1);
        push(0.001, true, port, ACK, isn + 1, 5001);
        if server_first {
            push(0.001, false, port, FIN | ACK, 5001, isn + 1);
            push(0.001, true, port, FIN | ACK, isn + 1, 5002);
            push(0.001, false, port, ACK, 5002, isn + 2);
        } else {
            push(0.001, true, port, FIN | ACK, isn + 1, 5001);
            push(0.001, false, port, FIN | ACK, 5001, isn + 2);
            push(0.001, true, port, ACK, isn + 2, 5002);
        }
    };
    conn(&mut push, 40000, 100, true);
    // Rejected (ACK, then the client's RST at rcv_nxt 102 kills the TIME_WAIT).
    push(1.0, true, 40000, SYN, 50, 0);
    push(0.001, false, 40000, ACK, 5002, 102);
    push(0.001, true, 40000, RST, 102, 0);
    // Its retransmission meets no TIME_WAIT: a plain new connection.
    conn(&mut push, 40000, 50, true);
    // Rejected silently, retransmitted 1 s later, accepted then.
    push(1.0, true, 40000, SYN, 10, 0);
    push(1.0, true, 40000, SYN, 10, 0);
    push(0.001, false, 40000, SYN | ACK, 5002 + 65537, 11);
    push(0.001, true, 40000, ACK, 11, 5002 + 65538);
    // Closed by the client first: no TIME_WAIT on the server.
    push(0.001, true, 40000, FIN | ACK, 11, 5002 + 65538);
    push(0.001, false, 40000, FIN | ACK, 5002 + 65538, 12);
    push(0.001, true, 40000, ACK, 12, 5002 + 65539);
    conn(&mut push, 40000, 900, true);
    // Another port: its TIME_WAIT expires before the next SYN.
    conn(&mut push, 40001, 100, true);
    push(61.0, true, 40001, SYN, 200, 0);
    push(0.001, false, 40001, SYN | ACK, 8000, 201);
    let truth = syn_truth(&pk, nat, server);
    assert_eq!(
        (truth.hits, truth.rejected, truth.accepted, truth.hits_retransmitted),
        (3, 2, 1, 1),
        "{}",
        truth_line(&truth)
    );
    assert_eq!((truth.rejected_acked, truth.rejected_silent, truth.tw_reset), (1, 1, 1));
    assert_eq!((truth.server_first, truth.client_first), (4, 1));
    assert_eq!(truth.accepted_isn_from_tw, 1);
}
