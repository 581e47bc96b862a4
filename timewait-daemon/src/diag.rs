//! The kernel's own list of TCP sockets, as `ss` gets it: a NETLINK_SOCK_DIAG
//! dump of this namespace. Used to reconcile the counts (reconcile.rs).

use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
};

use netlink_packet_core::{NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload};
use netlink_packet_sock_diag::{
    SockDiagMessage,
    constants::{AF_INET, AF_INET6, IPPROTO_TCP},
    inet::{ExtensionFlags, InetRequest, SocketId, StateFlags, Timer},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_SOCK_DIAG};
use thiserror::Error;
use timewait_common::{
    AF_INET as KAF_INET, AF_INET6 as KAF_INET6, AggKey, DIRECTION_INBOUND, DIRECTION_OUTBOUND, SUBSTATE_CONNECTION,
    TCP_CLOSE, TCP_FIN_WAIT2, TCP_LISTEN, TCP_SYN_RECV, TCP_TIME_WAIT,
};

#[derive(Debug, Error)]
pub enum DiagError {
    #[error("sock_diag netlink socket: {0}")]
    Io(#[from] std::io::Error),
    #[error("sock_diag reply malformed: {0}")]
    Malformed(String),
    #[error("sock_diag reply: kernel error {0}")]
    Kernel(i32),
}

/// One socket of the dump.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiagSock {
    pub state: u8,
    /// The TIME_WAIT timer runs: a minisocket (its `state` is the substate).
    pub tw_timer: bool,
    pub local_port: u16,
    pub remote: IpAddr,
    pub remote_port: u16,
}

/// Every TCP socket of this namespace, IPv4 and IPv6.
pub fn dump() -> Result<Vec<DiagSock>, DiagError> {
    let mut out = Vec::new();
    for family in [AF_INET, AF_INET6] {
        dump_family(family, &mut out)?;
    }
    Ok(out)
}

fn dump_family(family: u8, out: &mut Vec<DiagSock>) -> Result<(), DiagError> {
    let mut socket = Socket::new(NETLINK_SOCK_DIAG)?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    let mut packet = NetlinkMessage::new(
        header,
        SockDiagMessage::InetRequest(InetRequest {
            family,
            protocol: IPPROTO_TCP,
            extensions: ExtensionFlags::empty(),
            states: StateFlags::all(),
            socket_id: if family == AF_INET { SocketId::new_v4() } else { SocketId::new_v6() },
        })
        .into(),
    );
    packet.finalize();
    let mut buf = vec![0; packet.buffer_len()];
    packet.serialize(&mut buf[..]);
    socket.send(&buf[..], 0)?;

    let mut rx = vec![0u8; 1 << 16];
    loop {
        let n = socket.recv(&mut &mut rx[..], 0)?;
        if n == 0 {
            return Err(DiagError::Malformed("empty read before the end of the dump".into()));
        }
        if parse_batch(&rx[..n], out)? {
            return Ok(());
        }
    }
}

/// Parses one read of the dump into `out`; true once the dump is done.
/// Never panics on what the socket returns.
pub fn parse_batch(mut bytes: &[u8], out: &mut Vec<DiagSock>) -> Result<bool, DiagError> {
    while !bytes.is_empty() {
        let msg = NetlinkMessage::<SockDiagMessage>::deserialize(bytes).map_err(|e| DiagError::Malformed(e.to_string()))?;
        let len = msg.header.length as usize;
        if len < 16 || len > bytes.len() {
            return Err(DiagError::Malformed(format!("message length {len} in a read of {}", bytes.len())));
        }
        match msg.payload {
            NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(r)) => {
                let id = &r.header.socket_id;
                out.push(DiagSock {
                    state: r.header.state,
                    tw_timer: matches!(r.header.timer, Some(Timer::TimeWait)),
                    local_port: id.source_port,
                    remote: id.destination_address,
                    remote_port: id.destination_port,
                });
            }
            NetlinkPayload::Done(_) => return Ok(true),
            NetlinkPayload::Error(e) => return Err(DiagError::Kernel(e.code.map_or(0, |c| c.get()))),
            _ => {}
        }
        // Messages are 4-byte aligned.
        let next = (len + 3) & !3;
        bytes = bytes.get(next..).unwrap_or_default();
    }
    Ok(false)
}

/// What the programs would count for these sockets, keyed like `COUNTS` (in
/// namespace `netns`): minisockets by direction (inbound when a listener has
/// their local port), and connections whose local port has no listener.
/// `was_listening` adds ports that had a listener when the programs saw their
/// minisockets created, so a server that restarted does not flip the labels.
pub fn expected(socks: &[DiagSock], netns: u32, was_listening: &HashSet<u16>) -> HashMap<AggKey, i64> {
    let mut listening: HashSet<u16> = socks.iter().filter(|s| s.state == TCP_LISTEN).map(|s| s.local_port).collect();
    listening.extend(was_listening);
    let mut counts = HashMap::new();
    for s in socks {
        let (family, remote) = match s.remote {
            IpAddr::V4(a) => {
                let mut r = [0u8; 16];
                r[..4].copy_from_slice(&a.octets());
                (KAF_INET, r)
            }
            IpAddr::V6(a) => (KAF_INET6, a.octets()),
        };
        let inbound = listening.contains(&s.local_port);
        let mut key = AggKey { remote, family, ..AggKey::default() };
        key.netns = netns;
        let minisocket = s.state == TCP_TIME_WAIT || (s.state == TCP_FIN_WAIT2 && s.tw_timer);
        if minisocket {
            key.substate = s.state;
            (key.direction, key.port) =
                if inbound { (DIRECTION_INBOUND, s.local_port) } else { (DIRECTION_OUTBOUND, s.remote_port) };
        } else if !inbound && s.state != TCP_LISTEN && s.state != TCP_CLOSE && s.state != TCP_SYN_RECV && s.state < 12 {
            key.substate = SUBSTATE_CONNECTION;
            key.direction = DIRECTION_OUTBOUND;
            key.port = s.remote_port;
        } else {
            continue;
        }
        *counts.entry(key).or_insert(0) += 1;
    }
    counts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dump_of_this_namespace_parses() {
        // Any machine has at least a listener or none; the dump must succeed.
        match dump() {
            Ok(socks) => assert!(socks.iter().all(|s| s.state <= 12), "{socks:?}"),
            Err(e) => panic!("sock_diag dump failed: {e}"),
        }
    }

    #[test]
    fn malformed_replies_are_errors_not_panics() {
        let mut out = Vec::new();
        for junk in [&[0u8; 3][..], &[0xff; 64][..], &[16, 0, 0, 0, 20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0][..]] {
            let _ = parse_batch(junk, &mut out);
        }
        // A length field larger than the read.
        let mut lie = vec![0u8; 20];
        lie[0] = 200;
        assert!(parse_batch(&lie, &mut out).is_err());
    }

    proptest::proptest! {
        #[test]
        fn parse_batch_never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
            let mut out = Vec::new();
            let _ = parse_batch(&bytes, &mut out);
        }
    }

    #[test]
    fn expected_keys_follow_the_kernel_rules() {
        let s = |state, tw_timer, local_port, remote: &str, remote_port| DiagSock {
            state,
            tw_timer,
            local_port,
            remote: remote.parse().unwrap(),
            remote_port,
        };
        let socks = [
            s(TCP_LISTEN, false, 80, "0.0.0.0", 0),
            s(TCP_TIME_WAIT, true, 80, "10.0.0.1", 5555),
            s(TCP_FIN_WAIT2, true, 80, "10.0.0.1", 5556),
            s(TCP_FIN_WAIT2, false, 40000, "10.0.0.9", 443), // full socket: a connection
            s(TCP_TIME_WAIT, true, 40001, "10.0.0.9", 443),
            s(1, false, 80, "10.0.0.2", 6000), // accepted: not ours
        ];
        let e = expected(&socks, 7, &HashSet::new());
        let get = |dir, port, sub, ip: [u8; 4]| {
            let mut k = AggKey { family: KAF_INET, netns: 7, direction: dir, port, substate: sub, ..Default::default() };
            k.remote[..4].copy_from_slice(&ip);
            e.get(&k).copied()
        };
        assert_eq!(get(DIRECTION_INBOUND, 80, TCP_TIME_WAIT, [10, 0, 0, 1]), Some(1));
        assert_eq!(get(DIRECTION_INBOUND, 80, TCP_FIN_WAIT2, [10, 0, 0, 1]), Some(1));
        assert_eq!(get(DIRECTION_OUTBOUND, 443, SUBSTATE_CONNECTION, [10, 0, 0, 9]), Some(1));
        assert_eq!(get(DIRECTION_OUTBOUND, 443, TCP_TIME_WAIT, [10, 0, 0, 9]), Some(1));
        assert_eq!(e.len(), 4);
    }
}
