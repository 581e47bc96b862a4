//! Helpers for the NAT labs (issue 12, `nat_lab`: the server behind a balancer; issue 27, `router`: the balancer itself), one file per piece.
//!
//! A routed topology of network namespaces joined by veth pairs, a real web
//! server (Debian's nginx) inside one of them, HTTP/1.1 clients that send
//! `Connection: close` (`lab`); a packet capture (`tshark`) as ground truth
//! (`capture`), and the rule that tells, from that capture, which SYNs met a
//! TIME_WAIT minisocket and which of those the server did not accept (`truth`).
//!
//! Everything here runs commands through `ip netns exec` or sockets through
//! `NetNs::run`/`NetNs::spawn`: nothing touches the host's own network.

#![allow(dead_code, reason = "not every test uses every helper")]

mod capture;
mod lab;
mod router;
mod truth;

pub use capture::*;
pub use lab::*;
pub use router::*;
pub use truth::*;
