//! The port range each SNAT/MASQUERADE rule allows, read from the kernel's nf_tables ruleset.
//!
//! One `NFT_MSG_GETRULE` dump (every family) per call of [`read`], through
//! `netlink-packet-netfilter`'s `nftables` types, in the calling thread's
//! network namespace. Three front ends store a NAT source range there
//! (`RESEARCH.md` §2.1, measured with `nft --debug=netlink`):
//! - native nft `masquerade to :A-B`: a `masq` expression whose
//!   `REG_PROTO_MIN/MAX` name registers loaded by `immediate` expressions
//!   earlier in the rule (ports big-endian in the register's first bytes);
//! - native nft `snat ip to X-Y:A-B`: a `nat` expression (type snat), the
//!   same for the addresses (`REG_ADDR_MIN/MAX`);
//! - iptables-nft `-j MASQUERADE --to-ports` / `-j SNAT --to-source`: an xt
//!   compat `target` expression whose info blob is the x_tables struct of
//!   the target's family and revision (`nf_nat_ipv4_multi_range_compat`,
//!   `nf_nat_range`, `nf_nat_range2`).
//!
//! A rule's protocol comes from a `meta l4proto` (or `ip protocol` /
//! `ip6 nexthdr`) comparison, its out interface from a `meta oifname` (or
//! `meta oif`) comparison; a rule without them applies to tcp and udp, and
//! to every address. A range held in registers loaded by anything else than
//! an `immediate` (a map lookup, `numgen`…) is never guessed: the rule is
//! counted by [`Rules::unreadable`]. A condition it does not read (a set of
//! interfaces, a source subnet, a mark…) only narrows which packets a rule
//! takes, so it is treated as matching: two such rules for one address
//! show as a union with `conflict`. Every rule of the ip/ip6/inet tables is
//! looked at: the kernel accepts `masq`/`nat`/SNAT only in nat chains.
//!
//! iptables-legacy rules are not in nf_tables at all (they live in
//! `IPT_SO_GET_ENTRIES`, which needs CAP_NET_RAW besides): they are out of
//! scope here, and `--nat-port-range` covers them.

// Nothing outside the tests calls this module until `reader.rs` does (the
// lead's integration); drop this allow then.

use std::ffi::CStr;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::AsRawFd;
use std::path::Path;

use netlink_packet_core::{
    DefaultNla, NetlinkBuffer, NetlinkHeader, NetlinkMessage, NetlinkPayload, Nla, NlasIterator, NLA_TYPE_MASK,
    NLM_F_DUMP, NLM_F_DUMP_INTR, NLM_F_REQUEST,
};
use netlink_packet_netfilter::nftables::{
    Cmp, DataAttribute, ExpressionAttribute, Expressions, Immediate, ListAttribute, Lookup, Meta, MetaKey,
    NfTablesMessage, Operator, Payload, Register, RuleAttribute, RuleMessage,
};
use netlink_packet_netfilter::{NetfilterHeader, NetfilterMessage, NetfilterMessageInner, NetfilterProtoFamily};
use netlink_sys::{protocols::NETLINK_NETFILTER, Socket, SocketAddr};

use super::{PortRange, Protocol};

/// Why the ruleset could not be read.
#[derive(Debug, thiserror::Error)]
pub enum RulesetError {
    #[error("nf_tables: cannot open a netfilter netlink socket: {0}")]
    Socket(io::Error),
    #[error("nf_tables: the rule dump needs CAP_NET_ADMIN: {0}")]
    Permission(io::Error),
    #[error("nf_tables: the kernel refused the rule dump: {0}")]
    Kernel(io::Error),
    #[error("nf_tables: netlink I/O failed during the rule dump: {0}")]
    Io(io::Error),
    #[error("nf_tables: malformed netlink reply to the rule dump: {0}")]
    Malformed(String),
    #[error("nf_tables: the ruleset changed during each of {0} rule dumps in a row")]
    Interrupted(u32),
}

/// The SNAT/MASQUERADE rules of one network namespace, as far as their
/// port ranges go.
#[derive(Clone, Debug, Default)]
pub struct Rules {
    rules: Vec<NatRule>,
    /// Rule messages the netlink crate could not parse (one line each).
    unparsed: Vec<String>,
}

/// What the rules allow for one (NAT address, protocol).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RuleRange {
    pub range: PortRange,
    /// More than one rule matches and they do not all allow the same ports
    /// (a rule naming no ports, i.e. the kernel's default, counts as
    /// different): `range` is then the span of those that name ports.
    pub conflict: bool,
}

/// Reads the nf_tables ruleset of the calling thread's network namespace
/// (the caller has already `setns()`'d). Needs CAP_NET_ADMIN.
///
/// Never makes the kernel autoload nf_tables (RESEARCH 4.2): when nf_tables
/// is neither loaded nor built in, and modules exist, returns
/// `Ok(Rules::empty())` without opening a socket.
pub fn read() -> Result<Rules, RulesetError> {
    if !nf_tables_queryable() {
        return Ok(Rules::empty());
    }
    for _ in 0..DUMP_ATTEMPTS {
        if let Some(rules) = dump(&resolve_ifindex)? {
            return Ok(rules);
        }
    }
    Err(RulesetError::Interrupted(DUMP_ATTEMPTS))
}

/// The interface that holds `addr` in the calling thread's network namespace
/// (the first `getifaddrs` lists, if several do).
pub fn interface_of(addr: IpAddr) -> Option<String> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: `head` is a valid out-pointer; the list is freed below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return None;
    }
    let mut found = None;
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned, alive until freeifaddrs.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        if ifa.ifa_addr.is_null() || ifa.ifa_name.is_null() {
            continue;
        }
        // SAFETY: non-null ifa_addr points to a sockaddr of the family it names.
        let family = i32::from(unsafe { (*ifa.ifa_addr).sa_family });
        let here = match family {
            libc::AF_INET => {
                // SAFETY: AF_INET entries hold a sockaddr_in.
                let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
                IpAddr::V4(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)))
            }
            libc::AF_INET6 => {
                // SAFETY: AF_INET6 entries hold a sockaddr_in6.
                let sin6 = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in6) };
                IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr))
            }
            _ => continue,
        };
        if here == addr {
            // SAFETY: ifa_name is a NUL-terminated string owned by the list.
            found = Some(unsafe { CStr::from_ptr(ifa.ifa_name) }.to_string_lossy().into_owned());
            break;
        }
    }
    // SAFETY: `head` came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(head) };
    found
}

impl Rules {
    pub fn empty() -> Rules {
        Rules::default()
    }

    /// The range rules allow for source ports of `nat_address` and `protocol`.
    ///
    /// `iface_of(addr)` names the interface that holds `addr` in that
    /// namespace (MASQUERADE rules name an out interface, not an address).
    /// None when no rule names ports for this address/protocol. Several
    /// matching rules with different ranges: the span of those naming
    /// ports (min of mins, max of maxes), and `conflict` set; a matching
    /// rule naming no ports does not widen the span but sets `conflict`.
    /// Unreadable rules are left out (see [`Rules::unreadable`]).
    pub fn range_for(
        &self,
        nat_address: IpAddr,
        protocol: Protocol,
        iface_of: &dyn Fn(IpAddr) -> Option<String>,
    ) -> Option<RuleRange> {
        let mut iface: Option<Option<String>> = None;
        let mut iface_lookup = || iface.get_or_insert_with(|| iface_of(nat_address)).clone();
        let mut ranges: Vec<PortRange> = Vec::new();
        let mut portless = false;
        for rule in &self.rules {
            let Ok(target) = &rule.target else { continue };
            if !rule.protocols.has(protocol) || !rule.families.has(nat_address) {
                continue;
            }
            let applies = match (&rule.kind, &target.addrs) {
                (_, AddrSel::Unknown) => false,
                (Kind::Snat, AddrSel::Range(min, max)) => in_range(nat_address, *min, *max),
                // SNAT without addresses keeps the source address: any address.
                (Kind::Snat, AddrSel::Any) => true,
                // MASQUERADE takes an address of the out interface.
                (Kind::Masquerade, _) => {
                    rule.oif.is_empty() || {
                        let name = iface_lookup();
                        rule.oif.iter().all(|c| c.matches(name.as_deref()))
                    }
                }
            };
            if !applies {
                continue;
            }
            match target.ports {
                Some(r) => ranges.push(r),
                None => portless = true,
            }
        }
        let first = *ranges.first()?;
        let range = ranges.iter().fold(first, |acc, r| PortRange { min: acc.min.min(r.min), max: acc.max.max(r.max) });
        let conflict = portless || ranges.iter().any(|r| *r != first);
        Some(RuleRange { range, conflict })
    }

    /// One line per rule found, for `timewaitd check`
    /// (e.g. "ip nat POSTROUTING: MASQUERADE -o to-s tcp ports 40000-40007").
    pub fn describe(&self) -> Vec<String> {
        self.rules.iter().map(NatRule::describe).chain(self.unparsed.iter().cloned()).collect()
    }

    /// Rules whose range cannot be read statically (registers loaded by a
    /// map lookup, an unknown xt revision, attributes that do not parse…).
    pub fn unreadable(&self) -> usize {
        self.rules.iter().filter(|r| r.target.is_err()).count() + self.unparsed.len()
    }
}

// ---------------------------------------------------------------------------
// The model of one rule.

/// Address families a rule applies to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Families {
    v4: bool,
    v6: bool,
}

impl Families {
    fn has(self, addr: IpAddr) -> bool {
        match addr {
            IpAddr::V4(_) => self.v4,
            IpAddr::V6(_) => self.v6,
        }
    }
}

/// Layer-4 protocols (of those holding ports) a rule applies to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Protocols {
    tcp: bool,
    udp: bool,
}

impl Protocols {
    const BOTH: Protocols = Protocols { tcp: true, udp: true };

    fn has(self, p: Protocol) -> bool {
        match p {
            Protocol::Tcp => self.tcp,
            Protocol::Udp => self.udp,
        }
    }

    /// The rule requires (`equal`) or excludes IP protocol `proto`.
    fn restrict(&mut self, proto: u8, equal: bool) {
        for p in [Protocol::Tcp, Protocol::Udp] {
            let is = p.ip_number() == proto;
            if is != equal {
                match p {
                    Protocol::Tcp => self.tcp = false,
                    Protocol::Udp => self.udp = false,
                }
            }
        }
    }
}

/// An out-interface condition of a rule.
#[derive(Clone, Debug, PartialEq, Eq)]
struct IfaceCond {
    name: String,
    /// `-o eth+` / `oifname "eth*"`: the cmp holds the prefix without a NUL.
    prefix: bool,
    negate: bool,
}

impl IfaceCond {
    fn matches(&self, iface: Option<&str>) -> bool {
        let hit = match iface {
            Some(i) if self.prefix => i.starts_with(&self.name),
            Some(i) => i == self.name,
            None => false,
        };
        hit != self.negate
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Masquerade,
    Snat,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum FrontEnd {
    /// iptables-nft: an xt compat target.
    Xt,
    /// nft: a `masq` / `nat` expression.
    Native,
}

/// The addresses an SNAT rule hands out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum AddrSel {
    /// No address given (MASQUERADE, or SNAT keeping the source address).
    Any,
    Range(IpAddr, IpAddr),
    /// Loaded from a map: which addresses is not known statically.
    Unknown,
}

/// What the NAT expression hands out, when readable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Target {
    addrs: AddrSel,
    /// None: the rule names no ports (the kernel's default range).
    ports: Option<PortRange>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct NatRule {
    family: u8,
    table: String,
    chain: String,
    front: FrontEnd,
    kind: Kind,
    families: Families,
    protocols: Protocols,
    oif: Vec<IfaceCond>,
    /// Err: why the range cannot be read statically.
    target: Result<Target, String>,
}

impl NatRule {
    fn describe(&self) -> String {
        let mut s = format!("{} {} {}: ", family_name(self.family), self.table, self.chain);
        s.push_str(match (self.front, self.kind) {
            (FrontEnd::Xt, Kind::Masquerade) => "MASQUERADE",
            (FrontEnd::Xt, Kind::Snat) => "SNAT",
            (FrontEnd::Native, Kind::Masquerade) => "masquerade",
            (FrontEnd::Native, Kind::Snat) => "snat",
        });
        for c in &self.oif {
            s.push_str(if c.negate { " ! -o " } else { " -o " });
            s.push_str(&c.name);
            if c.prefix {
                s.push('+');
            }
        }
        match (self.protocols.tcp, self.protocols.udp) {
            (true, true) => {}
            (true, false) => s.push_str(" tcp"),
            (false, true) => s.push_str(" udp"),
            (false, false) => s.push_str(" (no tcp/udp)"),
        }
        match &self.target {
            Err(why) => {
                s.push_str(" ports unreadable: ");
                s.push_str(why);
            }
            Ok(t) => {
                match t.addrs {
                    AddrSel::Any => {}
                    AddrSel::Range(a, b) if a == b => s.push_str(&format!(" to {a}")),
                    AddrSel::Range(a, b) => s.push_str(&format!(" to {a}-{b}")),
                    AddrSel::Unknown => s.push_str(" to (addresses from a map)"),
                }
                match t.ports {
                    Some(p) if p.min == p.max => s.push_str(&format!(" port {}", p.min)),
                    Some(p) => s.push_str(&format!(" ports {}-{}", p.min, p.max)),
                    None => s.push_str(" no ports (kernel default)"),
                }
            }
        }
        s
    }
}

fn in_range(addr: IpAddr, min: IpAddr, max: IpAddr) -> bool {
    match (addr, min, max) {
        (IpAddr::V4(a), IpAddr::V4(lo), IpAddr::V4(hi)) => (u32::from(lo)..=u32::from(hi)).contains(&u32::from(a)),
        (IpAddr::V6(a), IpAddr::V6(lo), IpAddr::V6(hi)) => (u128::from(lo)..=u128::from(hi)).contains(&u128::from(a)),
        _ => false,
    }
}

// ---------------------------------------------------------------------------
// Kernel constants (include/uapi/linux/netfilter/*.h).

const NFPROTO_INET: u8 = 1;
const NFPROTO_IPV4: u8 = 2;
const NFPROTO_IPV6: u8 = 10;

const NF_NAT_RANGE_MAP_IPS: u32 = 1 << 0;
const NF_NAT_RANGE_PROTO_SPECIFIED: u32 = 1 << 1;

const NFTA_MASQ_FLAGS: u16 = 1;
const NFTA_MASQ_REG_PROTO_MIN: u16 = 2;
const NFTA_MASQ_REG_PROTO_MAX: u16 = 3;

const NFTA_NAT_TYPE: u16 = 1;
const NFTA_NAT_FAMILY: u16 = 2;
const NFTA_NAT_REG_ADDR_MIN: u16 = 3;
const NFTA_NAT_REG_ADDR_MAX: u16 = 4;
const NFTA_NAT_REG_PROTO_MIN: u16 = 5;
const NFTA_NAT_REG_PROTO_MAX: u16 = 6;
const NFTA_NAT_FLAGS: u16 = 7;
const NFT_NAT_SNAT: u32 = 0;

const NFTA_TARGET_NAME: u16 = 1;
const NFTA_TARGET_REV: u16 = 2;
const NFTA_TARGET_INFO: u16 = 3;

const NFT_PAYLOAD_NETWORK_HEADER: u32 = 1;

const NLMSG_HDRLEN: usize = 16;
const NFTA_RULE_EXPRESSIONS: u16 = 4;
const NFTA_EXPR_NAME: u16 = 1;
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFT_MSG_NEWRULE: u16 = 6;

/// 32-bit register slots: 4 for the verdict, 16 for data (`NFT_REG32_NUM`).
const SLOTS: usize = 20;

const DUMP_ATTEMPTS: u32 = 3;

fn family_name(family: u8) -> String {
    match family {
        NFPROTO_INET => "inet".into(),
        NFPROTO_IPV4 => "ip".into(),
        NFPROTO_IPV6 => "ip6".into(),
        other => format!("family{other}"),
    }
}

/// The kernel's 32-bit slot of a register number (`nft_parse_register`):
/// `NFT_REG_1..4` are 16 bytes wide and start at slot `reg * 4`,
/// `NFT_REG32_00..15` (8..23) are slots 4..19.
fn slot_of(reg: u32) -> Option<usize> {
    match reg {
        0..=4 => Some(reg as usize * 4),
        8..=23 => Some(reg as usize - 4),
        _ => None,
    }
}

// ---------------------------------------------------------------------------
// Register tracking within one rule.

/// What a rule's registers hold at some point of its expression list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Slot {
    Unknown,
    /// First slot of a `meta load KEY`.
    Meta(MetaKey),
    /// First slot of a 1-byte network-header payload load at this offset.
    NetByte(u32),
    /// Four bytes an `immediate` wrote.
    Data([u8; 4]),
}

struct Registers([Slot; SLOTS]);

impl Registers {
    fn new() -> Self {
        Registers([Slot::Unknown; SLOTS])
    }

    fn forget_all(&mut self) {
        self.0 = [Slot::Unknown; SLOTS];
    }

    /// A load of `len` bytes into `reg`, the first slot marked `first`.
    fn load(&mut self, reg: u32, len: usize, first: Slot) {
        let Some(start) = slot_of(reg) else {
            self.forget_all();
            return;
        };
        let n = len.div_ceil(4).max(1);
        for i in start..(start + n).min(SLOTS) {
            self.0[i] = Slot::Unknown;
        }
        if start < SLOTS {
            self.0[start] = first;
        }
    }

    fn immediate(&mut self, reg: u32, bytes: &[u8]) {
        let Some(start) = slot_of(reg) else {
            self.forget_all();
            return;
        };
        for (i, chunk) in bytes.chunks(4).enumerate() {
            let mut b = [0u8; 4];
            b[..chunk.len()].copy_from_slice(chunk);
            if let Some(s) = self.0.get_mut(start + i) {
                *s = Slot::Data(b);
            }
        }
    }

    fn get(&self, reg: u32) -> Slot {
        slot_of(reg).and_then(|s| self.0.get(s).copied()).unwrap_or(Slot::Unknown)
    }

    /// `len` bytes an immediate wrote from `reg` on, if all of them did.
    fn bytes(&self, reg: u32, len: usize) -> Option<Vec<u8>> {
        let start = slot_of(reg)?;
        let mut out = Vec::with_capacity(len);
        for i in 0..len.div_ceil(4) {
            match self.0.get(start + i)? {
                Slot::Data(b) => out.extend_from_slice(b),
                _ => return None,
            }
        }
        out.truncate(len);
        Some(out)
    }

    /// `nft_reg_load16`: the port, big-endian in the register's first two bytes.
    fn port(&self, reg: u32) -> Option<u16> {
        let b = self.bytes(reg, 2)?;
        Some(u16::from_be_bytes([b[0], b[1]]))
    }

    fn addr(&self, reg: u32, v6: bool) -> Option<IpAddr> {
        if v6 {
            let b: [u8; 16] = self.bytes(reg, 16)?.try_into().ok()?;
            Some(IpAddr::V6(Ipv6Addr::from(b)))
        } else {
            let b: [u8; 4] = self.bytes(reg, 4)?.try_into().ok()?;
            Some(IpAddr::V4(Ipv4Addr::from(b)))
        }
    }
}

/// Bytes a meta key loads (`nft_meta_get_init`), enough for slot tracking.
fn meta_len(key: MetaKey) -> usize {
    match key {
        MetaKey::Iifname
        | MetaKey::Oifname
        | MetaKey::BriIifname
        | MetaKey::BriOifname
        | MetaKey::Iifkind
        | MetaKey::Oifkind
        | MetaKey::Sdifname => 16,
        MetaKey::TimeNs | MetaKey::BriIifhwaddr => 8,
        _ => 4,
    }
}

/// Expressions that write no register (everything else unknown is assumed
/// to write any).
fn writes_no_register(name: &str) -> bool {
    matches!(
        name,
        "counter"
            | "log"
            | "limit"
            | "quota"
            | "notrack"
            | "match"
            | "target"
            | "masq"
            | "nat"
            | "redir"
            | "reject"
            | "queue"
            | "dup"
            | "fwd"
            | "connlimit"
            | "last"
            | "objref"
            | "dynset"
            | "range"
            | "synproxy"
            | "tproxy"
            | "flow_offload"
            | "secmark"
    )
}

// ---------------------------------------------------------------------------
// Decoding.

fn nla_kind(nla: &DefaultNla) -> u16 {
    nla.kind() & NLA_TYPE_MASK
}

fn nla_value(nla: &DefaultNla) -> Vec<u8> {
    let mut v = vec![0u8; nla.value_len()];
    nla.emit_value(&mut v);
    v
}

fn attr(attrs: &[DefaultNla], kind: u16) -> Option<&DefaultNla> {
    attrs.iter().find(|a| nla_kind(a) == kind)
}

/// A big-endian u32 attribute; Err when present but not 4 bytes.
fn attr_u32(attrs: &[DefaultNla], kind: u16) -> Result<Option<u32>, String> {
    match attr(attrs, kind) {
        None => Ok(None),
        Some(a) => {
            let v = nla_value(a);
            let b: [u8; 4] =
                v.as_slice().try_into().map_err(|_| format!("attribute {kind} is {} bytes, not 4", v.len()))?;
            Ok(Some(u32::from_be_bytes(b)))
        }
    }
}

/// Decodes one `NFT_MSG_NEWRULE` body into its NAT rule, if it has one.
/// `ifname_of(index)` names an interface index (for `meta oif`).
fn decode_rule(family: u8, attrs: &[RuleAttribute], ifname_of: &dyn Fn(u32) -> Option<String>) -> Option<NatRule> {
    let families = match family {
        NFPROTO_IPV4 => Families { v4: true, v6: false },
        NFPROTO_IPV6 => Families { v4: false, v6: true },
        NFPROTO_INET => Families { v4: true, v6: true },
        _ => return None,
    };
    let mut table = String::new();
    let mut chain = String::new();
    let mut exprs: &[ListAttribute<ExpressionAttribute>] = &[];
    for a in attrs {
        match a {
            RuleAttribute::Table(t) => table = t.clone(),
            RuleAttribute::Chain(c) => chain = c.clone(),
            RuleAttribute::Expressions(e) => exprs = e,
            _ => {}
        }
    }
    let mut rule = NatRule {
        family,
        table,
        chain,
        front: FrontEnd::Native,
        kind: Kind::Masquerade,
        families,
        protocols: Protocols::BOTH,
        oif: Vec::new(),
        target: Err(String::new()),
    };
    let mut regs = Registers::new();
    for elem in exprs {
        let ListAttribute::Element(parts) = elem else { continue };
        let mut name: Option<&str> = None;
        let mut data: Option<&Expressions> = None;
        for p in parts {
            match p {
                ExpressionAttribute::Name(n) => name = Some(n),
                ExpressionAttribute::Data(d) => data = Some(d),
                _ => {}
            }
        }
        // An expression without data (`notrack`; a `masq` without flags or
        // registers, should a kernel leave out the empty nest): its name
        // with no attributes.
        let bare;
        let data = match data {
            Some(d) => d,
            None => {
                bare = Expressions::Other { expression_type: name.unwrap_or_default().into(), attributes: vec![] };
                &bare
            }
        };
        match data {
            Expressions::Immediate(im) => immediate(&mut regs, im),
            Expressions::Meta(m) => meta(&mut regs, m),
            Expressions::Payload(p) => payload(&mut regs, p),
            Expressions::Cmp(c) => cmp(&regs, c, &mut rule, ifname_of),
            Expressions::Lookup(l) => {
                if l.iter().any(|x| matches!(x, Lookup::DestinationRegister(_))) {
                    regs.forget_all();
                }
            }
            Expressions::Bitwise(_) => regs.forget_all(),
            Expressions::Other { expression_type, attributes } => {
                let nat = match expression_type.as_str() {
                    "masq" => Some(masq(&regs, attributes).map(|t| (FrontEnd::Native, Kind::Masquerade, t))),
                    "nat" => nat(&regs, attributes).map(|r| {
                        r.map(|(fams, t)| {
                            let f = &mut rule.families;
                            *f = Families { v4: f.v4 && fams.v4, v6: f.v6 && fams.v6 };
                            (FrontEnd::Native, Kind::Snat, t)
                        })
                    }),
                    "target" => xt_target(family, attributes).map(|r| r.map(|(k, t)| (FrontEnd::Xt, k, t))),
                    other if writes_no_register(other) => None,
                    _ => {
                        regs.forget_all();
                        None
                    }
                };
                if let Some(found) = nat {
                    match found {
                        Ok((front, kind, target)) => {
                            rule.front = front;
                            rule.kind = kind;
                            rule.target = Ok(target);
                        }
                        Err((front, kind, why)) => {
                            rule.front = front;
                            rule.kind = kind;
                            rule.target = Err(why);
                        }
                    }
                    return Some(rule);
                }
            }
            _ => regs.forget_all(),
        }
    }
    None
}

type Decoded<T> = Result<T, (FrontEnd, Kind, String)>;

fn reg_of(r: &Register) -> u32 {
    u32::from(*r)
}

fn immediate(regs: &mut Registers, im: &[Immediate]) {
    let mut dreg = None;
    let mut value = None;
    for x in im {
        match x {
            Immediate::DestinationRegister(r) => dreg = Some(reg_of(r)),
            Immediate::Data(DataAttribute::Value(v)) => value = Some(v.as_slice()),
            _ => {}
        }
    }
    match (dreg, value) {
        (Some(0), _) => {} // a verdict
        (Some(r), Some(v)) => regs.immediate(r, v),
        (Some(r), None) => regs.load(r, 16, Slot::Unknown),
        (None, _) => {}
    }
}

fn meta(regs: &mut Registers, m: &[Meta]) {
    let mut dreg = None;
    let mut key = None;
    for x in m {
        match x {
            Meta::DestinationRegister(r) => dreg = Some(reg_of(r)),
            Meta::Key(k) => key = Some(*k),
            _ => {}
        }
    }
    if let Some(r) = dreg {
        match key {
            Some(k) => regs.load(r, meta_len(k), Slot::Meta(k)),
            None => regs.load(r, 16, Slot::Unknown),
        }
    }
}

fn payload(regs: &mut Registers, p: &[Payload]) {
    let (mut dreg, mut base, mut offset, mut len) = (None, None, None, None);
    for x in p {
        match x {
            Payload::DestinationRegister(r) => dreg = Some(reg_of(r)),
            Payload::Base(b) => base = Some(*b),
            Payload::Offset(o) => offset = Some(*o),
            Payload::Len(l) => len = Some(*l),
            _ => {}
        }
    }
    let Some(r) = dreg else { return };
    let len = len.unwrap_or(16) as usize;
    let first = match (base, offset) {
        (Some(NFT_PAYLOAD_NETWORK_HEADER), Some(o)) if len == 1 => Slot::NetByte(o),
        _ => Slot::Unknown,
    };
    regs.load(r, len, first);
}

/// A comparison the rule makes: protocol and out interface narrow it;
/// anything else is ignored (it can only narrow which packets match, not
/// which address or ports they get).
fn cmp(regs: &Registers, c: &[Cmp], rule: &mut NatRule, ifname_of: &dyn Fn(u32) -> Option<String>) {
    let (mut sreg, mut op, mut value) = (None, Operator::Equal, None);
    for x in c {
        match x {
            Cmp::SourceRegister(r) => sreg = Some(reg_of(r)),
            Cmp::Op(o) => op = *o,
            Cmp::Data(DataAttribute::Value(v)) => value = Some(v.as_slice()),
            _ => {}
        }
    }
    let (Some(sreg), Some(value)) = (sreg, value) else { return };
    let equal = match op {
        Operator::Equal => true,
        Operator::NotEqual => false,
        _ => return,
    };
    let proto_byte = || value.first().copied().filter(|_| value.len() == 1 || value[1..].iter().all(|b| *b == 0));
    match regs.get(sreg) {
        Slot::Meta(MetaKey::L4Proto) => {
            if let Some(p) = proto_byte() {
                rule.protocols.restrict(p, equal);
            }
        }
        // `ip protocol` (IPv4 header byte 9) / `ip6 nexthdr` (IPv6 byte 6).
        Slot::NetByte(9) if rule.family == NFPROTO_IPV4 => {
            if let Some(p) = proto_byte() {
                rule.protocols.restrict(p, equal);
            }
        }
        Slot::NetByte(6) if rule.family == NFPROTO_IPV6 => {
            if let Some(p) = proto_byte() {
                rule.protocols.restrict(p, equal);
            }
        }
        Slot::Meta(MetaKey::Nfproto) if equal => match value.first() {
            Some(&NFPROTO_IPV4) => rule.families.v6 = false,
            Some(&NFPROTO_IPV6) => rule.families.v4 = false,
            _ => {}
        },
        Slot::Meta(MetaKey::Oifname) => {
            let (name, prefix) = match value.iter().position(|b| *b == 0) {
                Some(nul) => (&value[..nul], false),
                None => (value, true),
            };
            rule.oif.push(IfaceCond { name: String::from_utf8_lossy(name).into_owned(), prefix, negate: !equal });
        }
        Slot::Meta(MetaKey::Oif) => {
            if let Ok(b) = <[u8; 4]>::try_from(value) {
                let index = u32::from_ne_bytes(b);
                let name = ifname_of(index).unwrap_or_else(|| format!("(ifindex {index}, gone)"));
                rule.oif.push(IfaceCond { name, prefix: false, negate: !equal });
            }
        }
        _ => {}
    }
}

/// Native `masq`: ports from registers, used by the kernel only with
/// `NF_NAT_RANGE_PROTO_SPECIFIED` in its flags (`nft_masq_eval`).
fn masq(regs: &Registers, attrs: &[DefaultNla]) -> Decoded<Target> {
    let bad = |why: String| (FrontEnd::Native, Kind::Masquerade, why);
    let flags = attr_u32(attrs, NFTA_MASQ_FLAGS).map_err(bad)?.unwrap_or(0);
    let min = attr_u32(attrs, NFTA_MASQ_REG_PROTO_MIN).map_err(bad)?;
    let max = attr_u32(attrs, NFTA_MASQ_REG_PROTO_MAX).map_err(bad)?;
    let ports = port_regs(regs, min, max).map_err(bad)?;
    let ports = ports.filter(|_| flags & NF_NAT_RANGE_PROTO_SPECIFIED != 0);
    Ok(Target { addrs: AddrSel::Any, ports })
}

/// Native `nat`: `None` for dnat, else the families it maps and its target.
fn nat(regs: &Registers, attrs: &[DefaultNla]) -> Option<Decoded<(Families, Target)>> {
    let bad = |why: String| (FrontEnd::Native, Kind::Snat, why);
    let kind = match attr_u32(attrs, NFTA_NAT_TYPE) {
        Ok(Some(k)) => k,
        Ok(None) => return Some(Err(bad("nat expression without a type".into()))),
        Err(e) => return Some(Err(bad(e))),
    };
    if kind != NFT_NAT_SNAT {
        return None;
    }
    Some((|| {
        let family = attr_u32(attrs, NFTA_NAT_FAMILY).map_err(bad)?;
        let v6 = match family.and_then(|f| u8::try_from(f).ok()) {
            Some(NFPROTO_IPV4) => false,
            Some(NFPROTO_IPV6) => true,
            other => return Err(bad(format!("nat expression of family {other:?}"))),
        };
        let fams = Families { v4: !v6, v6 };
        let _flags = attr_u32(attrs, NFTA_NAT_FLAGS).map_err(bad)?;
        let pmin = attr_u32(attrs, NFTA_NAT_REG_PROTO_MIN).map_err(bad)?;
        let pmax = attr_u32(attrs, NFTA_NAT_REG_PROTO_MAX).map_err(bad)?;
        let amin = attr_u32(attrs, NFTA_NAT_REG_ADDR_MIN).map_err(bad)?;
        let amax = attr_u32(attrs, NFTA_NAT_REG_ADDR_MAX).map_err(bad)?.or(amin);
        // The kernel sets NF_NAT_RANGE_PROTO_SPECIFIED itself when the
        // registers are there (`nft_nat_eval`).
        let ports = port_regs(regs, pmin, pmax).map_err(bad)?;
        let addrs = match (amin, amax) {
            (Some(lo), Some(hi)) => match (regs.addr(lo, v6), regs.addr(hi, v6)) {
                (Some(a), Some(b)) => AddrSel::Range(a, b),
                _ if ports.is_some() => {
                    return Err(bad("addresses loaded by something else than an immediate (a map?)".into()));
                }
                _ => AddrSel::Unknown,
            },
            _ => AddrSel::Any,
        };
        Ok((fams, Target { addrs, ports }))
    })())
}

/// Ports from the min/max registers (max defaults to min, as the kernel's
/// init does); Err when a register was not loaded by an immediate.
fn port_regs(regs: &Registers, min: Option<u32>, max: Option<u32>) -> Result<Option<PortRange>, String> {
    let Some(min) = min else { return Ok(None) };
    let max = max.unwrap_or(min);
    match (regs.port(min), regs.port(max)) {
        (Some(lo), Some(hi)) if lo <= hi => Ok(Some(PortRange { min: lo, max: hi })),
        (Some(lo), Some(hi)) => Err(format!("port range {lo}-{hi} is inverted")),
        _ => Err("ports loaded by something else than an immediate (a map?)".into()),
    }
}

/// iptables-nft's xt `target`: `None` when it is not MASQUERADE or SNAT.
fn xt_target(family: u8, attrs: &[DefaultNla]) -> Option<Decoded<(Kind, Target)>> {
    let name_attr = attr(attrs, NFTA_TARGET_NAME)?;
    let raw = nla_value(name_attr);
    let name = raw.split(|b| *b == 0).next().unwrap_or_default();
    let kind = match name {
        b"MASQUERADE" => Kind::Masquerade,
        b"SNAT" => Kind::Snat,
        _ => return None,
    };
    let bad = |why: String| (FrontEnd::Xt, kind, why);
    let rev = match attr_u32(attrs, NFTA_TARGET_REV) {
        Ok(r) => r.unwrap_or(0),
        Err(e) => return Some(Err(bad(e))),
    };
    let Some(info) = attr(attrs, NFTA_TARGET_INFO).map(nla_value) else {
        return Some(Err(bad("xt target without its info blob".into())));
    };
    Some(decode_xt(family, kind, rev, &info).map(|t| (kind, t)).map_err(bad))
}

/// The x_tables blob of MASQUERADE/SNAT (`xt_MASQUERADE.c`, `xt_nat.c`):
/// IPv4 MASQUERADE rev 0 and SNAT rev 0 hold `nf_nat_ipv4_multi_range_compat`,
/// IPv6 MASQUERADE rev 0 and SNAT rev 1 `nf_nat_range`, SNAT rev 2
/// `nf_nat_range2` (`nf_nat_range` + `base_proto`). Flags and `rangesize`
/// are host-endian, addresses and ports big-endian.
fn decode_xt(family: u8, kind: Kind, rev: u32, info: &[u8]) -> Result<Target, String> {
    let v6 = match family {
        NFPROTO_IPV4 => false,
        NFPROTO_IPV6 => true,
        other => return Err(format!("xt target in family {other}")),
    };
    let compat = match (kind, v6, rev) {
        (Kind::Masquerade, false, 0) | (Kind::Snat, false, 0) => true,
        (Kind::Masquerade, true, 0) | (Kind::Snat, _, 1) | (Kind::Snat, _, 2) => false,
        _ => return Err(format!("xt revision {rev} not known for this family")),
    };
    let u32_at = |o: usize| -> Option<u32> { Some(u32::from_ne_bytes(info.get(o..o + 4)?.try_into().ok()?)) };
    let be16_at = |o: usize| -> Option<u16> { Some(u16::from_be_bytes(info.get(o..o + 2)?.try_into().ok()?)) };
    let short = || format!("xt info blob of {} bytes is too short", info.len());
    // (flags offset, address offsets, address width, port offsets)
    let (flags_at, addr_at, width, ports_at) = if compat {
        let rangesize = u32_at(0).ok_or_else(short)?;
        if rangesize != 1 {
            return Err(format!("xt rangesize {rangesize}, expected 1"));
        }
        // rangesize, { flags, min_ip, max_ip, min, max }
        (4, (8, 12), 4, (16, 18))
    } else {
        // flags, min_addr[16], max_addr[16], min_proto, max_proto (, base_proto)
        (0, (4, 20), if v6 { 16 } else { 4 }, (36, 38))
    };
    let needed = ports_at.1 + 2;
    if info.len() < needed {
        return Err(short());
    }
    let flags = u32_at(flags_at).ok_or_else(short)?;
    let ports = if flags & NF_NAT_RANGE_PROTO_SPECIFIED != 0 {
        let (lo, hi) = (be16_at(ports_at.0).ok_or_else(short)?, be16_at(ports_at.1).ok_or_else(short)?);
        if lo > hi {
            return Err(format!("port range {lo}-{hi} is inverted"));
        }
        Some(PortRange { min: lo, max: hi })
    } else {
        None
    };
    let addr = |o: usize| -> Option<IpAddr> {
        let b = info.get(o..o + width)?;
        Some(if width == 16 {
            IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(b).ok()?))
        } else {
            IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(b).ok()?))
        })
    };
    let addrs = match kind {
        Kind::Snat if flags & NF_NAT_RANGE_MAP_IPS != 0 => {
            AddrSel::Range(addr(addr_at.0).ok_or_else(short)?, addr(addr_at.1).ok_or_else(short)?)
        }
        _ => AddrSel::Any,
    };
    Ok(Target { addrs, ports })
}

// ---------------------------------------------------------------------------
// The dump.

/// One `NFT_MSG_GETRULE` dump; `Ok(None)` when the kernel flagged it
/// interrupted (`NLM_F_DUMP_INTR`: the ruleset changed meanwhile).
fn dump(ifname_of: &dyn Fn(u32) -> Option<String>) -> Result<Option<Rules>, RulesetError> {
    let mut socket = Socket::new(NETLINK_NETFILTER).map_err(RulesetError::Socket)?;
    socket.bind_auto().map_err(RulesetError::Socket)?;
    socket.connect(&SocketAddr::new(0, 0)).map_err(RulesetError::Socket)?;
    set_recv_timeout(&socket, std::time::Duration::from_secs(5)).map_err(RulesetError::Socket)?;

    const SEQ: u32 = 0x7477_7273; // "twrs"
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    header.sequence_number = SEQ;
    let mut request = NetlinkMessage::new(
        header,
        NetlinkPayload::from(NetfilterMessage::new(
            NetfilterHeader::new(NetfilterProtoFamily::Unspec, 0, 0),
            NfTablesMessage::GetRule(RuleMessage { attributes: vec![] }),
        )),
    );
    request.finalize();
    let mut buf = vec![0u8; request.buffer_len()];
    request.serialize(&mut buf);
    socket.send(&buf, 0).map_err(RulesetError::Io)?;

    let mut dump = Dump { rules: Rules::empty(), interrupted: false };
    loop {
        let (datagram, _) = socket.recv_from_full().map_err(RulesetError::Io)?;
        if let Step::Done = dump.datagram(&datagram, SEQ, ifname_of)? {
            return Ok((!dump.interrupted).then_some(dump.rules));
        }
    }
}

/// A rule dump being received.
struct Dump {
    rules: Rules,
    /// A message carried `NLM_F_DUMP_INTR`: the ruleset changed meanwhile.
    interrupted: bool,
}

impl Dump {
    /// Takes the messages of one datagram (replies to request `seq`).
    fn datagram(
        &mut self,
        datagram: &[u8],
        seq: u32,
        ifname_of: &dyn Fn(u32) -> Option<String>,
    ) -> Result<Step, RulesetError> {
        if datagram.is_empty() {
            return Err(RulesetError::Malformed("empty datagram".into()));
        }
        let mut off = 0;
        while off < datagram.len() {
            let msg = &datagram[off..];
            let nl = NetlinkBuffer::new_checked(msg).map_err(|e| RulesetError::Malformed(e.to_string()))?;
            let len = nl.length() as usize;
            let (kind, flags, msg_seq) = (nl.message_type(), nl.flags(), nl.sequence_number());
            if len < NLMSG_HDRLEN || len > msg.len() {
                return Err(RulesetError::Malformed(format!("message length {len} in a datagram of {}", msg.len())));
            }
            off += len.next_multiple_of(4);
            if msg_seq != seq {
                continue;
            }
            if flags & NLM_F_DUMP_INTR != 0 {
                self.interrupted = true;
            }
            if let Step::Done = feed(&mut self.rules, &msg[..len], kind, ifname_of)? {
                return Ok(Step::Done);
            }
        }
        Ok(Step::More)
    }
}

enum Step {
    More,
    Done,
}

/// Adds one reply message to `rules`.
fn feed(
    rules: &mut Rules,
    msg: &[u8],
    kind: u16,
    ifname_of: &dyn Fn(u32) -> Option<String>,
) -> Result<Step, RulesetError> {
    match NetlinkMessage::<NetfilterMessage>::deserialize(msg) {
        Ok(m) => match m.payload {
            NetlinkPayload::Done(_) => Ok(Step::Done),
            NetlinkPayload::Error(e) => match e.code {
                None => Ok(Step::More),
                Some(_) => {
                    let err = e.to_io();
                    Err(if err.raw_os_error() == Some(libc::EPERM) {
                        RulesetError::Permission(err)
                    } else {
                        RulesetError::Kernel(err)
                    })
                }
            },
            NetlinkPayload::InnerMessage(NetfilterMessage {
                header,
                inner: NetfilterMessageInner::NfTables(NfTablesMessage::NewRule(RuleMessage { attributes })),
                ..
            }) => {
                if let Some(rule) = decode_rule(u8::from(header.family), &attributes, ifname_of) {
                    rules.rules.push(rule);
                }
                Ok(Step::More)
            }
            _ => Ok(Step::More),
        },
        Err(e) if kind == (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWRULE => {
            // Kernel input the crate cannot parse: that rule is skipped, and
            // counted when it may be a NAT rule.
            if may_be_nat(msg.get(NLMSG_HDRLEN + 4..).unwrap_or_default()) {
                let family = msg.get(NLMSG_HDRLEN).copied().map(family_name).unwrap_or_default();
                rules.unparsed.push(format!("{family}: a rule that does not parse, skipped: {e}"));
            }
            Ok(Step::More)
        }
        Err(e) => Err(RulesetError::Malformed(e.to_string())),
    }
}

/// Whether a rule body (after `nfgenmsg`) has a `masq`, `nat` or `target`
/// expression, walking its attributes without typing them; true when even
/// that walk fails.
fn may_be_nat(body: &[u8]) -> bool {
    let names = |buf: &[u8]| -> Result<bool, ()> {
        for rule_attr in NlasIterator::new(buf) {
            let rule_attr = rule_attr.map_err(|_| ())?;
            if rule_attr.kind() & NLA_TYPE_MASK != NFTA_RULE_EXPRESSIONS {
                continue;
            }
            for elem in NlasIterator::new(rule_attr.value()) {
                let elem = elem.map_err(|_| ())?;
                for part in NlasIterator::new(elem.value()) {
                    let part = part.map_err(|_| ())?;
                    if part.kind() & NLA_TYPE_MASK == NFTA_EXPR_NAME {
                        let name = part.value().split(|b| *b == 0).next().unwrap_or_default();
                        if matches!(name, b"masq" | b"nat" | b"target") {
                            return Ok(true);
                        }
                    }
                }
            }
        }
        Ok(false)
    };
    names(body).unwrap_or(true)
}

fn set_recv_timeout(socket: &Socket, timeout: std::time::Duration) -> io::Result<()> {
    let tv = libc::timeval { tv_sec: timeout.as_secs() as libc::time_t, tv_usec: 0 };
    // SAFETY: a valid socket fd and a timeval of the size given.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn resolve_ifindex(index: u32) -> Option<String> {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: `buf` holds IF_NAMESIZE bytes, as if_indextoname requires.
    let p = unsafe { libc::if_indextoname(index, buf.as_mut_ptr()) };
    if p.is_null() {
        return None;
    }
    // SAFETY: on success the buffer holds a NUL-terminated name.
    Some(unsafe { CStr::from_ptr(buf.as_ptr()) }.to_string_lossy().into_owned())
}

// ---------------------------------------------------------------------------
// The autoload guard (RESEARCH 4.2).

/// Whether a rule dump can go to the kernel without loading nf_tables.
fn nf_tables_queryable() -> bool {
    let modules = Path::new("/proc/modules").exists();
    let loaded = Path::new("/sys/module/nf_tables/initstate").exists();
    let builtin = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .ok()
        .and_then(|rel| std::fs::read_to_string(format!("/lib/modules/{}/modules.builtin", rel.trim())).ok());
    queryable(modules, loaded, builtin.as_deref())
}

/// No `/proc/modules`: the kernel has no modules, nothing can autoload.
/// Else only when nf_tables is loaded or listed as built in.
fn queryable(proc_modules: bool, initstate: bool, modules_builtin: Option<&str>) -> bool {
    !proc_modules
        || initstate
        || modules_builtin.is_some_and(|text| {
            text.lines().map(str::trim).any(|l| l == "nf_tables.ko" || l.ends_with("/nf_tables.ko"))
        })
}

#[cfg(test)]
mod tests {
    //! The decoders on rule messages built as the kernel sends them
    //! (serialised by the same crate, xt blobs laid out as the kernel's
    //! structs), then the real thing in a throwaway namespace when root.

    use super::*;
    use netlink_packet_core::ErrorMessage;
    use std::num::NonZeroI32;

    const NO_IFINDEX: &dyn Fn(u32) -> Option<String> = &|_| None;

    fn v4(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn be32(v: u32) -> Vec<u8> {
        v.to_be_bytes().to_vec()
    }

    fn imm(reg: u32, bytes: &[u8]) -> Expressions {
        Expressions::Immediate(vec![
            Immediate::DestinationRegister(Register::from(reg)),
            Immediate::Data(DataAttribute::Value(bytes.to_vec())),
        ])
    }

    fn port_imm(reg: u32, port: u16) -> Expressions {
        // nft loads a port as 4 bytes, big-endian in the first two.
        let p = port.to_be_bytes();
        imm(reg, &[p[0], p[1], 0, 0])
    }

    fn meta_load(key: MetaKey, reg: u32) -> Expressions {
        Expressions::Meta(vec![Meta::DestinationRegister(Register::from(reg)), Meta::Key(key)])
    }

    fn cmp_expr(reg: u32, op: Operator, bytes: &[u8]) -> Expressions {
        Expressions::Cmp(vec![
            Cmp::SourceRegister(Register::from(reg)),
            Cmp::Op(op),
            Cmp::Data(DataAttribute::Value(bytes.to_vec())),
        ])
    }

    /// iptables-nft `-o NAME`: the name, NUL-padded to a multiple of 4.
    fn oifname(name: &str, op: Operator) -> [Expressions; 2] {
        let mut v = name.as_bytes().to_vec();
        v.push(0);
        v.resize(v.len().next_multiple_of(4), 0);
        [meta_load(MetaKey::Oifname, 1), cmp_expr(1, op, &v)]
    }

    fn l4proto(p: u8, op: Operator) -> [Expressions; 2] {
        [meta_load(MetaKey::L4Proto, 1), cmp_expr(1, op, &[p])]
    }

    fn other(name: &str, attrs: Vec<(u16, Vec<u8>)>) -> Expressions {
        Expressions::Other {
            expression_type: name.into(),
            attributes: attrs.into_iter().map(|(k, v)| DefaultNla::new(k, v)).collect(),
        }
    }

    fn masq_expr(flags: u32, regs: Option<(u32, u32)>) -> Expressions {
        let mut a = Vec::new();
        if flags != 0 {
            a.push((NFTA_MASQ_FLAGS, be32(flags)));
        }
        if let Some((lo, hi)) = regs {
            a.push((NFTA_MASQ_REG_PROTO_MIN, be32(lo)));
            a.push((NFTA_MASQ_REG_PROTO_MAX, be32(hi)));
        }
        other("masq", a)
    }

    fn nat_expr(kind: u32, family: u8, addr: Option<(u32, u32)>, proto: Option<(u32, u32)>, flags: u32) -> Expressions {
        let mut a = vec![(NFTA_NAT_TYPE, be32(kind)), (NFTA_NAT_FAMILY, be32(u32::from(family)))];
        if let Some((lo, hi)) = addr {
            a.push((NFTA_NAT_REG_ADDR_MIN, be32(lo)));
            a.push((NFTA_NAT_REG_ADDR_MAX, be32(hi)));
        }
        if let Some((lo, hi)) = proto {
            a.push((NFTA_NAT_REG_PROTO_MIN, be32(lo)));
            a.push((NFTA_NAT_REG_PROTO_MAX, be32(hi)));
        }
        if flags != 0 {
            a.push((NFTA_NAT_FLAGS, be32(flags)));
        }
        other("nat", a)
    }

    fn xt(name: &str, rev: u32, info: Vec<u8>) -> Expressions {
        let mut n = name.as_bytes().to_vec();
        n.push(0);
        other("target", vec![(NFTA_TARGET_NAME, n), (NFTA_TARGET_REV, be32(rev)), (NFTA_TARGET_INFO, info)])
    }

    /// `struct nf_nat_ipv4_multi_range_compat` with one range, XT_ALIGN'd to 24.
    fn compat_blob(flags: u32, ips: (Ipv4Addr, Ipv4Addr), ports: (u16, u16)) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&1u32.to_ne_bytes());
        b.extend_from_slice(&flags.to_ne_bytes());
        b.extend_from_slice(&ips.0.octets());
        b.extend_from_slice(&ips.1.octets());
        b.extend_from_slice(&ports.0.to_be_bytes());
        b.extend_from_slice(&ports.1.to_be_bytes());
        b.resize(24, 0);
        b
    }

    /// `struct nf_nat_range` (40 bytes), or `nf_nat_range2` with `base_proto`
    /// (42, padded to 44, XT_ALIGN'd to 48).
    fn range_blob(flags: u32, addrs: (IpAddr, IpAddr), ports: (u16, u16), v2: bool) -> Vec<u8> {
        let addr16 = |a: IpAddr| -> [u8; 16] {
            match a {
                IpAddr::V4(a) => {
                    let mut b = [0u8; 16];
                    b[..4].copy_from_slice(&a.octets());
                    b
                }
                IpAddr::V6(a) => a.octets(),
            }
        };
        let mut b = Vec::new();
        b.extend_from_slice(&flags.to_ne_bytes());
        b.extend_from_slice(&addr16(addrs.0));
        b.extend_from_slice(&addr16(addrs.1));
        b.extend_from_slice(&ports.0.to_be_bytes());
        b.extend_from_slice(&ports.1.to_be_bytes());
        if v2 {
            b.extend_from_slice(&0u16.to_be_bytes());
            b.resize(48, 0);
        }
        b
    }

    /// One `NFT_MSG_NEWRULE` as the dump carries it.
    fn rule_msg(family: NetfilterProtoFamily, table: &str, chain: &str, exprs: Vec<Expressions>) -> Vec<u8> {
        let attributes = vec![
            RuleAttribute::Table(table.into()),
            RuleAttribute::Chain(chain.into()),
            RuleAttribute::Handle(2),
            RuleAttribute::Expressions(exprs.into_iter().map(ListAttribute::from).collect()),
        ];
        let mut header = NetlinkHeader::default();
        header.flags = netlink_packet_core::NLM_F_MULTIPART;
        let mut m = NetlinkMessage::new(
            header,
            NetlinkPayload::from(NetfilterMessage::new(
                NetfilterHeader::new(family, 0, 0),
                NfTablesMessage::NewRule(RuleMessage { attributes }),
            )),
        );
        m.finalize();
        let mut buf = vec![0u8; m.buffer_len()];
        m.serialize(&mut buf);
        buf
    }

    fn rules_of(msgs: &[Vec<u8>]) -> Rules {
        rules_with(msgs, NO_IFINDEX)
    }

    fn rules_with(msgs: &[Vec<u8>], ifname_of: &dyn Fn(u32) -> Option<String>) -> Rules {
        let mut rules = Rules::empty();
        for m in msgs {
            let kind = NetlinkBuffer::new_checked(m.as_slice()).unwrap().message_type();
            assert!(matches!(feed(&mut rules, m, kind, ifname_of).unwrap(), Step::More));
        }
        rules
    }

    fn on(iface: &'static str) -> impl Fn(IpAddr) -> Option<String> {
        move |_| Some(iface.to_string())
    }

    fn range(min: u16, max: u16) -> PortRange {
        PortRange { min, max }
    }

    const IP: NetfilterProtoFamily = NetfilterProtoFamily::IPv4;
    const IP6: NetfilterProtoFamily = NetfilterProtoFamily::IPv6;
    const INET: NetfilterProtoFamily = NetfilterProtoFamily::Inet;

    /// `oifname "d1" meta l4proto tcp masquerade to :41000-41003` as measured (RESEARCH 1.4).
    fn native_masq_rule(iface: &str, from: u16, to: u16) -> Vec<u8> {
        let mut e: Vec<Expressions> = oifname(iface, Operator::Equal).into();
        e.extend(l4proto(6, Operator::Equal));
        e.extend([port_imm(1, from), port_imm(2, to), masq_expr(NF_NAT_RANGE_PROTO_SPECIFIED, Some((1, 2)))]);
        rule_msg(IP, "natlab", "post", e)
    }

    #[test]
    fn masq_with_range() {
        let rules = rules_of(&[native_masq_rule("d1", 41000, 41003)]);
        let got = rules.range_for(v4("10.97.4.1"), Protocol::Tcp, &on("d1"));
        assert_eq!(got, Some(RuleRange { range: range(41000, 41003), conflict: false }));
        assert_eq!(rules.range_for(v4("10.97.4.1"), Protocol::Udp, &on("d1")), None, "tcp only");
        assert_eq!(rules.range_for(v4("10.97.4.1"), Protocol::Tcp, &on("d10")), None, "exact name");
        assert_eq!(rules.range_for(v4("10.97.4.1"), Protocol::Tcp, &|_| None), None, "address on no interface");
        assert_eq!(rules.range_for("fd00::1".parse().unwrap(), Protocol::Tcp, &on("d1")), None, "ip table: IPv4 only");
        assert_eq!(rules.describe(), vec!["ip natlab post: masquerade -o d1 tcp ports 41000-41003".to_string()]);
        assert_eq!(rules.unreadable(), 0);
    }

    #[test]
    fn masq_without_range() {
        // `oifname "eth8" masquerade`: `[ masq ]`.
        let mut e: Vec<Expressions> = oifname("eth8", Operator::Equal).into();
        e.push(masq_expr(0, None));
        // Registers but no PROTO_SPECIFIED: the kernel ignores the ports.
        let mut e2: Vec<Expressions> = l4proto(17, Operator::Equal).into();
        e2.extend([port_imm(1, 3000), port_imm(2, 3001), masq_expr(0x4, Some((1, 2)))]);
        let rules = rules_of(&[rule_msg(IP, "t", "c", e), rule_msg(IP, "t", "c", e2)]);
        assert_eq!(rules.range_for(v4("192.0.2.1"), Protocol::Tcp, &on("eth8")), None);
        assert_eq!(rules.range_for(v4("192.0.2.1"), Protocol::Udp, &on("eth8")), None);
        assert_eq!(
            rules.describe(),
            vec![
                "ip t c: masquerade -o eth8 no ports (kernel default)".to_string(),
                "ip t c: masquerade udp no ports (kernel default)".to_string()
            ]
        );
        assert_eq!(rules.unreadable(), 0);
    }

    #[test]
    fn masq_without_data_nest() {
        // `[ masq ]` with no NFTA_EXPR_DATA at all, and a `notrack` likewise:
        // a masquerade without ports, and nothing.
        let bare = |n: &str| ListAttribute::Element(vec![ExpressionAttribute::Name(n.into())]);
        let attrs = vec![
            RuleAttribute::Table("t".into()),
            RuleAttribute::Chain("c".into()),
            RuleAttribute::Expressions(vec![bare("notrack"), bare("masq")]),
        ];
        let rule = decode_rule(NFPROTO_IPV4, &attrs, NO_IFINDEX).expect("a masquerade rule");
        assert_eq!(rule.describe(), "ip t c: masquerade no ports (kernel default)");
        let attrs = vec![RuleAttribute::Expressions(vec![bare("notrack")])];
        assert_eq!(decode_rule(NFPROTO_IPV4, &attrs, NO_IFINDEX), None);
    }

    #[test]
    fn snat_with_addresses_and_ports() {
        // `meta l4proto tcp snat ip to 10.97.3.10-10.97.3.11:40000-40063` as measured (RESEARCH 2.4).
        let mut e: Vec<Expressions> = l4proto(6, Operator::Equal).into();
        e.extend([
            imm(1, &[10, 97, 3, 10]),
            imm(2, &[10, 97, 3, 11]),
            port_imm(3, 40000),
            port_imm(4, 40063),
            nat_expr(NFT_NAT_SNAT, NFPROTO_IPV4, Some((1, 2)), Some((3, 4)), 0x3),
        ]);
        let rules = rules_of(&[rule_msg(IP, "natlab", "post", e)]);
        let want = Some(RuleRange { range: range(40000, 40063), conflict: false });
        let nowhere = |_| None;
        assert_eq!(rules.range_for(v4("10.97.3.10"), Protocol::Tcp, &nowhere), want);
        assert_eq!(rules.range_for(v4("10.97.3.11"), Protocol::Tcp, &on("x")), want, "any interface");
        assert_eq!(rules.range_for(v4("10.97.3.12"), Protocol::Tcp, &nowhere), None);
        assert_eq!(rules.range_for(v4("10.97.3.9"), Protocol::Tcp, &nowhere), None);
        assert_eq!(rules.range_for(v4("10.97.3.10"), Protocol::Udp, &nowhere), None);
        let line = "ip natlab post: snat tcp to 10.97.3.10-10.97.3.11 ports 40000-40063";
        assert_eq!(rules.describe(), vec![line.to_string()]);
    }

    #[test]
    fn snat_ipv6_in_inet_table_and_dnat_ignored() {
        // `meta l4proto udp snat ip6 to [fd00::1]-[fd00::2]:5000-5010` (measured): 16-byte immediates.
        let a: Ipv6Addr = "fd00::1".parse().unwrap();
        let b: Ipv6Addr = "fd00::2".parse().unwrap();
        let mut e: Vec<Expressions> = l4proto(17, Operator::Equal).into();
        e.extend([
            imm(1, &a.octets()),
            imm(2, &b.octets()),
            port_imm(3, 5000),
            port_imm(4, 5010),
            nat_expr(NFT_NAT_SNAT, NFPROTO_IPV6, Some((1, 2)), Some((3, 4)), 0x3),
        ]);
        // A dnat with ports: not a source range, not a rule here.
        let dnat =
            vec![imm(1, &[10, 0, 0, 1]), port_imm(2, 80), nat_expr(1, NFPROTO_IPV4, Some((1, 1)), Some((2, 2)), 0)];
        let rules = rules_of(&[rule_msg(INET, "n6", "post", e), rule_msg(INET, "n6", "pre", dnat)]);
        let nowhere = |_| None;
        assert_eq!(
            rules.range_for("fd00::2".parse().unwrap(), Protocol::Udp, &nowhere),
            Some(RuleRange { range: range(5000, 5010), conflict: false })
        );
        assert_eq!(rules.range_for("fd00::3".parse().unwrap(), Protocol::Udp, &nowhere), None);
        assert_eq!(rules.range_for(v4("10.0.0.1"), Protocol::Udp, &nowhere), None);
        assert_eq!(rules.describe(), vec!["inet n6 post: snat udp to fd00::1-fd00::2 ports 5000-5010".to_string()]);
    }

    #[test]
    fn snat_ports_only_keeps_any_address() {
        // `udp dport 80 snat to :6000-6001` (measured): no address registers.
        let mut e: Vec<Expressions> = l4proto(17, Operator::Equal).into();
        e.extend([port_imm(1, 6000), port_imm(2, 6001), nat_expr(NFT_NAT_SNAT, NFPROTO_IPV4, None, Some((1, 2)), 0x2)]);
        let rules = rules_of(&[rule_msg(IP, "t", "c", e)]);
        assert_eq!(
            rules.range_for(v4("172.16.0.9"), Protocol::Udp, &|_| None),
            Some(RuleRange { range: range(6000, 6001), conflict: false })
        );
    }

    #[test]
    fn xt_masquerade_rev0_ipv4_compat_blob() {
        // iptables-nft `-o to-s -p tcp -j MASQUERADE --to-ports 40000-40007` (RESEARCH 2.1).
        let zero = Ipv4Addr::UNSPECIFIED;
        let mut e: Vec<Expressions> = oifname("to-s", Operator::Equal).into();
        e.extend(l4proto(6, Operator::Equal));
        e.push(other("counter", vec![]));
        e.push(xt("MASQUERADE", 0, compat_blob(NF_NAT_RANGE_PROTO_SPECIFIED, (zero, zero), (40000, 40007))));
        // The same without --to-ports (flags 0, ports left 0).
        let mut plain: Vec<Expressions> = oifname("eth1", Operator::Equal).into();
        plain.push(xt("MASQUERADE", 0, compat_blob(0, (zero, zero), (0, 0))));
        let rules = rules_of(&[rule_msg(IP, "nat", "POSTROUTING", e), rule_msg(IP, "nat", "POSTROUTING", plain)]);
        assert_eq!(
            rules.range_for(v4("10.97.3.1"), Protocol::Tcp, &on("to-s")),
            Some(RuleRange { range: range(40000, 40007), conflict: false })
        );
        assert_eq!(rules.range_for(v4("10.97.3.1"), Protocol::Udp, &on("to-s")), None);
        assert_eq!(rules.range_for(v4("10.97.9.1"), Protocol::Tcp, &on("eth1")), None, "no PROTO_SPECIFIED");
        assert_eq!(
            rules.describe(),
            vec![
                "ip nat POSTROUTING: MASQUERADE -o to-s tcp ports 40000-40007".to_string(),
                "ip nat POSTROUTING: MASQUERADE -o eth1 no ports (kernel default)".to_string(),
            ]
        );
        assert_eq!(rules.unreadable(), 0);
    }

    #[test]
    fn xt_snat_revisions() {
        let (a, b) = (Ipv4Addr::new(192, 0, 2, 5), Ipv4Addr::new(192, 0, 2, 6));
        let both = NF_NAT_RANGE_MAP_IPS | NF_NAT_RANGE_PROTO_SPECIFIED;
        // rev 0 (IPv4 compat): `-p udp -j SNAT --to-source 192.0.2.5-192.0.2.6:6000-6010`.
        let mut r0: Vec<Expressions> = l4proto(17, Operator::Equal).into();
        r0.push(xt("SNAT", 0, compat_blob(both, (a, b), (6000, 6010))));
        // rev 1 (nf_nat_range) in ip6.
        let (c, d): (IpAddr, IpAddr) = ("2001:db8::1".parse().unwrap(), "2001:db8::1".parse().unwrap());
        let mut r1: Vec<Expressions> = l4proto(6, Operator::Equal).into();
        r1.push(xt("SNAT", 1, range_blob(both, (c, d), (7000, 7099), false)));
        // rev 2 (nf_nat_range2) in ip.
        let e = Ipv4Addr::new(198, 51, 100, 1);
        let mut r2: Vec<Expressions> = l4proto(6, Operator::Equal).into();
        r2.push(xt("SNAT", 2, range_blob(both, (IpAddr::V4(e), IpAddr::V4(e)), (8000, 8001), true)));
        // ip6tables MASQUERADE rev 0 (nf_nat_range, no addresses).
        let any6: IpAddr = Ipv6Addr::UNSPECIFIED.into();
        let mut m6: Vec<Expressions> = oifname("d0", Operator::Equal).into();
        m6.extend(l4proto(17, Operator::Equal));
        m6.push(xt("MASQUERADE", 0, range_blob(NF_NAT_RANGE_PROTO_SPECIFIED, (any6, any6), (3000, 3100), false)));
        // SNAT without MAP_IPS: keeps the source address.
        let mut keep: Vec<Expressions> = l4proto(17, Operator::Equal).into();
        keep.push(xt("SNAT", 0, compat_blob(NF_NAT_RANGE_PROTO_SPECIFIED, (a, a), (9000, 9001))));
        let rules = rules_of(&[
            rule_msg(IP, "nat", "POSTROUTING", r0),
            rule_msg(IP6, "nat", "POSTROUTING", r1),
            rule_msg(IP, "nat", "POSTROUTING", r2),
            rule_msg(IP6, "nat", "POSTROUTING", m6),
        ]);
        let nowhere = |_| None;
        let rr = |min, max| Some(RuleRange { range: range(min, max), conflict: false });
        assert_eq!(rules.range_for(IpAddr::V4(b), Protocol::Udp, &nowhere), rr(6000, 6010));
        assert_eq!(rules.range_for(v4("192.0.2.7"), Protocol::Udp, &nowhere), None);
        assert_eq!(rules.range_for(c, Protocol::Tcp, &nowhere), rr(7000, 7099));
        assert_eq!(rules.range_for(IpAddr::V4(e), Protocol::Tcp, &nowhere), rr(8000, 8001));
        assert_eq!(rules.range_for("fd00::1".parse().unwrap(), Protocol::Udp, &on("d0")), rr(3000, 3100));
        assert_eq!(rules.range_for(v4("10.0.0.1"), Protocol::Udp, &on("d0")), None, "ip6 rule, IPv4 address");
        assert_eq!(
            rules.describe(),
            vec![
                "ip nat POSTROUTING: SNAT udp to 192.0.2.5-192.0.2.6 ports 6000-6010".to_string(),
                "ip6 nat POSTROUTING: SNAT tcp to 2001:db8::1 ports 7000-7099".to_string(),
                "ip nat POSTROUTING: SNAT tcp to 198.51.100.1 ports 8000-8001".to_string(),
                "ip6 nat POSTROUTING: MASQUERADE -o d0 udp ports 3000-3100".to_string(),
            ]
        );
        let keep = rules_of(&[rule_msg(IP, "nat", "POSTROUTING", keep)]);
        assert_eq!(keep.range_for(v4("10.1.2.3"), Protocol::Udp, &nowhere), rr(9000, 9001));
    }

    #[test]
    fn xt_unknown_revision_or_short_blob_is_unreadable() {
        let zero = Ipv4Addr::UNSPECIFIED;
        let mut short = compat_blob(NF_NAT_RANGE_PROTO_SPECIFIED, (zero, zero), (1, 2));
        short.truncate(17);
        let rules = rules_of(&[
            rule_msg(IP, "nat", "POSTROUTING", vec![xt("MASQUERADE", 7, vec![0; 24])]),
            rule_msg(IP, "nat", "POSTROUTING", vec![xt("MASQUERADE", 0, short)]),
            rule_msg(IP, "nat", "POSTROUTING", vec![xt("DNAT", 0, vec![0; 24])]),
            rule_msg(IP, "filter", "FORWARD", vec![xt("ACCEPT", 0, vec![])]),
        ]);
        assert_eq!(rules.unreadable(), 2);
        assert_eq!(rules.describe().len(), 2, "DNAT and ACCEPT are not source NAT rules");
        assert!(rules.describe()[0].contains("ports unreadable"), "{:?}", rules.describe());
        assert_eq!(rules.range_for(v4("10.0.0.1"), Protocol::Tcp, &on("x")), None);
    }

    #[test]
    fn register_numbering() {
        // The kernel's slots: NFT_REG_1..4 = 4, 8, 12, 16; NFT_REG32_00..15 = 4..19.
        assert_eq!((slot_of(1), slot_of(2), slot_of(4)), (Some(4), Some(8), Some(16)));
        assert_eq!((slot_of(8), slot_of(12), slot_of(23)), (Some(4), Some(8), Some(19)));
        assert_eq!((slot_of(5), slot_of(24)), (None, None));
        // 32-bit registers (nft packs concatenations so): ports in REG32_01 and REG32_05.
        let mut e: Vec<Expressions> = l4proto(6, Operator::Equal).into();
        e.extend([port_imm(9, 1024), port_imm(13, 2000), masq_expr(NF_NAT_RANGE_PROTO_SPECIFIED, Some((9, 13)))]);
        // Loaded through NFT_REG_2 (slot 8), read back as NFT_REG32_04 (slot 8); max omitted = min.
        let mut f: Vec<Expressions> = l4proto(17, Operator::Equal).into();
        let min_only = other("masq", vec![(NFTA_MASQ_FLAGS, be32(2)), (NFTA_MASQ_REG_PROTO_MIN, be32(12))]);
        f.extend([port_imm(2, 7000), min_only]);
        // An IPv4 address spread over REG32 slots, ports after it.
        let mut g: Vec<Expressions> = l4proto(6, Operator::Equal).into();
        g.extend([
            imm(8, &[10, 9, 9, 9]),
            port_imm(9, 100),
            port_imm(10, 200),
            nat_expr(NFT_NAT_SNAT, NFPROTO_IPV4, Some((8, 8)), Some((9, 10)), 0),
        ]);
        let rules = rules_of(&[rule_msg(IP, "t", "a", e), rule_msg(IP, "t", "b", f), rule_msg(IP, "t", "c", g)]);
        let rr = |min, max| Some(RuleRange { range: range(min, max), conflict: false });
        assert_eq!(rules.range_for(v4("10.0.0.1"), Protocol::Tcp, &on("x")), rr(1024, 2000));
        assert_eq!(rules.range_for(v4("10.0.0.1"), Protocol::Udp, &on("x")), rr(7000, 7000));
        // 10.9.9.9 gets both the masquerade's and the snat's tcp ranges.
        assert_eq!(
            rules.range_for(v4("10.9.9.9"), Protocol::Tcp, &on("x")),
            Some(RuleRange { range: range(100, 2000), conflict: true })
        );
        assert_eq!(rules.unreadable(), 0);
    }

    #[test]
    fn register_overwritten_or_loaded_by_a_map_is_unreadable() {
        // `snat ip to ip saddr map { 10.0.0.1 : 10.97.3.30 . 5000-5001 }` (measured):
        // lookup with a dreg, then registers the lookup wrote.
        let mut e: Vec<Expressions> = l4proto(6, Operator::Equal).into();
        e.extend([
            Expressions::Payload(vec![
                Payload::DestinationRegister(Register::Reg1),
                Payload::Base(NFT_PAYLOAD_NETWORK_HEADER),
                Payload::Offset(12),
                Payload::Len(4),
            ]),
            Expressions::Lookup(vec![
                Lookup::SourceRegister(Register::Reg1),
                Lookup::Set("__map1".into()),
                Lookup::DestinationRegister(Register::Reg1),
            ]),
            nat_expr(NFT_NAT_SNAT, NFPROTO_IPV4, Some((1, 10)), Some((9, 11)), 0x3),
        ]);
        // Immediates, then an unknown expression (could write registers), then masq.
        let mut f: Vec<Expressions> = l4proto(6, Operator::Equal).into();
        f.extend([port_imm(1, 1), port_imm(2, 2), other("numgen", vec![(1, be32(1))]), masq_expr(2, Some((1, 2)))]);
        // A port register nothing loaded.
        let g = vec![masq_expr(2, Some((3, 4)))];
        // A map for the address only, no ports: names no ports, readable.
        let h = vec![
            Expressions::Lookup(vec![Lookup::DestinationRegister(Register::Reg1)]),
            nat_expr(NFT_NAT_SNAT, NFPROTO_IPV4, Some((1, 1)), None, 0x1),
        ];
        // A malformed attribute (flags of 2 bytes).
        let bad = vec![other("masq", vec![(NFTA_MASQ_FLAGS, vec![0, 2])])];
        let rules = rules_of(&[
            rule_msg(IP, "t", "c", e),
            rule_msg(IP, "t", "c", f),
            rule_msg(IP, "t", "c", g),
            rule_msg(IP, "t", "c", h),
            rule_msg(IP, "t", "c", bad),
        ]);
        assert_eq!(rules.unreadable(), 4, "{:#?}", rules.describe());
        assert_eq!(rules.range_for(v4("10.97.3.30"), Protocol::Tcp, &on("x")), None);
        let d = rules.describe();
        assert!(d[0].starts_with("ip t c: snat tcp ports unreadable: "), "{d:?}");
        assert_eq!(d[3], "ip t c: snat to (addresses from a map) no ports (kernel default)");
    }

    #[test]
    fn union_and_conflict() {
        let a = native_masq_rule("d0", 40000, 40007);
        let b = native_masq_rule("d0", 40004, 40100);
        let same = native_masq_rule("d0", 40000, 40007);
        let other_iface = native_masq_rule("d9", 1, 2);
        let rules = rules_of(&[a.clone(), b]);
        assert_eq!(
            rules.range_for(v4("10.0.0.1"), Protocol::Tcp, &on("d0")),
            Some(RuleRange { range: range(40000, 40100), conflict: true })
        );
        let rules = rules_of(&[a.clone(), same, other_iface]);
        assert_eq!(
            rules.range_for(v4("10.0.0.1"), Protocol::Tcp, &on("d0")),
            Some(RuleRange { range: range(40000, 40007), conflict: false })
        );
        // A rule naming no ports that matches too: the span stays, conflict says so.
        let portless = rule_msg(IP, "nat", "POSTROUTING", vec![masq_expr(0, None)]);
        let rules = rules_of(&[a, portless]);
        assert_eq!(
            rules.range_for(v4("10.0.0.1"), Protocol::Tcp, &on("d0")),
            Some(RuleRange { range: range(40000, 40007), conflict: true })
        );
        // Alone, it names no ports: None.
        assert_eq!(rules.range_for(v4("10.0.0.1"), Protocol::Udp, &on("d0")), None);
    }

    #[test]
    fn protocol_filter() {
        let masq = || [port_imm(1, 5), port_imm(2, 6), masq_expr(2, Some((1, 2)))];
        // `meta l4proto != tcp`: udp only.
        let mut neq: Vec<Expressions> = l4proto(6, Operator::NotEqual).into();
        neq.extend(masq());
        // `meta l4proto icmp`: neither.
        let mut icmp: Vec<Expressions> = l4proto(1, Operator::Equal).into();
        icmp.extend(masq());
        // `ip protocol tcp`: a payload byte at network header + 9.
        let mut ipproto = vec![
            Expressions::Payload(vec![
                Payload::DestinationRegister(Register::Reg1),
                Payload::Base(NFT_PAYLOAD_NETWORK_HEADER),
                Payload::Offset(9),
                Payload::Len(1),
            ]),
            cmp_expr(1, Operator::Equal, &[6]),
        ];
        ipproto.extend(masq());
        // `meta l4proto { tcp, udp }`: a set lookup, no dreg: both.
        let mut set = vec![
            meta_load(MetaKey::L4Proto, 1),
            Expressions::Lookup(vec![Lookup::SourceRegister(Register::Reg1), Lookup::Set("__set0".into())]),
        ];
        set.extend(masq());
        let rr = Some(RuleRange { range: range(5, 6), conflict: false });
        let one = |e: Vec<Expressions>| rules_of(&[rule_msg(IP, "t", "c", e)]);
        let addr = v4("10.0.0.1");
        let (r, tcp, udp) = (one(neq), Protocol::Tcp, Protocol::Udp);
        assert_eq!((r.range_for(addr, tcp, &on("x")), r.range_for(addr, udp, &on("x"))), (None, rr));
        let r = one(icmp);
        assert_eq!((r.range_for(addr, tcp, &on("x")), r.range_for(addr, udp, &on("x"))), (None, None));
        assert_eq!(r.describe(), vec!["ip t c: masquerade (no tcp/udp) ports 5-6".to_string()]);
        let r = one(ipproto);
        assert_eq!((r.range_for(addr, tcp, &on("x")), r.range_for(addr, udp, &on("x"))), (rr, None));
        let r = one(set);
        assert_eq!((r.range_for(addr, tcp, &on("x")), r.range_for(addr, udp, &on("x"))), (rr, rr));
    }

    #[test]
    fn interface_filter() {
        let masq = || [port_imm(1, 5), port_imm(2, 6), masq_expr(2, Some((1, 2)))];
        let proto: [Expressions; 2] = l4proto(6, Operator::Equal);
        // `-o d+`: the prefix without a NUL (measured: `cmp eq reg 1 0x00000064`).
        let mut prefix = vec![meta_load(MetaKey::Oifname, 1), cmp_expr(1, Operator::Equal, b"d")];
        prefix.extend(proto.clone());
        prefix.extend(masq());
        // `! -o lo`.
        let mut not_lo: Vec<Expressions> = oifname("lo", Operator::NotEqual).into();
        not_lo.extend(proto.clone());
        not_lo.extend(masq());
        // `oif "d1"`: an interface index, host-endian.
        let mut oif = vec![meta_load(MetaKey::Oif, 1), cmp_expr(1, Operator::Equal, &7u32.to_ne_bytes())];
        oif.extend(proto.clone());
        oif.extend(masq());
        let addr = v4("10.0.0.1");
        let tcp = Protocol::Tcp;
        let r = rules_of(&[rule_msg(IP, "t", "c", prefix)]);
        assert!(r.range_for(addr, tcp, &on("d0")).is_some() && r.range_for(addr, tcp, &on("d17")).is_some());
        assert!(r.range_for(addr, tcp, &on("eth0")).is_none());
        assert_eq!(r.describe(), vec!["ip t c: masquerade -o d+ tcp ports 5-6".to_string()]);
        let r = rules_of(&[rule_msg(IP, "t", "c", not_lo)]);
        assert!(r.range_for(addr, tcp, &on("eth0")).is_some() && r.range_for(addr, tcp, &on("lo")).is_none());
        assert_eq!(r.describe(), vec!["ip t c: masquerade ! -o lo tcp ports 5-6".to_string()]);
        let index = |i: u32| (i == 7).then(|| "d1".to_string());
        let r = rules_with(&[rule_msg(IP, "t", "c", oif.clone())], &index);
        assert!(r.range_for(addr, tcp, &on("d1")).is_some() && r.range_for(addr, tcp, &on("d0")).is_none());
        // An index that names no interface any more matches none.
        let r = rules_of(&[rule_msg(IP, "t", "c", oif)]);
        assert!(r.range_for(addr, tcp, &on("d1")).is_none());
        // iface_of is asked once per call, and only when a rule needs it.
        let calls = std::cell::Cell::new(0);
        let counting = |_: IpAddr| {
            calls.set(calls.get() + 1);
            Some("d0".to_string())
        };
        let r = rules_of(&[native_masq_rule("d0", 1, 2), native_masq_rule("d0", 1, 3)]);
        assert!(r.range_for(addr, tcp, &counting).is_some());
        assert_eq!(calls.get(), 1);
    }

    #[test]
    fn unparseable_rule_message_is_counted_and_errors_are_typed() {
        // A rule message with one more attribute that does not parse
        // (NFTA_RULE_HANDLE of 3 bytes, a u64 expected).
        let corrupt = |mut m: Vec<u8>| {
            m.extend_from_slice(&7u16.to_ne_bytes());
            m.extend_from_slice(&3u16.to_ne_bytes());
            m.extend_from_slice(&[1, 2, 3, 0]);
            let len = m.len() as u32;
            m[..4].copy_from_slice(&len.to_ne_bytes());
            m
        };
        let nat_rule = corrupt(native_masq_rule("d1", 1, 2));
        let filter_rule = corrupt(rule_msg(IP, "filter", "input", vec![other("counter", vec![])]));
        let rules = rules_of(&[nat_rule, filter_rule]);
        assert_eq!(rules.unreadable(), 1, "only the rule with a masq expression counts");
        assert!(rules.describe()[0].starts_with("ip: a rule that does not parse"), "{:?}", rules.describe());
        assert_eq!(rules.describe().len(), 1);
        assert!(may_be_nat(&[0xff; 3]), "a walk that fails counts");

        let reply = |code: i32| {
            let mut e = ErrorMessage::default();
            e.code = NonZeroI32::new(code);
            let mut m = NetlinkMessage::<NetfilterMessage>::new(NetlinkHeader::default(), NetlinkPayload::Error(e));
            m.finalize();
            let mut buf = vec![0u8; m.buffer_len()];
            m.serialize(&mut buf);
            buf
        };
        let mut r = Rules::empty();
        let eperm = reply(-libc::EPERM);
        let kind = NetlinkBuffer::new_checked(eperm.as_slice()).unwrap().message_type();
        let err = feed(&mut r, &eperm, kind, NO_IFINDEX).err().unwrap();
        assert!(matches!(err, RulesetError::Permission(_)), "{err}");
        assert!(err.to_string().contains("CAP_NET_ADMIN") && !err.to_string().contains('\n'));
        let einval = reply(-libc::EINVAL);
        assert!(matches!(feed(&mut r, &einval, kind, NO_IFINDEX), Err(RulesetError::Kernel(_))));
    }

    #[test]
    fn datagrams_of_a_dump() {
        let with = |mut m: Vec<u8>, seq: u32, flags: u16| {
            m[6..8].copy_from_slice(&flags.to_ne_bytes());
            m[8..12].copy_from_slice(&seq.to_ne_bytes());
            m
        };
        let done = {
            let mut m = NetlinkMessage::<NetfilterMessage>::new(
                NetlinkHeader::default(),
                NetlinkPayload::Done(netlink_packet_core::DoneMessage::default()),
            );
            m.finalize();
            let mut buf = vec![0u8; m.buffer_len()];
            m.serialize(&mut buf);
            buf
        };
        let multi = netlink_packet_core::NLM_F_MULTIPART;
        // Two rules in one datagram, one of another request, then DONE in a second.
        let mut first = with(native_masq_rule("d0", 1, 2), 9, multi);
        first.extend(with(native_masq_rule("d1", 3, 4), 8, multi));
        first.extend(with(native_masq_rule("d2", 5, 6), 9, multi));
        let mut dump = Dump { rules: Rules::empty(), interrupted: false };
        assert!(matches!(dump.datagram(&first, 9, NO_IFINDEX).unwrap(), Step::More));
        assert!(matches!(dump.datagram(&with(done.clone(), 9, multi), 9, NO_IFINDEX).unwrap(), Step::Done));
        assert!(!dump.interrupted);
        assert_eq!(dump.rules.describe().len(), 2, "{:?}", dump.rules.describe());
        // NLM_F_DUMP_INTR on any message: the dump is to be redone.
        let mut dump = Dump { rules: Rules::empty(), interrupted: false };
        let intr = with(native_masq_rule("d0", 1, 2), 9, multi | NLM_F_DUMP_INTR);
        assert!(matches!(dump.datagram(&intr, 9, NO_IFINDEX).unwrap(), Step::More));
        assert!(dump.interrupted);
        // A length past the datagram, an empty datagram: malformed, no panic.
        let mut bad = native_masq_rule("d0", 1, 2);
        bad[..4].copy_from_slice(&4096u32.to_ne_bytes());
        assert!(matches!(dump.datagram(&bad, 0, NO_IFINDEX), Err(RulesetError::Malformed(_))));
        assert!(matches!(dump.datagram(&[], 0, NO_IFINDEX), Err(RulesetError::Malformed(_))));
        assert!(matches!(dump.datagram(&[1, 2, 3], 0, NO_IFINDEX), Err(RulesetError::Malformed(_))));
    }

    #[test]
    fn autoload_guard() {
        let builtin = "kernel/net/netfilter/nf_conntrack.ko\nkernel/net/netfilter/nf_tables.ko\n";
        assert!(queryable(false, false, None), "no modules at all: nothing can autoload");
        assert!(queryable(true, true, None), "loaded");
        assert!(queryable(true, false, Some(builtin)), "built in");
        assert!(!queryable(true, false, Some("kernel/net/netfilter/nf_tables_set.ko\n")));
        assert!(!queryable(true, false, None), "modules, not loaded, no modules.builtin: would autoload");
    }

    #[test]
    fn interface_of_loopback() {
        assert_eq!(interface_of(IpAddr::V4(Ipv4Addr::LOCALHOST)).as_deref(), Some("lo"));
        assert_eq!(interface_of(v4("192.0.2.254")), None);
    }

    #[test]
    fn read_without_cap_net_admin_is_a_permission_error() {
        const TEST: &str = "nat::ruleset::tests::read_without_cap_net_admin_is_a_permission_error";
        // CapEff of this thread, bit 12 = CAP_NET_ADMIN.
        let status = std::fs::read_to_string("/proc/thread-self/status").unwrap_or_default();
        let cap_eff = status
            .lines()
            .find_map(|l| l.strip_prefix("CapEff:"))
            .and_then(|v| u64::from_str_radix(v.trim(), 16).ok());
        match cap_eff {
            None => return skip(TEST, "no CapEff in /proc/thread-self/status"),
            Some(caps) if caps & (1 << 12) != 0 => {
                return skip(TEST, "this process holds CAP_NET_ADMIN (the root test covers read())");
            }
            Some(_) => {}
        }
        match read() {
            Err(RulesetError::Permission(_)) => {}
            // The guard kept the dump from a kernel that would autoload nf_tables.
            Ok(r) if !nf_tables_queryable() => assert_eq!(r.describe().len(), 0),
            other => panic!("expected a permission error, got {other:?}"),
        }
    }

    // -----------------------------------------------------------------------
    // The kernel's own ruleset, in a throwaway namespace (root only).

    use std::io::Write as _;
    use std::process::{Command, Stdio};

    /// Says on fd 2 why a test is skipped: libtest captures the print macros
    /// of a passing test, and a skip must never look like a silent pass.
    fn skip(test: &str, why: &str) {
        let _ = writeln!(io::stderr(), "SKIPPED {test}: {why}");
    }

    /// A named network namespace, deleted (with its rules and links) on drop.
    struct Netns(String);

    impl Netns {
        fn new() -> io::Result<Netns> {
            let name = format!("twrs-{}", std::process::id());
            run(&["ip", "netns", "add", &name], None)?;
            Ok(Netns(name))
        }

        fn exec(&self, args: &[&str]) -> io::Result<()> {
            let mut all = vec!["ip", "netns", "exec", &self.0];
            all.extend_from_slice(args);
            run(&all, None)
        }

        fn exec_stdin(&self, args: &[&str], stdin: &str) -> io::Result<()> {
            let mut all = vec!["ip", "netns", "exec", &self.0];
            all.extend_from_slice(args);
            run(&all, Some(stdin))
        }

        /// Runs `f` on a thread that has entered the namespace.
        fn on_thread<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> io::Result<T> {
            let fd = std::fs::File::open(format!("/run/netns/{}", self.0))?;
            std::thread::spawn(move || {
                // SAFETY: a valid namespace fd; CLONE_NEWNET moves only this
                // thread, which ends with the closure.
                if unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(f())
            })
            .join()
            .map_err(|_| io::Error::other("the namespace thread panicked"))?
        }
    }

    impl Drop for Netns {
        fn drop(&mut self) {
            let _ = run(&["ip", "netns", "del", &self.0], None);
        }
    }

    fn run(args: &[&str], stdin: Option<&str>) -> io::Result<()> {
        let mut child = Command::new(args[0])
            .args(&args[1..])
            .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()?;
        if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
            pipe.write_all(text.as_bytes())?;
        }
        let out = child.wait_with_output()?;
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr);
            return Err(io::Error::other(format!("{}: {}", args.join(" "), stderr.trim())));
        }
        Ok(())
    }

    fn have(tool: &str) -> bool {
        Command::new(tool).arg("--version").stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok()
    }

    const NFT_SCRIPT: &str = r#"
table ip natlab {
    chain post {
        type nat hook postrouting priority srcnat; policy accept;
        oifname "d1" meta l4proto tcp masquerade to :41000-41003
        meta l4proto tcp snat ip to 10.97.3.10-10.97.3.11:40000-40063
        oif "d2" meta l4proto udp masquerade to :42000-42001
        tcp dport 80 snat ip to ip saddr map { 10.0.0.1 : 10.97.3.30 . 5000-5001 }
    }
}
"#;

    #[test]
    fn reads_the_kernel_ruleset_in_a_throwaway_namespace() {
        const TEST: &str = "nat::ruleset::tests::reads_the_kernel_ruleset_in_a_throwaway_namespace";
        // SAFETY: geteuid has no preconditions and cannot fail.
        let euid = unsafe { libc::geteuid() };
        if euid != 0 {
            return skip(TEST, &format!("needs root (network namespaces, nf_tables rules; euid is {euid})"));
        }
        for tool in ["ip", "iptables", "ip6tables", "nft"] {
            if !have(tool) {
                return skip(TEST, &format!("{tool} is not installed"));
            }
        }
        let version =
            Command::new("iptables").arg("-V").output().map(|o| String::from_utf8_lossy(&o.stdout).into_owned());
        if !version.as_deref().unwrap_or_default().contains("nf_tables") {
            return skip(TEST, &format!("iptables is not iptables-nft ({version:?})"));
        }
        let ns = Netns::new().expect("ip netns add");
        // veth pairs with both ends inside (this kernel has no dummy links);
        // links stay down: nothing is routed anywhere.
        let setup = [
            "ip link add d0 type veth peer name d0p",
            "ip link add d1 type veth peer name d1p",
            "ip link add d2 type veth peer name d2p",
            "ip addr add 10.97.3.1/32 dev d0",
            "ip -6 addr add fd00:97::1/128 dev d0 nodad",
            "ip addr add 10.97.4.1/32 dev d1",
            "ip addr add 10.97.3.10/32 dev d2",
            "ip addr add 10.97.3.11/32 dev d2",
            "iptables -t nat -A POSTROUTING -o d0 -p tcp -j MASQUERADE --to-ports 40000-40007",
            "iptables -t nat -A POSTROUTING -o d0 -p udp -j SNAT --to-source 10.97.3.20:6000-6010",
            "ip6tables -t nat -A POSTROUTING -o d0 -p udp -j MASQUERADE --to-ports 3000-3100",
            "ip6tables -t nat -A POSTROUTING -o d1 -p tcp -j SNAT --to-source [fd00:97::5]:7000-7010",
            "iptables -t nat -A POSTROUTING -o d+ -p udp -j MASQUERADE",
        ];
        for cmd in setup {
            ns.exec(&cmd.split_whitespace().collect::<Vec<_>>()).expect("namespace setup");
        }
        ns.exec_stdin(&["nft", "-f", "-"], NFT_SCRIPT).expect("nft -f");

        let probes: Vec<(&'static str, Protocol)> = vec![
            ("10.97.3.1", Protocol::Tcp),
            ("10.97.3.1", Protocol::Udp),
            ("10.97.3.20", Protocol::Udp),
            ("10.97.4.1", Protocol::Tcp),
            ("10.97.4.1", Protocol::Udp),
            ("10.97.3.10", Protocol::Tcp),
            ("10.97.3.11", Protocol::Tcp),
            ("10.97.3.12", Protocol::Tcp),
            ("fd00:97::1", Protocol::Udp),
            ("fd00:97::1", Protocol::Tcp),
            ("fd00:97::5", Protocol::Tcp),
            ("10.97.3.10", Protocol::Udp),
        ];
        let (rules, got, ifaces) = ns
            .on_thread(move || {
                let rules = read();
                let got: Vec<Option<RuleRange>> = match &rules {
                    Ok(r) => probes.iter().map(|(a, p)| r.range_for(a.parse().unwrap(), *p, &interface_of)).collect(),
                    Err(_) => vec![],
                };
                let ifaces =
                    ["10.97.3.1", "10.97.3.11", "fd00:97::1", "10.97.9.9"].map(|a| interface_of(a.parse().unwrap()));
                (rules, got, ifaces)
            })
            .expect("setns");
        let rules = rules.expect("read() in the namespace");
        let rr = |min, max| Some(RuleRange { range: range(min, max), conflict: false });
        assert_eq!(
            got,
            vec![
                rr(40000, 40007), // iptables-nft MASQUERADE -o d0 -p tcp
                None,             // the udp SNAT names 10.97.3.20, not d0's address
                rr(6000, 6010),   // iptables-nft SNAT
                rr(41000, 41003), // nft masquerade oifname d1 tcp
                None,
                rr(40000, 40063), // nft snat ip to 10.97.3.10-10.97.3.11
                rr(40000, 40063),
                None,
                rr(3000, 3100), // ip6tables-nft MASQUERADE (nf_nat_range blob)
                None,
                rr(7000, 7010), // ip6tables-nft SNAT rev 1 (nf_nat_range blob)
                // nft masquerade oif "d2" (an ifindex) and the portless -o d+ udp MASQUERADE.
                Some(RuleRange { range: range(42000, 42001), conflict: true }),
            ],
            "{:#?}",
            rules.describe()
        );
        assert_eq!(ifaces, [Some("d0".into()), Some("d2".into()), Some("d0".into()), None]);
        let mut lines = rules.describe();
        lines.sort();
        assert_eq!(
            lines,
            vec![
                "ip nat POSTROUTING: MASQUERADE -o d+ udp no ports (kernel default)",
                "ip nat POSTROUTING: MASQUERADE -o d0 tcp ports 40000-40007",
                "ip nat POSTROUTING: SNAT -o d0 udp to 10.97.3.20 ports 6000-6010",
                "ip natlab post: masquerade -o d1 tcp ports 41000-41003",
                "ip natlab post: masquerade -o d2 udp ports 42000-42001",
                "ip natlab post: snat tcp ports unreadable: ports loaded by something else than an immediate (a map?)",
                "ip natlab post: snat tcp to 10.97.3.10-10.97.3.11 ports 40000-40063",
                "ip6 nat POSTROUTING: MASQUERADE -o d0 udp ports 3000-3100",
                "ip6 nat POSTROUTING: SNAT -o d1 tcp to fd00:97::5 ports 7000-7010",
            ]
        );
        assert_eq!(rules.unreadable(), 1, "the map rule");
        drop(ns);
    }
}
