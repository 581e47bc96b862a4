//! timewaitd: parses the command line and dispatches.

mod aggregate;
mod check;
mod cli;
mod collector;
mod diag;
mod config;
mod kernel;
mod loader;
mod metrics;
mod run;
mod server;
mod snapshot;
mod top;
mod web;

use std::process::ExitCode;

use clap::Parser as _;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    match cli.command {
        Some(cli::Command::Check) => check::main(),
        Some(cli::Command::Snapshot { json, run }) => snapshot::main(&run, json),
        Some(cli::Command::Top { interval, run }) => top::main(&run, interval),
        Some(cli::Command::Run(args)) => run::main(&args),
        None => run::main(&cli.run),
    }
}
