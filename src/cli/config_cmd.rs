use std::process::ExitCode;

use anyhow::Result;
use clap::Subcommand;

use super::App;

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Print every setting, its value and where the value came from.
    Show,
    /// Print the path of your config file (it may not exist yet).
    Path,
}

pub fn run(ctx: &App, cmd: ConfigCommand) -> Result<ExitCode> {
    match cmd {
        ConfigCommand::Show => {
            println!("# config file: {}", ctx.paths.config_file().display());
            println!("# data dir:    {}", ctx.paths.data_dir.display());
            println!("# cache dir:   {}\n", ctx.paths.cache_dir.display());
            print!("{}", ctx.config.describe());
        }
        ConfigCommand::Path => println!("{}", ctx.paths.config_file().display()),
    }
    Ok(ExitCode::SUCCESS)
}
