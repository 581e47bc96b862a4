//! `timewaitd top`: live terminal view read from a running daemon's API.

use std::process::ExitCode;

use crate::cli::RunArgs;

pub fn main(_args: &RunArgs, _interval: f64) -> ExitCode {
    eprintln!("timewaitd: top is not implemented yet");
    ExitCode::from(2)
}
