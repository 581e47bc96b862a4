//! Time until the local port range toward one destination runs out.
//!
//! The model (README, "Time to exhaustion"): toward a destination `d`,
//! `in_use` local ports are held now (connections in any state, TIME_WAIT and
//! FIN_WAIT2 minisockets: `timewait_outbound_ports_in_use`). Over the next
//! `T` seconds:
//!
//! ```text
//! in_use(T) = in_use + rate * T - freed(T)
//! ```
//!
//! - `rate`: ports taken toward `d` per second over the last
//!   `RATE_WINDOW` (connections opened and still open, and TIME_WAIT
//!   created, from the creation times the kernel side records), over the
//!   span from the oldest of them (at least 1 s), so a ramp that began
//!   within the window is not diluted; assumed to go on;
//! - `freed(T)`: the TIME_WAIT minisockets toward `d` whose 60 s end within
//!   `T` (creation time + 60 s; Linux's TIME_WAIT length is fixed). Open
//!   connections and FIN_WAIT2 orphans are assumed to keep their ports, and
//!   each new port to be held at least 60 s (a client that closes first
//!   holds it in TIME_WAIT that long): both err on the side of running out
//!   sooner.
//!
//! So after 60 s the curve is flat (what the new ports add, their own
//! expiry takes away): the range runs out at the first `T <= 60` with
//! `in_use(T) >= range`, or never (`+Inf`). A steady rate either exhausts
//! the range within a minute or not at all: warnings minutes ahead come from
//! a rate that grows, which the estimate follows as it is re-read.

use std::time::Duration;

/// TIME_WAIT length on Linux (`TCP_TIMEWAIT_LEN`), in seconds.
pub const TIME_WAIT_SECS: usize = 60;

/// The window over which the rate of new ports is measured.
pub const RATE_WINDOW: Duration = Duration::from_secs(10);

/// What the kernel's per-socket tables said about one destination at one
/// walk.
#[derive(Debug, Clone, PartialEq)]
pub struct Schedule {
    /// `expiring[i]`: TIME_WAIT minisockets whose 60 s end `i` to `i + 1`
    /// seconds after the walk.
    pub expiring: [u32; TIME_WAIT_SECS],
    /// Ports taken within the window before the walk.
    pub taken: u32,
    /// How long before the walk the oldest of them was taken.
    pub span: Duration,
}

impl Default for Schedule {
    fn default() -> Self {
        Self { expiring: [0; TIME_WAIT_SECS], taken: 0, span: Duration::ZERO }
    }
}

impl Schedule {
    /// Adds a TIME_WAIT minisocket created `age` before the walk.
    pub fn time_wait(&mut self, age: Duration, window: Duration) {
        let left = (TIME_WAIT_SECS as u64).saturating_sub(age.as_secs() + 1);
        // Ends in [left, left + 1) s; one past its time (timer slack) still
        // ends within the first second.
        self.expiring[(left as usize).min(TIME_WAIT_SECS - 1)] += 1;
        self.connection(age, window);
    }

    /// Adds an open connection made `age` before the walk.
    pub fn connection(&mut self, age: Duration, window: Duration) {
        if age < window {
            self.taken += 1;
            self.span = self.span.max(age);
        }
    }

    /// Ports taken per second lately.
    pub fn rate(&self) -> f64 {
        f64::from(self.taken) / self.span.max(Duration::from_secs(1)).as_secs_f64()
    }

    /// Ports freed within `secs` seconds of a read `age` after the walk.
    pub fn freed_within(&self, age: Duration, secs: u64) -> u64 {
        let skip = age.as_secs() as usize;
        let end = skip.saturating_add(secs as usize).min(TIME_WAIT_SECS);
        self.expiring.get(skip..end).map_or(0, |s| s.iter().map(|n| u64::from(*n)).sum())
    }
}

/// Seconds until `in_use` reaches `range` at `rate` ports per second, with
/// `schedule` (read `age` after its walk) freeing its TIME_WAIT as they end;
/// `f64::INFINITY` when it never does.
pub fn seconds_left(in_use: u64, range: u64, rate: f64, schedule: &Schedule, age: Duration) -> f64 {
    if in_use >= range {
        return 0.0;
    }
    if rate.is_nan() || rate <= 0.0 {
        return f64::INFINITY;
    }
    let skip = age.as_secs() as usize;
    // Within second i the usage climbs from `u` by `rate`; the ports ending
    // in that second are counted free only at its end.
    let mut u = in_use as f64;
    let range = range as f64;
    for i in 0..TIME_WAIT_SECS {
        if u + rate >= range {
            return i as f64 + (range - u) / rate;
        }
        let ends = schedule.expiring.get(skip + i).copied().unwrap_or(0);
        u += rate - f64::from(ends);
    }
    f64::INFINITY
}

#[cfg(test)]
mod tests {
    use super::*;

    const W: Duration = RATE_WINDOW;

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn a_steady_ramp_runs_out_when_the_range_is_full() {
        // 100 ports, 20 held, 4 per second, nothing ends soon: 20 s.
        let s = Schedule::default();
        assert_eq!(seconds_left(20, 100, 4.0, &s, Duration::ZERO), 20.0);
        assert_eq!(seconds_left(100, 100, 4.0, &s, Duration::ZERO), 0.0);
        assert_eq!(seconds_left(120, 100, 0.0, &s, Duration::ZERO), 0.0);
    }

    #[test]
    fn no_rate_never_runs_out() {
        let s = Schedule::default();
        assert_eq!(seconds_left(99, 100, 0.0, &s, Duration::ZERO), f64::INFINITY);
        assert_eq!(seconds_left(99, 100, f64::NAN, &s, Duration::ZERO), f64::INFINITY);
    }

    #[test]
    fn expiries_push_it_back_or_away() {
        // 90 of 100 held, all in TIME_WAIT ending within 1 s: 1 per second
        // never refills 100 in 60 s; 2 per second (120 a minute) does, at 50 s.
        let mut s = Schedule::default();
        s.expiring[0] = 90;
        assert_eq!(seconds_left(90, 100, 1.0, &s, Duration::ZERO), f64::INFINITY);
        assert_eq!(seconds_left(90, 100, 2.0, &s, Duration::ZERO), 50.0);
        // Ending in 10 s instead: 5 s to the 10 ports left.
        let mut s = Schedule::default();
        s.expiring[10] = 90;
        assert_eq!(seconds_left(90, 100, 2.0, &s, Duration::ZERO), 5.0);
    }

    #[test]
    fn a_rate_that_outruns_the_expiries_still_runs_out() {
        // 28,000 ports; 500 new per second each held 60 s (30,000 > 28,000):
        // after 56 s. What 60 s ago was taken at the same rate ends now.
        let s = Schedule::default();
        let t = seconds_left(0, 28_000, 500.0, &s, Duration::ZERO);
        assert!((t - 56.0).abs() < 1e-9, "{t}");
        // 400 per second (24,000 in a minute): never.
        assert_eq!(seconds_left(0, 28_000, 400.0, &s, Duration::ZERO), f64::INFINITY);
    }

    #[test]
    fn a_ramp_younger_than_the_window_is_not_diluted() {
        // 5 per second for the last 6 s of a 10 s window: 5/s, not 3/s.
        let mut s = Schedule::default();
        for k in 0..30 {
            s.time_wait(Duration::from_millis(200 * k), W);
        }
        assert!((s.rate() - 30.0 / 5.8).abs() < 1e-9, "{}", s.rate());
        // One port just now is not a rate of thousands.
        let mut s = Schedule::default();
        s.connection(Duration::from_millis(1), W);
        assert_eq!(s.rate(), 1.0);
        assert_eq!(Schedule::default().rate(), 0.0);
    }

    #[test]
    fn a_read_after_the_walk_skips_what_ended_since() {
        let mut s = Schedule::default();
        s.expiring[2] = 50;
        s.expiring[30] = 40;
        assert_eq!(s.freed_within(Duration::ZERO, 10), 50);
        assert_eq!(s.freed_within(secs(3), 10), 0);
        assert_eq!(s.freed_within(secs(3), 60), 40);
        assert_eq!(s.freed_within(secs(61), 60), 0);
    }

    #[test]
    fn schedule_places_sockets_by_age() {
        let mut s = Schedule::default();
        s.time_wait(Duration::from_millis(500), W); // ends in 59.5 s
        s.time_wait(secs(59), W); // within 1 s
        s.time_wait(secs(75), W); // overdue: first second
        s.connection(secs(3), W);
        s.connection(secs(30), W);
        assert_eq!(s.expiring[59], 1);
        assert_eq!(s.expiring[0], 2);
        assert_eq!(s.taken, 2, "the new TIME_WAIT and the new connection");
        assert_eq!(s.span, secs(3));
        assert_eq!(s.rate(), 2.0 / 3.0);
    }
}
