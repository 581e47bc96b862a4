//! timewaitd: parses the command line and dispatches.

mod cli;
mod collect;
mod http;
mod kernel;
mod model;
mod nat;
mod run;

use std::process::ExitCode;

use clap::Parser as _;

fn main() -> ExitCode {
    let cli = match cli::args::Cli::try_parse() {
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
        Some(cli::args::Command::Check { run }) => cli::check::main(&run),
        Some(cli::args::Command::Snapshot { json, run }) => cli::snapshot::main(&run, json),
        Some(cli::args::Command::Top { interval, run }) => cli::top::main(&run, interval),
        Some(cli::args::Command::Run(args)) => run::main(&args),
        Some(cli::args::Command::GenerateAssets { dir }) => match cli::args::generate_assets(&dir) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => cli::fail(format!("cannot write into {}: {e}", dir.display())),
        },
        None => run::main(&cli.run),
    }
}
