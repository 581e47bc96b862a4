//! Real-kernel integration tests for `timewaitd` (issue 2).
//!
//! One binary, one module per feature; libtest runs the tests in parallel
//! threads. Each test creates its own network namespace and starts its own
//! daemon in it (`ip netns exec`), then compares the daemon's metrics with
//! what `ss` shows in that namespace at the same quiet moment. They need
//! root; without it each test prints `SKIPPED` and returns.
//!
//! Run: `cargo test -p timewait-daemon --test kernel -- --test-threads 8 --nocapture`

mod support;

mod direction;
mod expiry;
mod fin_wait2_orphans;
mod ipv6;
mod many_remotes;
mod netns_isolation;
mod preexisting_and_restart;
mod server_side_500;

// Issue 3: SYN in TIME_WAIT, kill reasons.
mod syn_reuse;
mod syn_rejected;
mod reset;
mod connect_reuse;
mod mixed;

// Issue 4: port exhaustion.
mod exhaustion;
mod inbound_ratio;
mod overflow;
mod port_range_change;
mod web_tls;
mod web_limits;
mod deploy_metrics;
mod all_netns;
mod prometheus_server;
mod reliability;
mod health;
mod full_maps;

// Issue 11: the kernel matrix.
mod check_paths;

// Issue 12: untidy hosts.
mod direction_history;
mod dead_listener;
mod nat_lab;
mod nat_ports;
mod nginx_wrk;
mod dead_listener_70k;

// Issue 14: attribution and time to exhaustion.
mod time_to_exhaustion;
mod attribution;

// Issue 25: folded series that tell the truth, counters that never go back.
mod folded;
// Issue 25: connect()/bind() errors of TCP only, bounded, never backwards.
mod connect_errors;

// Issue 26: a load that neither warns nor taints (5.10's kprobe path).
mod load_taint;

// Issue 27: packets NAT found no port for, per destination.
mod nat_failures;
