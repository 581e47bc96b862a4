//! Reading `ss`: its lines parsed, and grouped the way the daemon labels its series.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

/// `(direction, remote, port)`, exactly as the daemon's labels.
pub type SeriesKey = (String, String, u16);

#[derive(Debug, Clone)]
pub struct SsSocket {
    pub local: SocketAddr,
    pub peer: SocketAddr,
    pub timer: Option<String>,
}

impl SsSocket {
    pub fn series_key(&self, listening: &[u16]) -> SeriesKey {
        let remote = label_ip(self.peer.ip());
        if listening.contains(&self.local.port()) {
            ("inbound".to_string(), remote, self.local.port())
        } else {
            ("outbound".to_string(), remote, self.peer.port())
        }
    }
}

/// The daemon's label form of an address: IPv4-mapped IPv6 as plain IPv4,
/// everything else as Rust prints it (RFC 5952 for IPv6).
pub fn label_ip(ip: IpAddr) -> String {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => v4.to_string(),
            None => v6.to_string(),
        },
        IpAddr::V4(v4) => v4.to_string(),
    }
}

/// Parses `ss -Htan[o]` output, with or without the state column.
pub fn parse_ss(text: &str) -> Vec<SsSocket> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|line| {
            let toks: Vec<&str> = line.split_whitespace().collect();
            // Without a state filter the first column is the state name.
            let first = if toks[0].parse::<u64>().is_ok() { 0 } else { 1 };
            let (local, peer) = match (toks.get(first + 2), toks.get(first + 3)) {
                (Some(l), Some(p)) => (*l, *p),
                _ => panic!("unexpected ss line: {line:?}"),
            };
            let timer = toks.iter().find_map(|t| {
                t.strip_prefix("timer:(")
                    .map(|t| t.trim_end_matches(')').to_string())
            });
            SsSocket {
                local: parse_ss_addr(local)
                    .unwrap_or_else(|| panic!("bad ss address {local:?} in {line:?}")),
                peer: parse_ss_addr(peer)
                    .unwrap_or_else(|| panic!("bad ss address {peer:?} in {line:?}")),
                timer,
            }
        })
        .collect()
}

/// `127.0.0.1:80`, `[::1]:80`, `[::ffff:127.0.0.1]:80`, `[fe80::1%lo]:80`.
pub fn parse_ss_addr(s: &str) -> Option<SocketAddr> {
    let (host, port) = s.rsplit_once(':')?;
    let port: u16 = port.parse().ok()?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let host = host.split('%').next()?;
    let ip: IpAddr = host.parse().ok()?;
    Some(SocketAddr::new(ip, port))
}

pub fn group_by_remote(socks: &[SsSocket]) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for s in socks {
        *out.entry(label_ip(s.peer.ip())).or_insert(0) += 1;
    }
    out
}

pub fn group_by_series(socks: &[SsSocket], listening: &[u16]) -> BTreeMap<SeriesKey, u64> {
    let mut out = BTreeMap::new();
    for s in socks {
        *out.entry(s.series_key(listening)).or_insert(0) += 1;
    }
    out
}
