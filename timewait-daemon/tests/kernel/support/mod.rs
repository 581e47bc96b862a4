//! The shared harness of the real-kernel tests, one file per concern.
//!
//! Every test gets its own network namespace and its own daemon in it, so the
//! tests run in parallel (libtest threads) without counting each other's
//! sockets. Test threads never change namespace themselves: work inside a
//! namespace runs on a fresh thread that `setns()`es first (`NetNs::run`),
//! because `setns` moves only the calling thread.
//!
//! - `matrix`: root or a skip, the kernel of the matrix, the paths it must get;
//! - `netns`: the network-namespace guard; `ss`: `ss` parsed and grouped;
//! - `daemon`: the daemon under test; `http`: a scrape client that leaves no
//!   TIME_WAIT behind; `metrics`: a Prometheus text parser;
//! - `wait`: bounded waits and the "same quiet moment" comparison;
//! - `sockets`: socket workloads; `counters`: counters that never go back.
//!
//! The tests use these through the names below (`crate::support::NetNs`).
//! The helpers of one family of tests have their module:
//! - `syn`: SYN in TIME_WAIT, kill reasons (issue 3);
//! - `ports`: port exhaustion (issue 4);
//! - `nat`: the NAT lab, `untidy`: nginx, wrk and 70,000 TIME_WAIT (issue 12).

pub mod nat;
pub mod ports;
pub mod syn;
pub mod untidy;

mod counters;
mod daemon;
mod http;
mod matrix;
mod metrics;
mod netns;
mod sockets;
mod ss;
mod wait;

pub use daemon::{Daemon, WEB_ADDR, assert_scrape_leaves_no_timewait, daemon_bin};
pub use http::http_get;
pub use matrix::{
    emulated, expected_bind_errors_path, expected_paths, expected_sockets_path, require_root, segments_available,
    test_kernel, test_probe_path,
};
pub use metrics::Metrics;
pub use netns::{NetNs, run_cmd};
pub use sockets::{
    V6_LOOPBACK, abortive_close, bound_socket, connect_from, connect_from_port, server_closes_first,
    server_closes_first_clients_stay, sockaddr, v4, wait_eof,
};
pub use ss::parse_ss;
pub use wait::{assert_maps_equal, quiet_equal, quiet_equal_within, scaled, wait_until};
