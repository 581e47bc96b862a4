//! timewaitd: parses the command line and dispatches.

mod check;
mod cli;
mod collect;
mod config;
mod http;
mod kernel;
mod model;
mod run;
mod snapshot;

use std::process::ExitCode;

use clap::Parser as _;

fn main() -> ExitCode {
    let cli = match cli::Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            // --help, --version: not an error.
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            // One line, as every other bad input: clap's first line, without
            // its usage block.
            let text = e.render().to_string();
            let first = text.lines().next().unwrap_or("invalid arguments");
            eprintln!("timewaitd: {} (see timewaitd --help)", first.trim_start_matches("error: "));
            return ExitCode::from(2);
        }
    };
    match cli.command {
        Some(cli::Command::Check { run }) => check::main(&run),
        Some(cli::Command::Snapshot { json, run }) => snapshot::main(&run, json),
        Some(cli::Command::Top { interval, run }) => cli::top::main(&run, interval),
        Some(cli::Command::Run(args)) => run::main(&args),
        Some(cli::Command::GenerateAssets { dir }) => match cli::generate_assets(&dir) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => cli::fail(format!("cannot write into {}: {e}", dir.display())),
        },
        None => run::main(&cli.run),
    }
}
