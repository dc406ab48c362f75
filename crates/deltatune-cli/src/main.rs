//! The `deltatune` command: parse flags, resolve them into library values, call the library, and
//! turn errors into a message and a non-zero exit code. No tensor logic lives here.

mod args;
mod commands;

use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = args::Cli::parse();
    if let Err(e) = commands::setup_threads(cli.threads) {
        eprintln!("error: {e:#}");
        return ExitCode::from(2);
    }
    match commands::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
