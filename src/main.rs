//! The `imprint` command line. Each subcommand lives in `src/cli/`; this file
//! parses arguments, sets up logging and turns errors into one clear message
//! and a non-zero exit code.

mod cli;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let args = cli::Cli::parse();
    match cli::run(args) {
        Ok(code) => code,
        Err(err) => {
            // `{:#}` prints the whole context chain on one line.
            eprintln!("imprint: {err:#}");
            ExitCode::from(1)
        }
    }
}
