//! Conntrack entries made over ctnetlink (batched `IPCTNL_MSG_CT_NEW`) in a
//! namespace, for scenario 9; and `nf_conntrack_max` raised and always
//! restored.
//!
//! Each entry is the namespace's own TCP connection from `local:sport` to
//! `remote:80` (original source = reply destination = `local`, an address on
//! an interface of that namespace), so the daemon counts it as a port of
//! `local` held toward `remote:80` (RESEARCH.md §1.4: entries made this way
//! have no `IPS_SRC_NAT`, like a host's own connections). The status must
//! include `IPS_CONFIRMED` (else `-EBUSY`), `CTA_TIMEOUT` is required; the
//! timeout is an hour so that nothing expires during the bench.

#[allow(clippy::wildcard_imports)]
use super::*;

use netlink_packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_netfilter::{
    NetfilterHeader, NetfilterMessage, NetfilterProtoFamily,
    conntrack::{ConntrackAttribute, ConntrackMessage, IPTuple, ProtoInfo, ProtoInfoTCP, ProtoTuple, Protocol, Status, Tuple},
};
use netlink_sys::{Socket, SocketAddr as NlAddr, protocols::NETLINK_NETFILTER};

/// `enum tcp_conntrack`.
pub(super) const TCP_ESTABLISHED: u8 = 3;
pub(super) const TCP_TIME_WAIT: u8 = 7;

/// Messages per datagram (about 150 bytes each).
const BATCH: usize = 200;

/// One entry: the namespace's own connection `local:sport -> remote:dport`.
#[derive(Clone, Copy, Debug)]
pub(super) struct Ct {
    pub(super) local: Ipv4Addr,
    pub(super) sport: u16,
    pub(super) remote: Ipv4Addr,
    pub(super) dport: u16,
    pub(super) state: u8,
}

fn tuple(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16) -> Vec<Tuple> {
    vec![
        Tuple::Ip(vec![IPTuple::SourceAddress(src.into()), IPTuple::DestinationAddress(dst.into())]),
        Tuple::Proto(vec![ProtoTuple::Protocol(Protocol::Tcp), ProtoTuple::SourcePort(sport), ProtoTuple::DestinationPort(dport)]),
    ]
}

fn message(c: &Ct, seq: u32) -> NetlinkMessage<NetfilterMessage> {
    let attrs = vec![
        ConntrackAttribute::CtaTupleOrig(tuple(c.local, c.remote, c.sport, c.dport)),
        ConntrackAttribute::CtaTupleReply(tuple(c.remote, c.local, c.dport, c.sport)),
        ConntrackAttribute::CtaStatus(Status::Confirmed | Status::SeenReply | Status::Assured),
        ConntrackAttribute::CtaTimeout(3600),
        ConntrackAttribute::CtaProtoInfo(vec![ProtoInfo::TCP(vec![ProtoInfoTCP::State(c.state)])]),
    ];
    let mut hdr = NetlinkHeader::default();
    hdr.flags = NLM_F_REQUEST | NLM_F_CREATE | NLM_F_EXCL | NLM_F_ACK;
    hdr.sequence_number = seq;
    let mut m = NetlinkMessage::new(
        hdr,
        NetlinkPayload::from(NetfilterMessage::new(
            NetfilterHeader::new(NetfilterProtoFamily::IPv4, 0, 0),
            ConntrackMessage::New(attrs),
        )),
    );
    m.finalize();
    m
}

/// Inserts every entry into `ns`'s conntrack table; returns how many the
/// kernel acknowledged. Fails on the first error the kernel answers.
pub(super) fn fill(ns: &Netns, entries: impl Iterator<Item = Ct> + Send) -> Result<u64> {
    ns.within(|| {
        let mut sock = Socket::new(NETLINK_NETFILTER)?;
        sock.bind_auto()?;
        sock.connect(&NlAddr::new(0, 0))?;
        let _ = sock.set_rx_buf_sz(4 << 20);
        let mut out = Vec::with_capacity(BATCH * 200);
        let mut buf = vec![0u8; 1 << 16];
        let mut seq = 0u32;
        let mut done = 0u64;
        let mut entries = entries.peekable();
        while entries.peek().is_some() {
            out.clear();
            let mut sent = 0usize;
            for c in entries.by_ref().take(BATCH) {
                seq = seq.wrapping_add(1);
                let m = message(&c, seq);
                let at = out.len();
                out.resize(at + m.buffer_len(), 0);
                m.serialize(&mut out[at..]);
                sent += 1;
            }
            sock.send(&out, 0)?;
            // One acknowledgement (an error message with code 0) per request.
            let mut acked = 0usize;
            while acked < sent {
                let n = sock.recv(&mut &mut buf[..], 0)?;
                let mut off = 0;
                while off < n {
                    let m = <NetlinkMessage<NetfilterMessage>>::deserialize(&buf[off..n])
                        .map_err(|e| std::io::Error::other(format!("ctnetlink answer: {e}")))?;
                    let len = m.header.length as usize;
                    if let NetlinkPayload::Error(e) = m.payload {
                        if let Some(code) = e.code {
                            return Err(std::io::Error::other(format!(
                                "IPCTNL_MSG_CT_NEW #{} failed: {}",
                                m.header.sequence_number,
                                std::io::Error::from_raw_os_error(-code.get())
                            )));
                        }
                        acked += 1;
                        done += 1;
                    }
                    if len == 0 {
                        break;
                    }
                    off += (len + 3) & !3;
                }
            }
        }
        Ok(done)
    })
    .context("conntrack fill over ctnetlink")
}

/// `nf_conntrack_count` of `ns`.
pub(super) fn count(ns: &Netns) -> Result<u64> {
    let t = ns.within(|| std::fs::read_to_string("/proc/sys/net/netfilter/nf_conntrack_count"))?;
    t.trim().parse().context("nf_conntrack_count")
}

const CT_MAX: &str = "/proc/sys/net/netfilter/nf_conntrack_max";

/// `nf_conntrack_max` (global: writable in the initial namespace only),
/// raised for the bench and restored on drop, error or not. The value to
/// restore is also written to `target/bench/nf_conntrack_max.restore` so
/// that a bench killed meanwhile is repaired by the next one
/// ([`restore_stale_limit`]).
pub(super) struct CtLimit {
    prev: String,
    file: PathBuf,
}

impl CtLimit {
    /// Makes room for at least `n` entries in one namespace (nothing is
    /// changed when there is room already).
    pub(super) fn at_least(logs: &Path, n: usize) -> Result<Option<Self>> {
        let prev = std::fs::read_to_string(CT_MAX).context("read nf_conntrack_max")?.trim().to_string();
        let cur: usize = prev.parse().context("nf_conntrack_max")?;
        if cur >= n {
            return Ok(None);
        }
        let file = logs.join("nf_conntrack_max.restore");
        std::fs::write(&file, format!("{prev} {}\n", std::process::id()))?;
        let want = n + n / 10;
        std::fs::write(CT_MAX, want.to_string()).with_context(|| format!("raise nf_conntrack_max to {want}"))?;
        progress(format!("  nf_conntrack_max {prev} -> {want} (restored afterwards)"));
        Ok(Some(CtLimit { prev, file }))
    }
}

impl Drop for CtLimit {
    fn drop(&mut self) {
        match std::fs::write(CT_MAX, &self.prev) {
            Ok(()) => {
                let _ = std::fs::remove_file(&self.file);
                progress(format!("  nf_conntrack_max restored to {}", self.prev));
            }
            Err(e) => eprintln!("bench: cannot restore nf_conntrack_max={}: {e}", self.prev),
        }
    }
}

/// Restores `nf_conntrack_max` left raised by a bench that was killed.
pub(super) fn restore_stale_limit(logs: &Path) {
    let file = logs.join("nf_conntrack_max.restore");
    let Ok(text) = std::fs::read_to_string(&file) else { return };
    let mut f = text.split_whitespace();
    let (Some(v), pid) = (f.next(), f.next().unwrap_or("")) else { return };
    if !pid.is_empty() && Path::new(&format!("/proc/{pid}")).exists() {
        return;
    }
    if v.parse::<u64>().is_ok() && std::fs::write(CT_MAX, v).is_ok() {
        progress(format!("restored nf_conntrack_max={v} left raised by an earlier run"));
        let _ = std::fs::remove_file(&file);
    }
}
