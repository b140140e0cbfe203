use std::process::ExitCode;

use anyhow::Result;
use clap::Subcommand;

use super::App;

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Prompt-processing and generation tokens/s, comparable with llama-bench.
    Decode {
        /// Timed runs (after one warm-up run).
        #[arg(long, default_value_t = 5)]
        runs: usize,
        /// Prompt tokens per run (llama-bench -p).
        #[arg(long, default_value_t = 512)]
        prompt: usize,
        /// Generated tokens per run (llama-bench -n).
        #[arg(long, default_value_t = 128)]
        gen: usize,
        /// A model name or GGUF path.
        #[arg(long)]
        model: Option<String>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

pub fn run(app: &App, cmd: BenchCommand) -> Result<ExitCode> {
    match cmd {
        BenchCommand::Decode {
            runs,
            prompt,
            gen,
            model,
            json,
        } => {
            let mut engine = super::load_engine(app, model.as_deref())?;
            let bar = if app.interactive {
                indicatif::ProgressBar::new(runs as u64).with_message("bench decode")
            } else {
                indicatif::ProgressBar::hidden()
            };
            let report = imprint::bench::decode(&mut engine, prompt, gen, runs.max(1), |done| {
                bar.set_position(done as u64)
            })?;
            bar.finish_and_clear();
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                println!("model:    {}", report.model);
                println!("threads:  {}   gpu layers: {}   adapter: {}", report.threads, report.n_gpu_layers, report.adapter.as_deref().unwrap_or("none"));
                println!("{:<10} {:>10} {:>10} {:>10}", "test", "median", "min", "max");
                for (name, s) in [
                    (format!("pp{}", report.n_prompt), &report.prompt_tokens_per_s),
                    (format!("tg{}", report.n_gen), &report.generation_tokens_per_s),
                ] {
                    println!("{name:<10} {:>10.1} {:>10.1} {:>10.1}   tokens/s", s.median, s.min, s.max);
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
