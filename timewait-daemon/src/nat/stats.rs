//! conntrack's entries, limit and per-CPU stats from procfs (stub).
