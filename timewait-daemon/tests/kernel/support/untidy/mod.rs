//! Issue 12 helpers: real third-party processes and tens of thousands of TIME_WAIT in a test's namespace.
//!
//! Real third-party processes (nginx, wrk) in a test's namespace (`procs`),
//! tens of thousands of server-side TIME_WAIT made fast, and comparisons
//! whose failure output stays short when the daemon labels sockets one
//! series each (`many`).

mod many;
mod procs;

pub use many::*;
pub use procs::*;
