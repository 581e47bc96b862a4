//! Conntrack over netlink (ctnetlink): one streaming dump of the calling thread's namespace, each entry handed on as it is parsed.
//!
//! `IPCTNL_MSG_CT_GET` with `NLM_F_DUMP` and family `AF_UNSPEC` lists every
//! entry of every layer-3 family. A netlink socket belongs to the namespace
//! its creator was in at `socket()`, so the caller enters the namespace
//! first. Nothing is held but one datagram: memory does not grow with the
//! table (RESEARCH.md §1.5: ~3.7 µs of CPU per entry, half of it the
//! kernel's). Needs CAP_NET_ADMIN. Dumps are not atomic: entries made or
//! removed during one may be missed or seen twice; `interrupted` says when
//! the kernel noticed (`NLM_F_DUMP_INTR`).

use std::net::IpAddr;

use netlink_packet_core::{Nla as _, NLM_F_DUMP, NLM_F_DUMP_INTR, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload};
use netlink_packet_netfilter::{
    NetfilterHeader, NetfilterMessage, NetfilterMessageInner, NetfilterProtoFamily,
    conntrack::{
        ConntrackAttribute, ConntrackMessage, IPTuple, ProtoInfo, ProtoInfoTCP, ProtoTuple, Protocol as CtProto, Status, Tuple,
    },
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_NETFILTER};

/// `enum tcp_conntrack`: TIME_WAIT.
pub const TCP_CONNTRACK_TIME_WAIT: u8 = 7;
/// `enum tcp_conntrack`: CLOSE (after a reset; ends at its 10 s timeout).
pub const TCP_CONNTRACK_CLOSE: u8 = 8;
/// `CTA_ID`: the entry's id (a hash: may collide, RESEARCH.md §1.5).
const CTA_ID: u16 = 12;

/// What one entry says about the port it holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    /// Reply tuple: from the destination (`reply_src:reply_sport`) to the
    /// translated source (`reply_dst:reply_dport`).
    /// Original direction's source: the client (NATed or forwarded flows)
    /// or this host (its own connections).
    pub orig_src: Option<IpAddr>,
    /// `IPS_SRC_NAT`: the source was translated (reply dst = the NAT address).
    pub src_nat: bool,
    /// `IPS_ASSURED`: traffic seen both ways (a UDP entry then lasts while refreshed).
    pub assured: bool,
    pub reply_src: IpAddr,
    pub reply_dst: IpAddr,
    pub reply_sport: u16,
    pub reply_dport: u16,
    /// IP protocol number.
    pub protocol: u8,
    /// conntrack's TCP state (`enum tcp_conntrack`), TCP only.
    pub tcp_state: Option<u8>,
    /// Seconds until the entry times out.
    pub timeout: Option<u32>,
    pub id: Option<u32>,
}

#[derive(Debug, thiserror::Error)]
pub enum CtError {
    #[error("ctnetlink: permission denied (needs CAP_NET_ADMIN)")]
    Permission,
    #[error("ctnetlink: {0}")]
    Io(#[from] std::io::Error),
    #[error("ctnetlink: the kernel answered error {0}")]
    Kernel(i32),
    #[error("ctnetlink: a message did not parse: {0}")]
    Parse(String),
}

/// One dump's bookkeeping.
#[derive(Debug, Default, Clone, Copy)]
pub struct DumpStats {
    pub entries: u64,
    pub datagrams: u64,
    /// Entries without a reply tuple with addresses and ports (other protocols).
    pub skipped: u64,
    /// The kernel flagged the dump as interrupted (the table changed under it).
    pub interrupted: bool,
}

/// A ctnetlink socket bound to the namespace it was opened in.
pub struct Conntrack {
    socket: Socket,
    buf: Vec<u8>,
    seq: u32,
}

impl Entry {
    /// Whether the entry ends on its own at its timeout (TCP TIME_WAIT or
    /// CLOSE; UDP not ASSURED), rather than being held by traffic.
    pub fn expiring(&self) -> bool {
        match self.protocol {
            6 => matches!(self.tcp_state, Some(TCP_CONNTRACK_TIME_WAIT | TCP_CONNTRACK_CLOSE)),
            17 => !self.assured,
            _ => false,
        }
    }
}

impl Conntrack {
    /// Opens a socket in the calling thread's namespace.
    pub fn open() -> Result<Self, CtError> {
        let mut socket = Socket::new(NETLINK_NETFILTER)?;
        socket.bind_auto()?;
        socket.connect(&SocketAddr::new(0, 0))?;
        // A dump arrives in datagrams of up to 32 KiB; a large receive
        // buffer lets the kernel run ahead of the parser.
        let _ = socket.set_rx_buf_sz(4 << 20);
        Ok(Self { socket, buf: vec![0; 256 << 10], seq: 0 })
    }

    /// Dumps every entry, calling `f` on each as it is parsed.
    pub fn dump(&mut self, mut f: impl FnMut(&Entry)) -> Result<DumpStats, CtError> {
        self.seq = self.seq.wrapping_add(1);
        let mut hdr = NetlinkHeader::default();
        hdr.flags = NLM_F_REQUEST | NLM_F_DUMP;
        hdr.sequence_number = self.seq;
        let mut req = NetlinkMessage::new(
            hdr,
            NetlinkPayload::from(NetfilterMessage::new(
                NetfilterHeader::new(NetfilterProtoFamily::Unspec, 0, 0),
                ConntrackMessage::Get(vec![]),
            )),
        );
        req.finalize();
        let mut out = vec![0; req.buffer_len()];
        req.serialize(&mut out);
        self.socket.send(&out, 0)?;
        let mut stats = DumpStats::default();
        loop {
            let n = self.socket.recv(&mut &mut self.buf[..], 0)?;
            if n > self.buf.len() {
                return Err(CtError::Parse(format!("a datagram of {n} bytes does not fit {}", self.buf.len())));
            }
            stats.datagrams += 1;
            let mut off = 0;
            while off < n {
                let msg = <NetlinkMessage<NetfilterMessage>>::deserialize(&self.buf[off..n])
                    .map_err(|e| CtError::Parse(e.to_string()))?;
                let len = msg.header.length as usize;
                if msg.header.flags & NLM_F_DUMP_INTR != 0 {
                    stats.interrupted = true;
                }
                match msg.payload {
                    NetlinkPayload::Done(_) => return Ok(stats),
                    NetlinkPayload::Error(e) => {
                        return Err(match e.code.map(|c| -c.get()) {
                            Some(libc::EPERM) => CtError::Permission,
                            Some(c) => CtError::Kernel(c),
                            None => CtError::Kernel(0),
                        });
                    }
                    NetlinkPayload::InnerMessage(NetfilterMessage {
                        inner: NetfilterMessageInner::Conntrack(ConntrackMessage::New(attrs)),
                        ..
                    }) => {
                        stats.entries += 1;
                        match entry_of(&attrs) {
                            Some(e) => f(&e),
                            None => stats.skipped += 1,
                        }
                    }
                    _ => {}
                }
                if len == 0 {
                    break;
                }
                off += nlmsg_align(len);
            }
        }
    }
}

fn nlmsg_align(len: usize) -> usize {
    (len + 3) & !3
}

/// Pure: an entry's attributes into what the fold needs; None when the
/// reply tuple lacks addresses or ports (ICMP, GRE, ...).
pub fn entry_of(attrs: &[ConntrackAttribute]) -> Option<Entry> {
    let mut reply = None;
    let mut orig_src = None;
    let mut src_nat = false;
    let mut assured = false;
    let mut tcp_state = None;
    let mut timeout = None;
    let mut id = None;
    for a in attrs {
        match a {
            ConntrackAttribute::CtaTupleReply(t) => reply = Some(tuple_of(t)?),
            ConntrackAttribute::CtaTupleOrig(t) => orig_src = tuple_of(t).map(|o| o.0),
            ConntrackAttribute::CtaStatus(st) => (src_nat, assured) = (st.contains(Status::SrcNat), st.contains(Status::Assured)),
            ConntrackAttribute::CtaProtoInfo(p) => {
                for info in p {
                    if let ProtoInfo::TCP(tcp) = info {
                        for t in tcp {
                            if let ProtoInfoTCP::State(s) = t {
                                tcp_state = Some(*s);
                            }
                        }
                    }
                }
            }
            ConntrackAttribute::CtaTimeout(t) => timeout = Some(*t),
            ConntrackAttribute::Other(nla) if nla.kind() == CTA_ID => {
                let mut v = [0u8; 4];
                if nla.value_len() == 4 {
                    nla.emit_value(&mut v);
                    id = Some(u32::from_be_bytes(v));
                }
            }
            _ => {}
        }
    }
    let (src, dst, sport, dport, protocol) = reply?;
    Some(Entry { orig_src, src_nat, assured, reply_src: src, reply_dst: dst, reply_sport: sport, reply_dport: dport, protocol, tcp_state, timeout, id })
}

fn tuple_of(t: &[Tuple]) -> Option<(IpAddr, IpAddr, u16, u16, u8)> {
    let (mut src, mut dst, mut sport, mut dport, mut proto) = (None, None, None, None, None);
    for part in t {
        match part {
            Tuple::Ip(ip) => {
                for i in ip {
                    match i {
                        IPTuple::SourceAddress(a) => src = Some(*a),
                        IPTuple::DestinationAddress(a) => dst = Some(*a),
                        _ => {}
                    }
                }
            }
            Tuple::Proto(p) => {
                for i in p {
                    match i {
                        ProtoTuple::Protocol(p) => proto = Some(proto_number(*p)),
                        ProtoTuple::SourcePort(p) => sport = Some(*p),
                        ProtoTuple::DestinationPort(p) => dport = Some(*p),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    Some((src?, dst?, sport?, dport?, proto?))
}

fn proto_number(p: CtProto) -> u8 {
    u8::from(p)
}
