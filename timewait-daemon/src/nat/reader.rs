//! The NAT reader thread (stub).
