//! The NAT balancer's lab (issue 27): clients -> a router namespace doing SNAT/MASQUERADE onto a small port range -> a server, and `conntrack -L` in the router as the oracle.
//!
//! ```text
//!  c 10.98.1.2 (+ .3 .. with `clients`) ── r 10.98.1.1 | 10.98.3.1 (+ pool) ── s 10.98.3.2
//! ```
//!
//! c routes only 10.98.3.0/24 via r; s has only its connected subnet (it
//! answers the NAT addresses on-link); r forwards. Nothing is routed out of
//! the namespaces.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};

use super::lab::{route, veth};
use crate::support::{NetNs, run_cmd};

pub const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 98, 1, 2);
pub const NAT_ADDRESS: Ipv4Addr = Ipv4Addr::new(10, 98, 3, 1);
pub const SERVER: Ipv4Addr = Ipv4Addr::new(10, 98, 3, 2);
/// The router's interface toward the server.
pub const OUT_IF: &str = "to-s";

/// How the router translates.
pub enum Nat<'a> {
    /// `iptables -t nat -A POSTROUTING -o to-s -p PROTO -j MASQUERADE --to-ports RANGE` (iptables-nft).
    IptablesMasquerade { protocols: &'a [&'a str], ports: &'a str },
    /// nft native `masquerade to :RANGE`.
    NftMasquerade { ports: &'a str },
    /// nft native `snat ip to A-B:RANGE` with the pool's addresses added on `to-s`.
    NftSnatPool { first: Ipv4Addr, last: Ipv4Addr, ports: &'a str },
}

pub struct Router {
    pub c: NetNs,
    pub r: NetNs,
    pub s: NetNs,
}

impl Router {
    /// The three namespaces, `clients` addresses on c (10.98.1.2, .3, ...),
    /// and the NAT rule.
    #[track_caller]
    pub fn new(nat: Nat<'_>, clients: u8) -> Router {
        let (c, r, s) = (NetNs::new(), NetNs::new(), NetNs::new());
        veth(&c, "eth0", "10.98.1.2/24", &r, "to-c", "10.98.1.1/24");
        veth(&r, OUT_IF, "10.98.3.1/24", &s, "eth0", "10.98.3.2/24");
        for i in 1..clients {
            run_cmd("ip", &["-n", c.name(), "addr", "add", &format!("10.98.1.{}/24", 2 + i), "dev", "eth0"]);
        }
        route(&c, "10.98.3.0/24", "10.98.1.1");
        r.sysctl("net.ipv4.ip_forward", "1");
        match nat {
            Nat::IptablesMasquerade { protocols, ports } => {
                for p in protocols {
                    r.exec(&["iptables", "-t", "nat", "-A", "POSTROUTING", "-o", OUT_IF, "-p", p, "-j", "MASQUERADE", "--to-ports", ports]);
                }
            }
            Nat::NftMasquerade { ports } => nft(
                &r,
                &format!(
                    "table ip twlab {{\n chain post {{\n  type nat hook postrouting priority srcnat;\n  oifname \"{OUT_IF}\" meta l4proto udp masquerade to :{ports}\n  oifname \"{OUT_IF}\" meta l4proto tcp masquerade to :{ports}\n }}\n}}\n"
                ),
            ),
            Nat::NftSnatPool { first, last, ports } => {
                let (a, b) = (u32::from(first), u32::from(last));
                for addr in a..=b {
                    run_cmd("ip", &["-n", r.name(), "addr", "add", &format!("{}/24", Ipv4Addr::from(addr)), "dev", OUT_IF]);
                }
                nft(
                    &r,
                    &format!(
                        "table ip twlab {{\n chain post {{\n  type nat hook postrouting priority srcnat;\n  oifname \"{OUT_IF}\" meta l4proto udp snat ip to {first}-{last}:{ports}\n  oifname \"{OUT_IF}\" meta l4proto tcp snat ip to {first}-{last}:{ports}\n }}\n}}\n"
                    ),
                );
            }
        }
        // The rule brought conntrack into r. Unanswered UDP entries last
        // 30 s by default: longer than a daemon's start-up in an emulated
        // guest. Tests compare at quiet moments; keep them 10 minutes.
        r.sysctl("net.netfilter.nf_conntrack_udp_timeout", "600");
        Router { c, r, s }
    }

    pub fn client(i: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, 98, 1, 2 + i)
    }

    pub fn server(port: u16) -> SocketAddrV4 {
        SocketAddrV4::new(SERVER, port)
    }
}

fn nft(ns: &NetNs, ruleset: &str) {
    let path = std::env::temp_dir().join(format!("twlab-{}-{}.nft", std::process::id(), ns.name()));
    std::fs::write(&path, ruleset).expect("write the nft ruleset");
    let p = path.to_string_lossy().to_string();
    ns.exec(&["nft", "-f", &p]);
    std::fs::remove_file(&path).ok();
}

/// One `conntrack -L` line, as the NAT side counts it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CtLine {
    pub protocol: String,
    pub state: Option<String>,
    pub orig_src: IpAddr,
    pub reply_src: IpAddr,
    pub reply_dst: IpAddr,
    pub reply_sport: u16,
    pub reply_dport: u16,
}

/// `conntrack -L` in `ns`, parsed (TCP and UDP only).
pub fn conntrack_l(ns: &NetNs) -> Vec<CtLine> {
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", ns.name(), "conntrack", "-L"])
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run conntrack -L");
    assert!(out.status.success(), "conntrack -L failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).lines().filter_map(parse_line).collect()
}

fn parse_line(line: &str) -> Option<CtLine> {
    let words: Vec<&str> = line.split_whitespace().collect();
    let protocol = (*words.first()?).to_string();
    if protocol != "tcp" && protocol != "udp" {
        return None;
    }
    let state = (protocol == "tcp").then(|| words.get(3).map(|s| (*s).to_string())).flatten();
    let field = |key: &str, nth: usize| -> Option<&str> {
        words.iter().filter_map(|w| w.strip_prefix(key)).nth(nth)
    };
    Some(CtLine {
        protocol,
        state,
        orig_src: field("src=", 0)?.parse().ok()?,
        reply_src: field("src=", 1)?.parse().ok()?,
        reply_dst: field("dst=", 1)?.parse().ok()?,
        reply_sport: field("sport=", 1)?.parse().ok()?,
        reply_dport: field("dport=", 1)?.parse().ok()?,
    })
}

/// Key of a `timewait_nat_*` series: (nat_address, remote, port, protocol).
pub type NatKey = (String, String, String, String);

/// The oracle's counts: entries whose reply tuple goes to one of `nat`
/// (in use, TIME_WAIT) per series key.
pub fn oracle(lines: &[CtLine], nat: &[Ipv4Addr]) -> BTreeMap<NatKey, (u64, u64)> {
    let mut out: BTreeMap<NatKey, (u64, u64)> = BTreeMap::new();
    for l in lines {
        if !nat.iter().any(|a| IpAddr::V4(*a) == l.reply_dst) {
            continue;
        }
        let key = (l.reply_dst.to_string(), l.reply_src.to_string(), l.reply_sport.to_string(), l.protocol.clone());
        let slot = out.entry(key).or_default();
        slot.0 += 1;
        slot.1 += u64::from(l.state.as_deref() == Some("TIME_WAIT"));
    }
    out
}

/// The daemon's counts in the same shape, for the NAT addresses `nat` (the
/// router's own connections, the scrapes' among them, count too: under
/// their own address, which the oracle leaves out).
pub fn from_metrics(m: &crate::support::Metrics, nat: &[Ipv4Addr]) -> BTreeMap<NatKey, (u64, u64)> {
    let mut out: BTreeMap<NatKey, (u64, u64)> = BTreeMap::new();
    for (name, slot) in [("timewait_nat_ports_in_use", 0), ("timewait_nat_ports_time_wait", 1)] {
        for (labels, v) in m.series(name) {
            let get = |k: &str| labels.get(k).cloned().unwrap_or_default();
            let key = (get("nat_address"), get("remote"), get("port"), get("protocol"));
            let e = out.entry(key).or_default();
            if slot == 0 {
                e.0 = v as u64;
            } else {
                e.1 = v as u64;
            }
        }
    }
    out.retain(|k, v| v.0 > 0 && nat.iter().any(|a| a.to_string() == k.0));
    out
}

/// The sum of a stat over CPUs from `/proc/net/stat/nf_conntrack` in `ns`.
pub fn conntrack_stat(ns: &NetNs, stat: &str) -> u64 {
    let text = ns.exec(&["cat", "/proc/net/stat/nf_conntrack"]);
    let mut lines = text.lines();
    let Some(header) = lines.next() else { return 0 };
    let Some(col) = header.split_whitespace().position(|h| h == stat) else { return 0 };
    lines
        .filter_map(|l| l.split_whitespace().nth(col))
        .map(|v| u64::from_str_radix(v, 16).unwrap_or(0))
        .sum()
}

/// A UDP datagram from a fresh socket of `from` (bound to `bind`'s address,
/// any port) to `to`.
pub fn udp_send(ns: &NetNs, bind: Ipv4Addr, to: SocketAddrV4) {
    ns.run(|| {
        let s = std::net::UdpSocket::bind(SocketAddr::V4(SocketAddrV4::new(bind, 0))).expect("bind a UDP socket");
        s.send_to(b"x", to).expect("send a datagram");
    });
}
