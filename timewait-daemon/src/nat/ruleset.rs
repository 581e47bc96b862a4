//! The port range each SNAT/MASQUERADE rule allows, read from the kernel's nf_tables ruleset (stub until the ruleset reader lands: no rules known).

use std::net::IpAddr;

use super::{PortRange, Protocol};

#[derive(Debug, thiserror::Error)]
pub enum RulesetError {
    #[error("nf_tables ruleset: not read")]
    NotRead,
}

pub struct Rules {}

pub struct RuleRange {
    pub range: PortRange,
    pub conflict: bool,
}

pub fn read() -> Result<Rules, RulesetError> {
    Ok(Rules::empty())
}

pub fn interface_of(_addr: IpAddr) -> Option<String> {
    None
}

impl Rules {
    pub fn empty() -> Rules {
        Rules {}
    }

    pub fn range_for(&self, _nat_address: IpAddr, _protocol: Protocol, _iface_of: &dyn Fn(IpAddr) -> Option<String>) -> Option<RuleRange> {
        None
    }

    pub fn describe(&self) -> Vec<String> {
        Vec::new()
    }

    pub fn unreadable(&self) -> usize {
        0
    }
}
