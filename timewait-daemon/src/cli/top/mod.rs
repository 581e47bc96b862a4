//! `timewaitd top`: live terminal view read from a running daemon's API.
//!
//! A poller thread fetches `GET /api/v1/snapshot` every `--interval` seconds
//! (with `api::http_get`, which closes with an RST, so watching leaves no
//! TIME_WAIT behind in the namespace being watched) and hands each result to
//! the UI loop, which draws with ratatui on crossterm and reads keys. Rates
//! are the difference between two successful polls. Everything between the
//! JSON and the screen (rows, sorting, rates, formatting: `rows`; the screen:
//! `draw`, which adds the NAT side where the daemon watches a balancer) is pure and unit-tested there; `terminal` restores the terminal on
//! quit, on error, on a signal and on panic.

mod draw;
pub mod rows;
mod terminal;

use std::{
    io::{IsTerminal as _, Stdout},
    net::SocketAddr,
    process::ExitCode,
    sync::{atomic::Ordering, mpsc},
    thread,
    time::{Duration, Instant},
};

use ratatui::{
    Terminal,
    backend::CrosstermBackend,
    crossterm::event::{self, Event},
};

use draw::{State, draw};
use rows::validate_interval;
use terminal::{STOP, is_quit, restore_terminal, setup_terminal};

use crate::cli::{
    api::{API_PATH, Snapshot, http_get, parse},
    args::RunArgs,
    config, fail,
};

/// Longest wait for a key before the screen is redrawn ("updated Ns ago").
const TICK: Duration = Duration::from_millis(250);

fn fetch(addr: SocketAddr) -> Result<Snapshot, String> {
    let body = http_get(addr, API_PATH).map_err(|e| e.to_string())?;
    parse(&body)
}

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
