//! The tracepoint path, for kernels that refuse fentry and kprobes (lockdown,
//! `CONFIG_KPROBES` unset): a minisocket never shows up in
//! `inet_sock_set_state` itself, but its full socket's close does, and a
//! takeover's connection does (`lifecycle`); its expiry is its timer's
//! (`timer`), and the segments it drops tell the rest (`skb`). The
//! tracepoints fire for every socket, timer expiry and dropped packet of the
//! system: the daemon attaches them only where the fentry path cannot be had.
//! What only this path keeps (`TW_INDEX` and the rest) is in `maps`, and its
//! programs follow and close minisockets as `Tracepoints` (`tw::Lifecycle`).

pub mod lifecycle;
pub mod maps;
pub mod nat_drop;
pub mod skb;
pub mod timer;

pub use maps::Tracepoints;
