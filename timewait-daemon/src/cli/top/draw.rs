//! `top`'s screen: the header and the three tables, drawn with ratatui from the last two polls.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use ratatui::{
    Frame,
    layout::{Constraint, Layout, Rect},
    style::{Color, Modifier, Style, Stylize as _},
    text::{Line, Span},
    widgets::{Block, Cell, Paragraph, Row, Table, Wrap},
};

use super::rows::{
    ExhaustionRow, Rates, endpoint, exhaustion_rows, fmt_age, fmt_interval, fmt_left, fmt_opt, fmt_rate, fmt_ratio, port_rows,
    rates, remote_rows,
};
use crate::{cli::api::Snapshot, collect::view::REASONS};

fn left_style(left: Option<Option<f64>>) -> Style {
    match left.flatten() {
        Some(s) if s < 300.0 => Style::new().fg(Color::Red).add_modifier(Modifier::BOLD),
        Some(s) if s < 3600.0 => Style::new().fg(Color::Yellow),
        _ => Style::new(),
    }
}

fn ratio_style(r: Option<f64>) -> Style {
    match r {
        Some(r) if r >= 0.8 => Style::new().fg(Color::Red).add_modifier(Modifier::BOLD),
        Some(r) if r >= 0.5 => Style::new().fg(Color::Yellow),
        _ => Style::new(),
    }
}

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
    pub fn new(addr: SocketAddr, interval: Duration, first: Snapshot, at: Instant) -> Self {
        Self { addr, interval, current: Sample { at, snap: first }, previous: None, error: None }
    }

    pub fn update(&mut self, at: Instant, result: Result<Snapshot, String>) {
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

const NAT_COLS: [u16; 5] = [5, 7, 9, 6, 6];

/// The NAT side, where the daemon watches a balancer: ports held per (NAT
/// address, destination), busiest first.
fn nat_table(nat: &crate::cli::api::NatJ, width: u16) -> Table<'static> {
    let mut rows: Vec<&crate::cli::api::NatSeriesJ> = nat.series.iter().collect();
    rows.sort_by(|a, b| b.in_use.cmp(&a.in_use).then_with(|| a.remote.cmp(&b.remote)));
    let n = rows.len();
    let name = |r: &crate::cli::api::NatSeriesJ| format!("{} -> {}:{}", r.nat_address, r.remote, r.port);
    let longest = rows.iter().map(|r| name(r).chars().count()).max().unwrap_or(0);
    let w = first_col_width(longest, "NAT ADDRESS -> DESTINATION", width, &NAT_COLS);
    let body: Vec<Row<'static>> = rows
        .into_iter()
        .map(|r| {
            let left = r.seconds.as_ref().map(serde_json::Value::as_f64);
            Row::new(vec![
                Cell::from(name(r)),
                Cell::from(r.protocol.clone()),
                num(r.in_use),
                num(r.time_wait),
                Cell::from(Line::from(fmt_ratio(r.ratio)).right_aligned().style(ratio_style(r.ratio))),
                Cell::from(Line::from(fmt_left(left)).right_aligned().style(left_style(left))),
            ])
        })
        .collect();
    Table::new(body, std::iter::once(w).chain(NAT_COLS).map(Constraint::Length))
        .header(head(&["NAT ADDRESS -> DESTINATION", "PROTO", "IN USE", "TIME_WAIT", "RATIO", "LEFT"], 2))
        .block(titled(format!(" NAT source ports ({n}) · conntrack ")))
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
    match s.nat.as_ref().filter(|n| !n.series.is_empty()) {
        Some(nat) => {
            let [e, n] = Layout::vertical([Constraint::Fill(1), Constraint::Fill(1)]).areas(exhaustion);
            f.render_widget(exhaustion_table(s, e.width), e);
            f.render_widget(nat_table(nat, n.width), n);
        }
        None => f.render_widget(exhaustion_table(s, exhaustion.width), exhaustion),
    }
}

#[cfg(test)]
mod tests {
    use ratatui::{Terminal, backend::TestBackend};

    use super::*;
    use crate::cli::api::fixture::snap;

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
    fn nat_side_shows_where_the_daemon_watches_a_balancer() {
        let t0 = Instant::now();
        let addr: SocketAddr = "127.0.0.1:19868".parse().unwrap();
        let mut snapshot = snap();
        snapshot.nat = Some(crate::cli::api::NatJ {
            state: "watched".into(),
            unavailable: None,
            series: vec![crate::cli::api::NatSeriesJ {
                nat_address: "10.98.3.1".into(),
                remote: "10.98.3.2".into(),
                port: "5000".into(),
                protocol: "udp".into(),
                in_use: 8,
                time_wait: 0,
                ratio: Some(1.0),
                seconds: Some(serde_json::json!(0.0)),
            }],
        });
        let st = State::new(addr, Duration::from_secs(1), snapshot, t0);
        let s = screen(120, 40, &st, t0);
        assert!(s.contains("NAT source ports (1)"), "{s}");
        let line = s.lines().find(|l| l.contains("10.98.3.1 -> 10.98.3.2:5000")).unwrap_or_else(|| panic!("{s}"));
        assert!(line.contains("udp") && line.contains(" 8 ") && line.contains("100.0%") && line.contains(" 0s "), "{line}");
        assert!(s.contains("Outbound exhaustion (2)"), "{s}");
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
}
