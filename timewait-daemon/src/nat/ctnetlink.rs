//! Conntrack over netlink: one streaming dump per interval, folded as it arrives (stub).
