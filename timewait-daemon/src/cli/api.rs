//! The client side of the daemon's JSON API: one GET that leaves no TIME_WAIT behind, and the types `top` reads.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use serde::Deserialize;

pub const API_PATH: &str = "/api/v1/snapshot";

/// GET `path` from the daemon at `addr`. The connection ends with an RST
/// (SO_LINGER 0) so that asking leaves no TIME_WAIT socket behind to count.
pub fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)?;
    let linger = libc::linger { l_onoff: 1, l_linger: 0 };
    // SAFETY: valid fd and a correctly sized linger struct.
    unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&s),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const linger).cast(),
            size_of::<libc::linger>() as libc::socklen_t,
        );
    }
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((text.as_str(), ""));
    let status = head.split_whitespace().nth(1).unwrap_or("?");
    if status != "200" {
        return Err(std::io::Error::other(format!("{path} answered {status}: {}", body.trim())));
    }
    Ok(body.to_string())
}

// The daemon's JSON (collect/view.rs `View`), only what the screen shows. Every
// field defaults, so an older or newer daemon still renders.

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct Snapshot {
    pub series: Vec<SeriesJ>,
    pub syns: Vec<SynJ>,
    pub counters: CountersJ,
    pub connect_errors: Vec<ConnectErrorJ>,
    pub sysctls: SysctlsJ,
    pub estimates: Vec<EstimateJ>,
    /// Per outbound series, the ratio of its busiest real destination
    /// (collect/view.rs `View::ratios`; absent from daemons before issue 25).
    pub ratios: Vec<RatioJ>,
    /// The NAT side (issue 27; absent from older daemons).
    pub nat: Option<NatJ>,
}

/// The NAT side of a snapshot (nat/reader.rs `NatView`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct NatJ {
    pub state: String,
    pub unavailable: Option<String>,
    pub series: Vec<NatSeriesJ>,
}

/// One NAT series (nat/fold.rs `NatSeries`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct NatSeriesJ {
    pub nat_address: String,
    pub remote: String,
    pub port: String,
    pub protocol: String,
    pub in_use: u64,
    pub time_wait: u64,
    pub ratio: Option<f64>,
    /// Absent: not estimated yet; null: never (+Inf); else seconds.
    pub seconds: Option<serde_json::Value>,
}

/// The port-exhaustion ratio of one outbound series (model/ratios.rs `Worst`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct RatioJ {
    pub remote: String,
    pub port: u16,
    pub ratio: f64,
}

/// Time to exhaustion of one outbound series (collect/schedule.rs `Estimate`).
pub use crate::collect::schedule::Estimate as EstimateJ;

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct SeriesJ {
    pub direction: Option<String>,
    pub remote: String,
    pub port: u16,
    /// With `--attribute-cgroups`.
    pub cgroup: Option<String>,
    pub time_wait: u64,
    pub fin_wait2: u64,
    pub connections: u64,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct SynJ {
    pub remote: String,
    pub total: u64,
    pub rejected: u64,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct CountersJ {
    pub created_inbound: u64,
    pub created_outbound: u64,
    /// By reason, in `collect::view::REASONS` order.
    pub closed: [u64; 5],
    pub lost: u64,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct ConnectErrorJ {
    pub errno: String,
    pub comm: String,
    pub count: u64,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct SysctlsJ {
    pub max_buckets: Option<u64>,
    pub local_port_range_size: Option<u64>,
    pub overflow: Option<u64>,
}

pub fn parse(body: &str) -> Result<Snapshot, String> {
    serde_json::from_str(body).map_err(|e| format!("invalid JSON from {API_PATH}: {e}"))
}

/// A daemon's answer, for the tests of `top`'s rows and screen.
#[cfg(test)]
pub mod fixture {
    use super::{Snapshot, parse};

    pub const JSON: &str = r#"{
      "series":[
        {"direction":"outbound","remote":"10.0.0.1","port":443,"time_wait":2,"fin_wait2":1,"connections":5},
        {"direction":"inbound","remote":"10.0.0.2","port":80,"time_wait":9,"fin_wait2":1,"connections":0},
        {"direction":"inbound","remote":"10.0.0.1","port":80,"time_wait":1,"fin_wait2":0,"connections":0},
        {"direction":"outbound","remote":"2001:db8::1","port":443,"time_wait":20,"fin_wait2":0,"connections":0},
        {"direction":"outbound","remote":"10.0.0.9","port":53,"time_wait":0,"fin_wait2":0,"connections":0}],
      "syns":[{"remote":"10.0.0.2","total":4,"rejected":1},{"remote":"10.0.0.7","total":3,"rejected":0}],
      "counters":{"created_inbound":100,"created_outbound":50,"closed":[10,2,0,1,0],"lost":0,
                  "snapshot":0,"snapshot_listeners":0,"substate_changes":0,"segments":[0,0,0,0,0]},
      "lifetimes":[],
      "connect_errors":[{"errno":"EADDRNOTAVAIL","comm":"curl","count":3}],
      "sysctls":{"max_buckets":262144,"local_port_range_size":28232,"overflow":0},
      "estimates":[{"remote":"10.0.0.1","port":443,"seconds_left":42.5,"rate":3.0,"freed_10s":1,"freed_60s":2},
                   {"remote":"2001:db8::1","port":443,"seconds_left":null,"rate":0.0,"freed_10s":0,"freed_60s":20}]}"#;

    pub fn snap() -> Snapshot {
        parse(JSON).unwrap()
    }
}
