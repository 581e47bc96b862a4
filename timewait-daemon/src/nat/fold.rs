//! Pure: conntrack entries into counts per destination (stub).
