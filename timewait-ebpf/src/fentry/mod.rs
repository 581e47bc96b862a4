//! The fast path: programs on the TIME_WAIT functions themselves
//! (net/ipv4/inet_timewait_sock.c, net/ipv4/tcp_minisocks.c), so nothing runs
//! for a timer, a packet or a socket that has nothing to do with TIME_WAIT.
//! Each hook has an fentry/fexit entry point and a kprobe/kretprobe one on the
//! same function (for kernels that accept kprobes but not trampolines); both
//! call the same code. The daemon attaches one of the two per function, by
//! trying (`timewait-daemon/src/kernel/paths.rs`).
//!
//! | function | gives |
//! | --- | --- |
//! | `__inet_twsk_schedule(tw, timeo, rearm)` | creation (`rearm` 0) and every re-arm, FIN_WAIT2 -> TIME_WAIT included |
//! | `tcp_timewait_state_process(tw, skb, th, ...)` entry and exit | every segment that meets a minisocket, with the kernel's verdict |
//! | `inet_twsk_deschedule_put(tw)` | every kill; why, from what ran just before on this CPU |
//! | `tw_timer_handler(timer)` | expiry |
//!
//! Full sockets (listeners, active opens, the close that gives a new
//! minisocket its direction) have their own fentry hooks: `sockets.rs`.
//!
//! These programs follow and close minisockets as `Functions`
//! (`tw::Lifecycle`): `TW_SOCKS` alone, no 4-tuple index. Nothing they
//! reference is allocated at run time, so the kprobe ones load without a
//! warning on 5.6-6.0 and at all on PREEMPT_RT kernels. From the other path
//! they share only `CONNECTING` (`maps.rs`), which the sockets signal's
//! tracepoint writes when the sockets hooks are not fentry's.

use timewait_common::{IndexKey, IndexVal, TwEntry};

use crate::tw::Lifecycle;

pub mod lifecycle;
pub mod segment;
pub mod sockets;

/// The lifecycle on the TIME_WAIT functions (fentry or kprobe), as its
/// programs follow and close minisockets: no index, since each of its
/// hooks gets the minisocket itself.
pub struct Functions;

impl Lifecycle for Functions {
    #[inline(always)]
    fn indexed() -> bool {
        false
    }

    #[inline(always)]
    fn index(_key: &IndexKey, _val: &IndexVal) -> bool {
        true
    }

    #[inline(always)]
    fn unindex(_timer: u64, _entry: &TwEntry) {}
}
