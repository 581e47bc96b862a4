//! `top`'s rows: the daemon's series regrouped per remote, per port and per destination; rates; how numbers are written.

use std::{collections::BTreeMap, time::Duration};

use crate::cli::api::{CountersJ, Snapshot};

/// One remote across directions, with its SYN outcomes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RemoteRow {
    pub remote: String,
    pub tw_in: u64,
    pub tw_out: u64,
    pub fin_wait2: u64,
    pub syn_total: u64,
    pub syn_rejected: u64,
}

impl RemoteRow {
    pub fn syn_accepted(&self) -> u64 {
        self.syn_total.saturating_sub(self.syn_rejected)
    }
}

/// Busiest remotes first: by minisockets held, then SYNs, then name.
pub fn remote_rows(s: &Snapshot) -> Vec<RemoteRow> {
    let mut by: BTreeMap<&str, RemoteRow> = BTreeMap::new();
    for x in &s.series {
        let row = by
            .entry(&x.remote)
            .or_insert_with(|| RemoteRow { remote: x.remote.clone(), ..Default::default() });
        match x.direction.as_deref() {
            Some("inbound") => row.tw_in += x.time_wait,
            _ => row.tw_out += x.time_wait,
        }
        row.fin_wait2 += x.fin_wait2;
    }
    for x in &s.syns {
        let row = by
            .entry(&x.remote)
            .or_insert_with(|| RemoteRow { remote: x.remote.clone(), ..Default::default() });
        row.syn_total += x.total;
        row.syn_rejected += x.rejected;
    }
    let mut rows: Vec<RemoteRow> = by
        .into_values()
        .filter(|r| r.tw_in + r.tw_out + r.fin_wait2 + r.syn_total > 0)
        .collect();
    rows.sort_by(|a, b| {
        (b.tw_in + b.tw_out + b.fin_wait2)
            .cmp(&(a.tw_in + a.tw_out + a.fin_wait2))
            .then(b.syn_total.cmp(&a.syn_total))
            .then_with(|| a.remote.cmp(&b.remote))
    });
    rows
}

/// One (direction, service port) across remotes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PortRow {
    pub direction: String,
    pub port: u16,
    pub time_wait: u64,
    pub fin_wait2: u64,
    /// Remotes (labels) with minisockets on it.
    pub remotes: usize,
}

/// Busiest (direction, port) first.
pub fn port_rows(s: &Snapshot) -> Vec<PortRow> {
    let mut by: BTreeMap<(&str, u16), PortRow> = BTreeMap::new();
    for x in s.series.iter().filter(|x| x.time_wait + x.fin_wait2 > 0) {
        let dir = x.direction.as_deref().unwrap_or("?");
        let row = by
            .entry((dir, x.port))
            .or_insert_with(|| PortRow { direction: dir.to_string(), port: x.port, ..Default::default() });
        row.time_wait += x.time_wait;
        row.fin_wait2 += x.fin_wait2;
        row.remotes += 1;
    }
    let mut rows: Vec<PortRow> = by.into_values().collect();
    rows.sort_by(|a, b| {
        (b.time_wait + b.fin_wait2)
            .cmp(&(a.time_wait + a.fin_wait2))
            .then_with(|| (&a.direction, a.port).cmp(&(&b.direction, b.port)))
    });
    rows
}

/// One outbound destination and how much of the local port range it holds.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ExhaustionRow {
    pub remote: String,
    pub port: u16,
    pub connections: u64,
    pub time_wait: u64,
    pub fin_wait2: u64,
    pub in_use: u64,
    /// `in_use / local_port_range_size`; None when the range is unknown.
    pub ratio: Option<f64>,
    /// The daemon's time to exhaustion: None when it gave none (range
    /// unknown, first walk not done), Some(None) when not heading there.
    pub left: Option<Option<f64>>,
    /// Ports taken toward it per second.
    pub rate: Option<f64>,
    /// With `--attribute-cgroups`: the cgroup holding the most of its ports.
    pub busiest: Option<String>,
}

/// Outbound destinations by exhaustion ratio, highest first.
pub fn exhaustion_rows(s: &Snapshot) -> Vec<ExhaustionRow> {
    let range = s.sysctls.local_port_range_size.filter(|&r| r > 0);
    // One row per destination; with attribution its series are per cgroup.
    type Holders<'a> = BTreeMap<&'a str, u64>;
    let mut by_dest: BTreeMap<(&str, u16), (ExhaustionRow, Holders)> = BTreeMap::new();
    for x in s.series.iter().filter(|x| x.direction.as_deref() == Some("outbound")) {
        let (row, owners) = by_dest.entry((x.remote.as_str(), x.port)).or_insert_with(|| {
            let estimate = s.estimates.iter().find(|e| e.remote == x.remote && e.port == x.port);
            let row = ExhaustionRow {
                remote: x.remote.clone(),
                port: x.port,
                left: estimate.map(|e| e.seconds_left),
                rate: estimate.map(|e| e.rate),
                ..ExhaustionRow::default()
            };
            (row, BTreeMap::new())
        });
        row.connections += x.connections;
        row.time_wait += x.time_wait;
        row.fin_wait2 += x.fin_wait2;
        row.in_use += x.connections + x.time_wait + x.fin_wait2;
        if let Some(c) = &x.cgroup {
            *owners.entry(c.as_str()).or_default() += x.connections + x.time_wait + x.fin_wait2;
        }
    }
    let mut rows: Vec<ExhaustionRow> = by_dest
        .into_values()
        .map(|(mut row, owners)| {
            // The daemon's: of the busiest real destination in a folded
            // row (never the row's sum over the range).
            let daemon = s.ratios.iter().find(|w| w.remote == row.remote && w.port == row.port).map(|w| w.ratio);
            row.ratio = daemon.or_else(|| range.map(|r| (row.in_use as f64 / r as f64).min(1.0)));
            row.busiest = owners.into_iter().max_by(|a, b| a.1.cmp(&b.1).then(b.0.cmp(a.0))).map(|(c, _)| c.to_string());
            row
        })
        .filter(|r| r.in_use > 0)
        .collect();
    // Soonest to run out first, then the most held.
    let soon = |r: &ExhaustionRow| r.left.flatten().unwrap_or(f64::INFINITY);
    rows.sort_by(|a, b| {
        soon(a)
            .total_cmp(&soon(b))
            .then(b.in_use.cmp(&a.in_use))
            .then_with(|| (&a.remote, a.port).cmp(&(&b.remote, b.port)))
    });
    rows
}

/// Time left as the screen shows it: `-` without an estimate, `never`,
/// seconds under two minutes, else minutes and seconds.
pub fn fmt_left(left: Option<Option<f64>>) -> String {
    match left {
        None => "-".into(),
        Some(None) => "never".into(),
        Some(Some(s)) if s < 120.0 => format!("{s:.0}s"),
        Some(Some(s)) if s < 86_400.0 => format!("{}m{:02}s", (s / 60.0) as u64, (s % 60.0) as u64),
        Some(Some(_)) => ">1d".into(),
    }
}

/// `remote:port`, with IPv6 addresses (and blocks) in brackets.
pub fn endpoint(remote: &str, port: u16) -> String {
    let port = crate::model::aggregate::port_label(port);
    if remote.contains(':') { format!("[{remote}]:{port}") } else { format!("{remote}:{port}") }
}

/// Per-second rates between two polls.
#[derive(Debug, Clone, PartialEq)]
pub struct Rates {
    pub created_inbound: f64,
    pub created_outbound: f64,
    /// By reason, in `REASONS` order.
    pub closed: [f64; 5],
}

impl Rates {
    pub fn created(&self) -> f64 {
        self.created_inbound + self.created_outbound
    }
    pub fn closed_total(&self) -> f64 {
        self.closed.iter().sum()
    }
}

/// Rates from `prev` to `cur`, `secs` apart. None without a usable interval,
/// or when a counter went backwards (the daemon restarted in between).
pub fn rates(prev: &CountersJ, cur: &CountersJ, secs: f64) -> Option<Rates> {
    if !(secs.is_finite() && secs > 0.0) {
        return None;
    }
    let d = |a: u64, b: u64| b.checked_sub(a).map(|n| n as f64 / secs);
    let mut closed = [0.0; 5];
    for (i, c) in closed.iter_mut().enumerate() {
        *c = d(prev.closed[i], cur.closed[i])?;
    }
    Some(Rates {
        created_inbound: d(prev.created_inbound, cur.created_inbound)?,
        created_outbound: d(prev.created_outbound, cur.created_outbound)?,
        closed,
    })
}

/// A rate per second: one decimal below 10, none above.
pub fn fmt_rate(r: f64) -> String {
    if r < 10.0 { format!("{r:.1}") } else { format!("{r:.0}") }
}

/// An exhaustion ratio as a percentage, precise enough that a non-zero ratio
/// never reads as 0.
pub fn fmt_ratio(r: Option<f64>) -> String {
    match r {
        None => "?".into(),
        Some(r) if r <= 0.0 => "0%".into(),
        Some(r) if r < 0.0001 => "<0.01%".into(),
        Some(r) if r < 0.1 => format!("{:.2}%", r * 100.0),
        Some(r) => format!("{:.1}%", r * 100.0),
    }
}

pub fn fmt_opt(n: Option<u64>) -> String {
    n.map_or_else(|| "?".into(), |n| n.to_string())
}

pub fn fmt_interval(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s.fract() == 0.0 { format!("{s:.0}s") } else { format!("{s}s") }
}

pub fn fmt_age(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s < 10.0 { format!("{s:.1}s") } else { format!("{s:.0}s") }
}

/// `--interval`: seconds, > 0 and finite.
pub fn validate_interval(secs: f64) -> Result<Duration, String> {
    if !(secs.is_finite() && secs > 0.0) {
        return Err(format!("invalid --interval {secs}: expected seconds greater than 0, e.g. 1 or 0.5"));
    }
    Duration::try_from_secs_f64(secs).map_err(|_| format!("invalid --interval {secs}: too large"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::api::{SeriesJ, fixture::snap, parse};

    #[test]
    fn remotes_merge_directions_and_syns_busiest_first() {
        let rows = remote_rows(&snap());
        let names: Vec<&str> = rows.iter().map(|r| r.remote.as_str()).collect();
        // 20, 10, 4 held; 10.0.0.7 only has SYNs; 10.0.0.9 has nothing at all.
        assert_eq!(names, ["2001:db8::1", "10.0.0.2", "10.0.0.1", "10.0.0.7"]);
        let r = &rows[2];
        assert_eq!((r.tw_in, r.tw_out, r.fin_wait2), (1, 2, 1));
        let r = &rows[1];
        assert_eq!((r.tw_in, r.syn_total, r.syn_rejected, r.syn_accepted()), (9, 4, 1, 3));
        assert_eq!(rows[3].syn_accepted(), 3);
    }

    #[test]
    fn ports_sum_over_remotes() {
        let rows = port_rows(&snap());
        assert_eq!(
            rows,
            [
                PortRow { direction: "outbound".into(), port: 443, time_wait: 22, fin_wait2: 1, remotes: 2 },
                PortRow { direction: "inbound".into(), port: 80, time_wait: 10, fin_wait2: 1, remotes: 2 },
            ]
        );
    }

    #[test]
    fn exhaustion_is_outbound_in_use_over_range() {
        let rows = exhaustion_rows(&snap());
        assert_eq!(rows.len(), 2, "{rows:?}");
        // The one running out first leads, though it holds fewer.
        assert_eq!((rows[0].remote.as_str(), rows[0].in_use, rows[0].left), ("10.0.0.1", 8, Some(Some(42.5))));
        assert_eq!((rows[1].remote.as_str(), rows[1].in_use, rows[1].left), ("2001:db8::1", 20, Some(None)));
        assert!((rows[0].ratio.unwrap() - 8.0 / 28232.0).abs() < 1e-12);
        let mut s = snap();
        s.sysctls.local_port_range_size = None;
        s.estimates.clear();
        let rows = exhaustion_rows(&s);
        assert_eq!((rows[0].remote.as_str(), rows[0].ratio, rows[0].left), ("2001:db8::1", None, None));
        // Per-cgroup series of one destination: one row, the busiest named.
        let mut s = snap();
        for (cg, n) in [("api.service", 3), ("batch.service", 2)] {
            s.series.push(SeriesJ {
                direction: Some("outbound".into()),
                remote: "10.0.0.77".into(),
                port: 5432,
                cgroup: Some(cg.into()),
                connections: n,
                ..SeriesJ::default()
            });
        }
        let row = exhaustion_rows(&s).into_iter().find(|r| r.remote == "10.0.0.77").unwrap();
        assert_eq!((row.in_use, row.busiest.as_deref()), (5, Some("api.service")));
        assert_eq!(fmt_left(None), "-");
        assert_eq!(fmt_left(Some(None)), "never");
        assert_eq!(fmt_left(Some(Some(42.4))), "42s");
        assert_eq!(fmt_left(Some(Some(305.0))), "5m05s");
        assert_eq!(fmt_left(Some(Some(1e9))), ">1d");
        assert_eq!(endpoint("2001:db8::1", 443), "[2001:db8::1]:443");
        assert_eq!(endpoint("10.0.0.0/24", 80), "10.0.0.0/24:80");
    }

    #[test]
    fn ratio_formatting_never_rounds_to_zero() {
        assert_eq!(fmt_ratio(None), "?");
        assert_eq!(fmt_ratio(Some(0.0)), "0%");
        assert_eq!(fmt_ratio(Some(1.0 / 28232.0)), "<0.01%");
        assert_eq!(fmt_ratio(Some(8.0 / 28232.0)), "0.03%");
        assert_eq!(fmt_ratio(Some(0.5)), "50.0%");
        assert_eq!(fmt_ratio(Some(1.0)), "100.0%");
        assert_eq!(fmt_rate(0.25), "0.2");
        assert_eq!(fmt_rate(1234.6), "1235");
    }

    #[test]
    fn rates_are_differences_over_time_and_none_on_restart() {
        let a = CountersJ { created_inbound: 10, created_outbound: 0, closed: [5, 0, 0, 0, 0], lost: 0 };
        let b = CountersJ { created_inbound: 30, created_outbound: 4, closed: [9, 2, 0, 0, 0], lost: 0 };
        let r = rates(&a, &b, 2.0).unwrap();
        assert_eq!((r.created_inbound, r.created_outbound, r.created()), (10.0, 2.0, 12.0));
        assert_eq!(r.closed, [2.0, 1.0, 0.0, 0.0, 0.0]);
        assert_eq!(r.closed_total(), 3.0);
        assert_eq!(rates(&b, &a, 2.0), None, "counters went backwards: the daemon restarted");
        assert_eq!(rates(&a, &b, 0.0), None);
    }

    #[test]
    fn interval_must_be_positive_and_finite() {
        assert_eq!(validate_interval(0.5), Ok(Duration::from_millis(500)));
        for bad in [0.0, -1.0, f64::NAN, f64::INFINITY, 1e300] {
            assert!(validate_interval(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn tolerates_missing_fields() {
        let s = parse(r#"{"series":[{"remote":"1.2.3.4","time_wait":1}]}"#).unwrap();
        assert_eq!(remote_rows(&s)[0].tw_out, 1);
        assert!(parse("not json").unwrap_err().contains("invalid JSON"));
    }
}
