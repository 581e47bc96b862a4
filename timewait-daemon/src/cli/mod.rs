//! The command-line room: arguments and configuration, and the tools `check`, `snapshot` and `top`.
//!
//! `args` defines every flag (and so `--help`, the man page, the
//! completions); `config` resolves flag > file > default for every command,
//! the daemon's (`run.rs`) included. `api` is the client side of the daemon's
//! JSON API, which `snapshot` and `top` read.

pub mod api;
pub mod args;
pub mod check;
pub mod config;
pub mod snapshot;
pub mod top;

use std::{io::Write as _, process::ExitCode};

/// Prints one line and returns exit code 2: the contract for bad input and
/// for what stops a command from starting.
pub fn fail(msg: impl std::fmt::Display) -> std::process::ExitCode {
    eprintln!("timewaitd: {msg}");
    std::process::ExitCode::from(2)
}

/// Writes to stdout; a closed pipe (`| head`) ends quietly, not in a panic.
pub fn print_out(text: &str) -> ExitCode {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => fail(format!("writing to stdout: {e}")),
    }
}
