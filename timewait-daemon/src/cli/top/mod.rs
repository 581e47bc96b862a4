//! `timewaitd top`: live terminal view read from a running daemon's API.
//!
//! A poller thread fetches `GET /api/v1/snapshot` every `--interval` seconds
//! (with `snapshot::http_get`, which closes with an RST, so watching leaves no
//! TIME_WAIT behind in the namespace being watched) and hands each result to
//! the UI loop, which draws with ratatui on crossterm and reads keys. Rates
//! are the difference between two successful polls. Everything between the
//! JSON and the screen (rows, sorting, rates, formatting) is pure and
//! unit-tested below; the terminal is restored on quit, on error, on a
//! signal and on panic.

use std::{
    collections::BTreeMap,
    io::{IsTerminal as _, Stdout},
    net::SocketAddr,
    process::ExitCode,
    sync::{
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    thread,
    time::{Duration, Instant},
};

use ratatui::{
    Frame, Terminal,
    backend::CrosstermBackend,
    crossterm::{
        cursor,
        event::{self, Event, KeyCode, KeyEvent, KeyEventKind, KeyModifiers},
        execute,
        terminal::{self, EnterAlternateScreen, LeaveAlternateScreen},
    },
    layout::{Constraint, Layout, Rect},
    style::{Color, Modifier, Style, Stylize as _},
    text::{Line, Span},
    widgets::{Block, Cell, Paragraph, Row, Table, Wrap},
};
use serde::Deserialize;

use crate::{cli::RunArgs, collect::view::REASONS, config, snapshot::http_get};

const API_PATH: &str = "/api/v1/snapshot";
/// Longest wait for a key before the screen is redrawn ("updated Ns ago").
const TICK: Duration = Duration::from_millis(250);

// ---------------------------------------------------------------------------
// The daemon's JSON (collector.rs `View`), only what the screen shows. Every
// field defaults, so an older or newer daemon still renders.

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct Snapshot {
    pub series: Vec<SeriesJ>,
    pub syns: Vec<SynJ>,
    pub counters: CountersJ,
    pub connect_errors: Vec<ConnectErrorJ>,
    pub sysctls: SysctlsJ,
    pub estimates: Vec<EstimateJ>,
    /// Per outbound series, the ratio of its busiest real destination
    /// (collector.rs `View::ratios`; absent from daemons before issue 25).
    pub ratios: Vec<RatioJ>,
}

/// The port-exhaustion ratio of one outbound series (aggregate.rs `Worst`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct RatioJ {
    pub remote: String,
    pub port: u16,
    pub ratio: f64,
}

/// Time to exhaustion of one outbound series (collector.rs `Estimate`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct EstimateJ {
    pub remote: String,
    pub port: u16,
    /// None: not heading there.
    pub seconds_left: Option<f64>,
    pub rate: f64,
    pub freed_10s: u64,
    pub freed_60s: u64,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct SeriesJ {
    pub direction: Option<String>,
    pub remote: String,
    pub port: u16,
    /// With `--attribute-cgroups`.
    pub cgroup: Option<String>,
    pub time_wait: u64,
    pub fin_wait2: u64,
    pub connections: u64,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct SynJ {
    pub remote: String,
    pub total: u64,
    pub rejected: u64,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct CountersJ {
    pub created_inbound: u64,
    pub created_outbound: u64,
    /// By reason, in `collector::REASONS` order.
    pub closed: [u64; 5],
    pub lost: u64,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct ConnectErrorJ {
    pub errno: String,
    pub comm: String,
    pub count: u64,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct SysctlsJ {
    pub max_buckets: Option<u64>,
    pub local_port_range_size: Option<u64>,
    pub overflow: Option<u64>,
}

pub fn parse(body: &str) -> Result<Snapshot, String> {
    serde_json::from_str(body).map_err(|e| format!("invalid JSON from {API_PATH}: {e}"))
}

// ---------------------------------------------------------------------------
// Rows

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

fn left_style(left: Option<Option<f64>>) -> Style {
    match left.flatten() {
        Some(s) if s < 300.0 => Style::new().fg(Color::Red).add_modifier(Modifier::BOLD),
        Some(s) if s < 3600.0 => Style::new().fg(Color::Yellow),
        _ => Style::new(),
    }
}

/// `remote:port`, with IPv6 addresses (and blocks) in brackets.
pub fn endpoint(remote: &str, port: u16) -> String {
    let port = crate::model::aggregate::port_label(port);
    if remote.contains(':') { format!("[{remote}]:{port}") } else { format!("{remote}:{port}") }
}

// ---------------------------------------------------------------------------
// Rates

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

// ---------------------------------------------------------------------------
// Formatting

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

fn ratio_style(r: Option<f64>) -> Style {
    match r {
        Some(r) if r >= 0.8 => Style::new().fg(Color::Red).add_modifier(Modifier::BOLD),
        Some(r) if r >= 0.5 => Style::new().fg(Color::Yellow),
        _ => Style::new(),
    }
}

fn fmt_opt(n: Option<u64>) -> String {
    n.map_or_else(|| "?".into(), |n| n.to_string())
}

fn fmt_interval(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s.fract() == 0.0 { format!("{s:.0}s") } else { format!("{s}s") }
}

fn fmt_age(d: Duration) -> String {
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

// ---------------------------------------------------------------------------
// State and drawing

struct Sample {
    at: Instant,
    snap: Snapshot,
}

pub struct State {
    addr: SocketAddr,
    interval: Duration,
    current: Sample,
    previous: Option<Sample>,
    /// The last poll's error, and since when polls have been failing.
    error: Option<(String, Instant)>,
}

impl State {
    fn new(addr: SocketAddr, interval: Duration, first: Snapshot, at: Instant) -> Self {
        Self { addr, interval, current: Sample { at, snap: first }, previous: None, error: None }
    }

    fn update(&mut self, at: Instant, result: Result<Snapshot, String>) {
        match result {
            Ok(snap) => {
                let prev = std::mem::replace(&mut self.current, Sample { at, snap });
                self.previous = Some(prev);
                self.error = None;
            }
            Err(e) => {
                let since = self.error.take().map_or(at, |(_, since)| since);
                self.error = Some((e, since));
            }
        }
    }

    fn rates(&self) -> Option<Rates> {
        let prev = self.previous.as_ref()?;
        let secs = self.current.at.duration_since(prev.at).as_secs_f64();
        rates(&prev.snap.counters, &self.current.snap.counters, secs)
    }
}

fn header_lines(st: &State, now: Instant) -> Vec<Line<'static>> {
    let s = &st.current.snap;
    let dim = Style::new().fg(Color::DarkGray);
    let label = |t: &str| Span::styled(t.to_string(), dim);
    let val = |t: String| Span::styled(t, Style::new().add_modifier(Modifier::BOLD));
    let mut lines = Vec::new();

    let age = fmt_age(now.saturating_duration_since(st.current.at));
    lines.push(match &st.error {
        None => Line::from(vec![
            Span::styled("● ", Style::new().fg(Color::Green)),
            Span::raw(format!("daemon {} answering", st.addr)),
            label(format!(" · updated {age} ago · every {}", fmt_interval(st.interval)).as_str()),
        ]),
        Some((e, since)) => Line::from(vec![
            Span::styled(
                format!("✗ daemon {} not answering: {e}", st.addr),
                Style::new().fg(Color::Red).add_modifier(Modifier::BOLD),
            ),
            label(
                format!(
                    " · failing for {}, retrying every {}; data below is {age} old",
                    fmt_age(now.saturating_duration_since(*since)),
                    fmt_interval(st.interval)
                )
                .as_str(),
            ),
        ]),
    });

    let tw: u64 = s.series.iter().map(|x| x.time_wait).sum();
    let fw: u64 = s.series.iter().map(|x| x.fin_wait2).sum();
    let mut l = vec![label("TIME_WAIT "), val(tw.to_string()), label("   FIN_WAIT2 "), val(fw.to_string())];
    l.push(label("   max buckets "));
    l.push(Span::raw(fmt_opt(s.sysctls.max_buckets)));
    l.push(label("   local ports "));
    l.push(Span::raw(fmt_opt(s.sysctls.local_port_range_size)));
    lines.push(Line::from(l));

    let r = st.rates();
    let rate = |f: &dyn Fn(&Rates) -> f64| r.as_ref().map_or_else(|| "–".to_string(), |r| fmt_rate(f(r)));
    let mut l = vec![
        label("created/s "),
        val(rate(&Rates::created)),
        label(" (in "),
        Span::raw(rate(&|r| r.created_inbound)),
        label(", out "),
        Span::raw(rate(&|r| r.created_outbound)),
        label(")   closed/s "),
        val(rate(&Rates::closed_total)),
    ];
    if let Some(r) = &r {
        let parts: Vec<String> = REASONS
            .iter()
            .zip(r.closed)
            .filter(|(_, v)| *v > 0.0)
            .map(|((name, _), v)| format!("{name} {}", fmt_rate(v)))
            .collect();
        if !parts.is_empty() {
            l.push(label(" ("));
            l.push(Span::raw(parts.join(", ")));
            l.push(label(")"));
        }
    }
    lines.push(Line::from(l));

    // Counters that only ever matter when they move: red once they did.
    let prev = st.previous.as_ref().map(|p| &p.snap);
    let rising = |cur: Option<u64>, prev: Option<u64>| matches!((cur, prev), (Some(c), Some(p)) if c > p);
    let alarm = |t: String, hot: bool| {
        if hot { Span::styled(t, Style::new().fg(Color::Red).add_modifier(Modifier::BOLD)) } else { val(t) }
    };
    let ce: u64 = s.connect_errors.iter().map(|x| x.count).sum();
    let ce_prev: Option<u64> = prev.map(|p| p.connect_errors.iter().map(|x| x.count).sum());
    let mut l = vec![
        label("overflow "),
        alarm(fmt_opt(s.sysctls.overflow), rising(s.sysctls.overflow, prev.and_then(|p| p.sysctls.overflow))),
        label("   events lost "),
        alarm(s.counters.lost.to_string(), s.counters.lost > 0),
        label("   connect errors "),
        alarm(ce.to_string(), rising(Some(ce), ce_prev)),
    ];
    if let Some(worst) = s.connect_errors.iter().max_by_key(|x| x.count).filter(|x| x.count > 0) {
        l.push(label(&format!(" (most: {} {} {})", worst.comm, worst.errno, worst.count)));
    }
    lines.push(Line::from(l));
    lines
}

fn num(n: impl ToString) -> Cell<'static> {
    Cell::from(Line::from(n.to_string()).right_aligned())
}

fn head(cols: &[&'static str], right_from: usize) -> Row<'static> {
    Row::new(cols.iter().enumerate().map(|(i, c)| {
        let l = Line::from(*c);
        Cell::from(if i >= right_from { l.right_aligned() } else { l })
    }))
    .style(Style::new().add_modifier(Modifier::BOLD).fg(Color::Cyan))
}

fn titled(title: String) -> Block<'static> {
    Block::bordered().title(Line::from(title).bold())
}

/// Width of a table's first (name) column: as wide as its longest name (at
/// least the heading), within what the block leaves next to the other
/// columns; spare width stays at the right instead of between the columns.
pub fn first_col_width(longest: usize, heading: &str, area_width: u16, other_cols: &[u16]) -> u16 {
    let others: u16 = other_cols.iter().sum::<u16>() + other_cols.len() as u16;
    let room = area_width.saturating_sub(2).saturating_sub(others);
    let want = u16::try_from(longest.max(heading.len())).unwrap_or(u16::MAX);
    want.min(room).max(10)
}

const REMOTE_COLS: [u16; 6] = [7, 7, 9, 7, 8, 8];

fn remotes_table(s: &Snapshot, width: u16) -> Table<'static> {
    let rows = remote_rows(s);
    let n = rows.len();
    let w = first_col_width(rows.iter().map(|r| r.remote.len()).max().unwrap_or(0), "REMOTE", width, &REMOTE_COLS);
    let body = rows.into_iter().map(|r| {
        let rej = if r.syn_rejected > 0 {
            Cell::from(Line::from(r.syn_rejected.to_string()).right_aligned().red().bold())
        } else {
            num(0)
        };
        Row::new(vec![
            Cell::from(r.remote.clone()),
            num(r.tw_in),
            num(r.tw_out),
            num(r.fin_wait2),
            num(r.syn_total),
            rej,
            num(r.syn_accepted()),
        ])
    });
    Table::new(body, std::iter::once(w).chain(REMOTE_COLS).map(Constraint::Length))
    .header(head(&["REMOTE", "TW IN", "TW OUT", "FIN_WAIT2", "SYN", "REJECTED", "ACCEPTED"], 1))
    .block(titled(format!(" Busiest remotes ({n}) · TIME_WAIT by direction, SYNs that hit one ")))
}

fn ports_table(s: &Snapshot) -> Table<'static> {
    let rows = port_rows(s);
    let n = rows.len();
    let body = rows.into_iter().map(|r| {
        Row::new(vec![
            Cell::from(r.direction.clone()),
            Cell::from(crate::model::aggregate::port_label(r.port)),
            num(r.time_wait),
            num(r.fin_wait2),
            num(r.remotes),
        ])
    });
    Table::new(
        body,
        [
            Constraint::Length(9),
            Constraint::Length(5),
            Constraint::Length(9),
            Constraint::Length(9),
            Constraint::Length(7),
        ],
    )
    .header(head(&["DIRECTION", "PORT", "TIME_WAIT", "FIN_WAIT2", "REMOTES"], 1))
    .block(titled(format!(" Busiest ports ({n}) ")))
}

const EXHAUSTION_COLS: [u16; 6] = [6, 9, 7, 7, 6, 6];

fn exhaustion_table(s: &Snapshot, width: u16) -> Table<'static> {
    let rows = exhaustion_rows(s);
    let n = rows.len();
    // With attribution, who holds the most: `10.0.0.5:5432 by api.service`.
    let dest = |r: &ExhaustionRow| match &r.busiest {
        Some(c) => format!("{} by {c}", endpoint(&r.remote, r.port)),
        None => endpoint(&r.remote, r.port),
    };
    let longest = rows.iter().map(|r| dest(r).chars().count()).max().unwrap_or(0);
    let w = first_col_width(longest, "DESTINATION", width, &EXHAUSTION_COLS);
    let range = fmt_opt(s.sysctls.local_port_range_size);
    let body = rows.into_iter().map(|r| {
        Row::new(vec![
            Cell::from(dest(&r)),
            num(r.connections),
            num(r.time_wait + r.fin_wait2),
            num(r.in_use),
            Cell::from(Line::from(fmt_ratio(r.ratio)).right_aligned().style(ratio_style(r.ratio))),
            num(r.rate.map_or_else(|| "-".into(), fmt_rate)),
            Cell::from(Line::from(fmt_left(r.left)).right_aligned().style(left_style(r.left))),
        ])
    });
    Table::new(body, std::iter::once(w).chain(EXHAUSTION_COLS).map(Constraint::Length))
    .header(head(&["DESTINATION", "CONNS", "TW+FIN_W2", "IN USE", "RATIO", "NEW/S", "LEFT"], 1))
    .block(titled(format!(" Outbound exhaustion ({n}) · ports in use / {range} local ports ")))
}

/// Rows a paragraph of `lines` takes at `width` columns when wrapped.
fn wrapped_height(lines: &[Line], width: u16) -> u16 {
    let w = usize::from(width.max(1));
    lines.iter().map(|l| l.width().max(1).div_ceil(w) as u16).sum()
}

pub fn draw(f: &mut Frame, st: &State, now: Instant) {
    let area = f.area();
    let lines = header_lines(st, now);
    // Word wrap can take a row more than a character count says.
    let inner = area.width.saturating_sub(2);
    let mut h = wrapped_height(&lines, inner);
    if h > lines.len() as u16 {
        h += 1;
    }
    let [top, rest] = Layout::vertical([Constraint::Length(h + 2), Constraint::Fill(1)]).areas(area);
    let header = Paragraph::new(lines).wrap(Wrap { trim: false }).block(
        Block::bordered()
            .title(Line::from(format!(" timewaitd top · {} ", st.addr)).bold())
            .title_bottom(Line::from(" q quit ").right_aligned()),
    );
    f.render_widget(header, top);

    let s = &st.current.snap;
    let (remotes, ports, exhaustion): (Rect, Rect, Rect) = if area.width >= 120 {
        let [a, b] = Layout::vertical([Constraint::Fill(1), Constraint::Fill(1)]).areas(rest);
        let [p, e] = Layout::horizontal([Constraint::Percentage(40), Constraint::Percentage(60)]).areas(b);
        (a, p, e)
    } else {
        let [a, p, e] = Layout::vertical([Constraint::Fill(1); 3]).areas(rest);
        (a, p, e)
    };
    f.render_widget(remotes_table(s, remotes.width), remotes);
    f.render_widget(ports_table(s), ports);
    f.render_widget(exhaustion_table(s, exhaustion.width), exhaustion);
}

// ---------------------------------------------------------------------------
// Terminal and loop

/// Set by SIGTERM, SIGHUP and SIGINT: leave the loop and restore the terminal.
static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

fn restore_terminal() {
    let _ = terminal::disable_raw_mode();
    let _ = execute!(std::io::stdout(), LeaveAlternateScreen, cursor::Show);
}

/// Restores the terminal when dropped: on quit, on error and on unwind.
struct TermGuard;

impl Drop for TermGuard {
    fn drop(&mut self) {
        restore_terminal();
    }
}

fn setup_terminal() -> std::io::Result<(TermGuard, Terminal<CrosstermBackend<Stdout>>)> {
    // The panic hook restores first, so the message lands on a usable screen
    // (and also when panics abort instead of unwinding).
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        restore_terminal();
        hook(info);
    }));
    for sig in [libc::SIGTERM, libc::SIGHUP, libc::SIGINT] {
        // SAFETY: the handler only stores to an atomic, which is
        // async-signal-safe.
        unsafe { libc::signal(sig, on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t) };
    }
    let guard = TermGuard;
    terminal::enable_raw_mode()?;
    execute!(std::io::stdout(), EnterAlternateScreen)?;
    let term = Terminal::new(CrosstermBackend::new(std::io::stdout()))?;
    Ok((guard, term))
}

fn is_quit(k: &KeyEvent) -> bool {
    k.kind == KeyEventKind::Press
        && (matches!(k.code, KeyCode::Char('q') | KeyCode::Char('Q') | KeyCode::Esc)
            || (k.code == KeyCode::Char('c') && k.modifiers.contains(KeyModifiers::CONTROL)))
}

fn fetch(addr: SocketAddr) -> Result<Snapshot, String> {
    let body = http_get(addr, API_PATH).map_err(|e| e.to_string())?;
    parse(&body)
}

use crate::cli::fail;

pub fn main(args: &RunArgs, interval: f64) -> ExitCode {
    let interval = match validate_interval(interval) {
        Ok(d) => d,
        Err(e) => return fail(e),
    };
    let addr = match config::resolve(args) {
        Ok(c) => c.listen,
        Err(e) => return fail(e),
    };
    if !std::io::stdout().is_terminal() {
        return fail("top is interactive and stdout is not a terminal; for scripts use `timewaitd snapshot [--json]`");
    }
    let first = match http_get(addr, API_PATH) {
        Ok(body) => match parse(&body) {
            Ok(s) => s,
            Err(e) => return fail(format!("the daemon at {addr} sent {e}")),
        },
        Err(e) => return fail(format!("no daemon answering at {addr}: {e}")),
    };
    let mut st = State::new(addr, interval, first, Instant::now());

    let (tx, rx) = mpsc::channel::<(Instant, Result<Snapshot, String>)>();
    // Detached: it ends at its next send after the loop is gone, or with the
    // process.
    thread::spawn(move || {
        loop {
            thread::sleep(interval);
            let r = fetch(addr);
            if tx.send((Instant::now(), r)).is_err() {
                return;
            }
        }
    });

    let (guard, mut term) = match setup_terminal() {
        Ok(t) => t,
        Err(e) => {
            restore_terminal();
            return fail(format!("cannot set up the terminal: {e}"));
        }
    };
    let result = run_loop(&mut term, &mut st, &rx);
    drop(term);
    drop(guard);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(format!("terminal: {e}")),
    }
}

fn run_loop(
    term: &mut Terminal<CrosstermBackend<Stdout>>,
    st: &mut State,
    rx: &mpsc::Receiver<(Instant, Result<Snapshot, String>)>,
) -> std::io::Result<()> {
    loop {
        while let Ok((at, r)) = rx.try_recv() {
            st.update(at, r);
        }
        if STOP.load(Ordering::Relaxed) {
            return Ok(());
        }
        let now = Instant::now();
        term.draw(|f| draw(f, st, now))?;
        if event::poll(TICK)? {
            match event::read()? {
                Event::Key(k) if is_quit(&k) => return Ok(()),
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use ratatui::backend::TestBackend;

    use super::*;

    const JSON: &str = r#"{
      "series":[
        {"direction":"outbound","remote":"10.0.0.1","port":443,"time_wait":2,"fin_wait2":1,"connections":5},
        {"direction":"inbound","remote":"10.0.0.2","port":80,"time_wait":9,"fin_wait2":1,"connections":0},
        {"direction":"inbound","remote":"10.0.0.1","port":80,"time_wait":1,"fin_wait2":0,"connections":0},
        {"direction":"outbound","remote":"2001:db8::1","port":443,"time_wait":20,"fin_wait2":0,"connections":0},
        {"direction":"outbound","remote":"10.0.0.9","port":53,"time_wait":0,"fin_wait2":0,"connections":0}],
      "syns":[{"remote":"10.0.0.2","total":4,"rejected":1},{"remote":"10.0.0.7","total":3,"rejected":0}],
      "counters":{"created_inbound":100,"created_outbound":50,"closed":[10,2,0,1,0],"lost":0,
                  "snapshot":0,"snapshot_listeners":0,"substate_changes":0,"segments":[0,0,0,0,0]},
      "lifetimes":[],
      "connect_errors":[{"errno":"EADDRNOTAVAIL","comm":"curl","count":3}],
      "sysctls":{"max_buckets":262144,"local_port_range_size":28232,"overflow":0},
      "estimates":[{"remote":"10.0.0.1","port":443,"seconds_left":42.5,"rate":3.0,"freed_10s":1,"freed_60s":2},
                   {"remote":"2001:db8::1","port":443,"seconds_left":null,"rate":0.0,"freed_10s":0,"freed_60s":20}]}"#;

    fn snap() -> Snapshot {
        parse(JSON).unwrap()
    }

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

    fn screen(w: u16, h: u16, st: &State, now: Instant) -> String {
        let mut t = Terminal::new(TestBackend::new(w, h)).unwrap();
        t.draw(|f| draw(f, st, now)).unwrap();
        let buf = t.backend().buffer();
        (0..h)
            .map(|y| (0..w).map(|x| buf[(x, y)].symbol().to_string()).collect::<String>() + "\n")
            .collect()
    }

    #[test]
    fn screen_shows_everything_at_80x24_and_120x40() {
        let t0 = Instant::now();
        let addr: SocketAddr = "127.0.0.1:19868".parse().unwrap();
        let mut st = State::new(addr, Duration::from_secs(1), snap(), t0);
        let mut next = snap();
        next.counters.created_inbound += 20;
        next.counters.closed[1] += 4;
        st.update(t0 + Duration::from_secs(2), Ok(next));
        for (w, h) in [(80, 24), (120, 40)] {
            let s = screen(w, h, &st, t0 + Duration::from_secs(2));
            for want in [
                "timewaitd top · 127.0.0.1:19868",
                "TIME_WAIT 32",
                "FIN_WAIT2 2",
                "created/s 10 (in 10, out 0.0)",
                "closed/s 2.0 (reused_by_syn 2.0)",
                "local ports 28232",
                "Busiest remotes (4)",
                "Busiest ports (2)",
                "Outbound exhaustion (2)",
                "[2001:db8::1]:443",
                "0.07%",
            ] {
                assert!(s.contains(want), "{w}x{h}: {want:?} missing:\n{s}");
            }
            let line = s.lines().find(|l| l.contains("10.0.0.2 ")).unwrap();
            let cols: Vec<&str> = line.split(|c: char| c == '│' || c.is_whitespace()).filter(|t| !t.is_empty()).collect();
            assert_eq!(cols, ["10.0.0.2", "9", "0", "1", "4", "1", "3"], "{w}x{h}:\n{s}");
        }
        // A failed poll keeps the data and says so.
        st.update(t0 + Duration::from_secs(3), Err("Connection refused (os error 111)".into()));
        let s = screen(80, 24, &st, t0 + Duration::from_secs(4));
        assert!(s.contains("not answering: Connection refused"), "{s}");
        assert!(s.contains("10.0.0.2"), "{s}");
    }

    #[test]
    fn name_column_fits_names_within_the_room_left() {
        // 80 columns: 78 inside the border, 52 for the other columns and gaps.
        assert_eq!(first_col_width(9, "REMOTE", 80, &REMOTE_COLS), 10);
        assert_eq!(first_col_width(18, "REMOTE", 80, &REMOTE_COLS), 18);
        assert_eq!(first_col_width(39, "REMOTE", 80, &REMOTE_COLS), 26);
        assert_eq!(first_col_width(39, "REMOTE", 160, &REMOTE_COLS), 39);
        assert_eq!(first_col_width(0, "DESTINATION", 160, &EXHAUSTION_COLS), 11);
    }

    #[test]
    fn quit_keys() {
        let k = |code, m| KeyEvent::new(code, m);
        assert!(is_quit(&k(KeyCode::Char('q'), KeyModifiers::NONE)));
        assert!(is_quit(&k(KeyCode::Esc, KeyModifiers::NONE)));
        assert!(is_quit(&k(KeyCode::Char('c'), KeyModifiers::CONTROL)));
        assert!(!is_quit(&k(KeyCode::Char('c'), KeyModifiers::NONE)));
    }
}
