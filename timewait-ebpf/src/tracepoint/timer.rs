//! A minisocket's expiry: `timer_expire_entry(struct timer_list *, unsigned
//! long baseclk)` (kernel/time/timer.c) with the timer's function
//! `tw_timer_handler`. It fires for every timer of the system that expires;
//! the check is one read and a compare. The other timer tracepoints
//! (`timer_init`, `timer_start`, `timer_cancel`) fire for every timer armed
//! or stopped, 27 runs per connection here, inside the timer base lock with
//! interrupts off: this path no longer attaches them (see `lifecycle`).

use aya_ebpf::{macros::btf_tracepoint, programs::BtfTracePointContext};
use timewait_common::counter;

use super::Tracepoints;
use crate::{
    maps::{config, read},
    tw::close_timer,
};

#[btf_tracepoint(function = "timer_expire_entry")]
pub fn tw_timer_expire(ctx: BtfTracePointContext) -> u32 {
    let timer: u64 = ctx.arg(0);
    let cfg = config();
    if read::<u64>(timer, cfg.offsets.timer_function).is_ok_and(|f| f == cfg.tw_timer_handler) {
        close_timer::<Tracepoints>(timer, counter::CLOSED_EXPIRED);
    }
    0
}
