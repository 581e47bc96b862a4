//! The model room: pure logic from raw kernel keys to what is shown, with no I/O but cgroup names.
//!
//! - `aggregate`: keys into labelled series (CIDR blocks, top-K + `other`)
//!   and where a folded key went (`Fold`); `ratios`: each folded series'
//!   ratio, of its busiest real destination.
//! - `syn_ledger`: the per-remote SYN counters; `error_ledger`: the
//!   connect()/bind() error counters by name: series that never go back.
//! - `exhaustion`: the time-to-exhaustion model; `cgroups`: cgroup ids to
//!   service names (`--attribute-cgroups`).

pub mod aggregate;
pub mod cgroups;
pub mod error_ledger;
pub mod exhaustion;
pub mod ratios;
pub mod syn_ledger;
