//! Helpers for the NAT lab (issue 12, `nat_lab`), one file per piece.
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
mod truth;

pub use capture::*;
pub use lab::*;
pub use truth::*;
