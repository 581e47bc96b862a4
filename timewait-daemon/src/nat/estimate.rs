//! Pure: seconds until the NAT source ports toward one destination run out, the host's model with conntrack's timeouts as the hold time.
//!
//! Toward one destination `U` ports are held now (the dump's entries). Over
//! the next `T` seconds `U(T) = U + rate * T - freed(T)`:
//! - `rate`: entries new since the previous dump (ids it did not have) per
//!   second between the two dumps; assumed to go on;
//! - `freed(T)`: entries whose state ends on its own within `T` (their
//!   `CTA_TIMEOUT`): TCP in TIME_WAIT or CLOSE, UDP not yet ASSURED.
//!   Everything else (ESTABLISHED holds 5 days, closing states move on to
//!   TIME_WAIT, ASSURED UDP streams are refreshed) is assumed held;
//! - each new port is held at least `hold` seconds (conntrack's TCP
//!   TIME_WAIT timeout, 120 s by default; its UDP timeout, 30 s).
//!
//! Both assumptions err toward running out sooner. The range runs out at
//! the first `T <= hold` with `U(T) >= range`, or never (`+Inf`). From 6.5
//! a new TCP connection may evict a TIME_WAIT entry instead of failing
//! (RESEARCH.md §3.2): there the estimate is a bound.

/// Seconds until `in_use` reaches `range` at `rate` new ports per second,
/// `expiring` (seconds left of each entry that ends on its own, any order)
/// freeing ports as they end; `f64::INFINITY` when it never does.
pub fn seconds_left(in_use: u64, range: u64, rate: f64, expiring: &[u32], hold: u32) -> f64 {
    if in_use >= range {
        return 0.0;
    }
    if rate.is_nan() || rate <= 0.0 {
        return f64::INFINITY;
    }
    let hold = hold.clamp(1, 3600) as usize;
    let mut ends = vec![0u32; hold];
    for left in expiring {
        if let Some(slot) = ends.get_mut(*left as usize) {
            *slot += 1;
        }
    }
    let (mut u, range) = (in_use as f64, range as f64);
    for (i, n) in ends.iter().enumerate() {
        if u + rate >= range {
            return i as f64 + (range - u) / rate;
        }
        u += rate - f64::from(*n);
    }
    f64::INFINITY
}

/// New entries between two dumps: ids of `now` (sorted) not in `before`
/// (sorted). `CTA_ID` is a hash and may collide (1 in ~100,000 measured):
/// fine for a rate.
pub fn new_ids(before: &[u32], now: &[u32]) -> u64 {
    now.iter().filter(|id| before.binary_search(id).is_err()).count() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_is_zero_and_no_rate_is_never() {
        assert_eq!(seconds_left(8, 8, 0.0, &[], 120), 0.0);
        assert_eq!(seconds_left(7, 8, 0.0, &[], 120), f64::INFINITY);
    }

    #[test]
    fn a_ramp_runs_out_unless_expiries_keep_up() {
        // 64 ports, 32 held, 2 new per second, nothing ending: 16 s.
        assert_eq!(seconds_left(32, 64, 2.0, &[], 120), 16.0);
        // The 32 are TIME_WAIT ending within 1 s: 2/s refill 64 only after 32 s.
        let ends = vec![0u32; 32];
        assert_eq!(seconds_left(32, 64, 2.0, &ends, 120), 32.0);
        // 0.5/s held 120 s is 60 ports: never 64.
        assert_eq!(seconds_left(0, 64, 0.5, &[], 120), f64::INFINITY);
    }

    #[test]
    fn new_ids_counts_only_unseen() {
        assert_eq!(new_ids(&[1, 5, 9], &[1, 2, 9, 10]), 2);
        assert_eq!(new_ids(&[], &[3]), 1);
    }
}
