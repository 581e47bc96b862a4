//! Helpers for the issue-3 tests (SYN in TIME_WAIT, kill reasons).
//!
//! Fixed-port clients, reading a connection's send sequence and timestamp,
//! hand-built TCP segments sent from a raw socket (`sockets`); `nstat`
//! counters of a namespace, and bounded waits for counters that the daemon
//! resolves a little late (`readings`).
//!
//! Everything that opens a socket must run inside the namespace under test
//! (through `NetNs::run`).

#![allow(dead_code, reason = "not every test uses every helper")]

mod readings;
mod sockets;

pub use readings::*;
pub use sockets::*;
