//! The tracepoint path, for kernels that refuse fentry and kprobes (lockdown,
//! `CONFIG_KPROBES` unset): a minisocket never shows up in
//! `inet_sock_set_state`, so it is followed through its timer (`tw->tw_timer`,
//! function `tw_timer_handler`) and the segments it drops (`kfree_skb`).
//! Programs here run for every timer of the system: the daemon attaches them
//! only where the fentry path cannot be had.

pub mod skb;
pub mod timer;
