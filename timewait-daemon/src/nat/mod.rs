//! The NAT room, empty until issue 27: NAT source ports per (NAT address, destination) from conntrack, and its stats.
//!
//! Nothing lives here yet (no code, no behaviour). What will:
//! - the conntrack reader: a ctnetlink dump at start-up, then NEW and
//!   DESTROY events (a new dump when events were lost), counting entries by
//!   their reply tuple per (`nat_address`, `remote`, `port`, `protocol`),
//!   those in conntrack's TCP TIME_WAIT apart;
//! - the port range each NAT rule allows (the ratio's denominator);
//! - conntrack's entries, its limit and its per-CPU stats (`insert_failed`,
//!   `drop`, `early_drop`, `clash_resolve`, `chaintoolong`);
//! - the packets dropped for want of a NAT port, per destination where the
//!   kernel shows which.
//!
//! It is a third source of kernel data beside `kernel/` (the eBPF maps):
//! `collect/` will read it into the `View`, `model/` fold it like the other
//! series, `http/exposition.rs` write the `timewait_nat_*` and
//! `timewait_conntrack_*` series, and `kernel/paths.rs`' table and `check`
//! say which way it is served.
//!
//! `RESEARCH.md` beside this file holds what was measured for it before any
//! of it was built (ctnetlink dump cost at 100k and 1M entries, the crates,
//! reading the NAT rule's port range, per-destination allocation failures
//! from `kfree_skb`, conntrack's eviction of TIME_WAIT entries from 6.5 on).
