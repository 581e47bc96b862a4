//! The port range each SNAT/MASQUERADE rule allows, read from the kernel's nf_tables ruleset (stub: filled in by the ruleset work).
