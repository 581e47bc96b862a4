//! The HTTP room: the endpoints, the connections they are served on, TLS and basic auth, the Prometheus exposition.
//!
//! A scrape, top to bottom: `server` routes `GET /metrics` to the
//! collector's `View` (`collect/view.rs`), then `exposition` writes it in the
//! text format (`nat_exposition` the NAT side's series). `conns` and `write_timeout` keep one client from starving
//! the others; `tls_auth` is `--web.config.file`.

pub mod conns;
pub mod exposition;
mod nat_exposition;
pub mod server;
pub mod tls_auth;
pub mod write_timeout;
