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
        /// Also measure with an adapter of N synthetic rank-4 edits, and report the ratio.
        #[arg(long, default_value_t = 0)]
        edits: usize,
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
            edits,
            json,
        } => {
            let mut engine = super::load_engine(app, model.as_deref(), false)?;
            let mut reports = vec![measure(app, &mut engine, prompt, gen, runs)?];
            let _adapter_dir;
            if edits > 0 {
                let summary = engine.summary().clone();
                let layer = (summary.n_layer as usize * 2)
                    .div_ceil(3)
                    .min(summary.n_layer as usize - 1);
                let n_ff =
                    imprint::editor::model::LlamaModel::n_ff_of(&engine.options().model_path)?;
                let synthetic = imprint::editor::adapter::synthetic_edits(
                    edits,
                    layer,
                    n_ff,
                    summary.n_embd as usize,
                    1,
                );
                let refs: Vec<_> = synthetic.iter().collect();
                _adapter_dir = tempfile::tempdir()?;
                let path = _adapter_dir.path().join("bench.gguf");
                imprint::editor::adapter::write_adapter(
                    &refs,
                    &summary.architecture,
                    "bench",
                    &path,
                )?;
                engine.set_adapter(Some(&path))?;
                reports.push(measure(app, &mut engine, prompt, gen, runs)?);
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&reports)?);
            } else {
                print_table(&reports);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn measure(
    app: &App,
    engine: &mut imprint::engine::Engine,
    prompt: usize,
    gen: usize,
    runs: usize,
) -> Result<imprint::bench::DecodeReport> {
    let bar = if app.interactive {
        indicatif::ProgressBar::new(runs as u64).with_message("bench decode")
    } else {
        indicatif::ProgressBar::hidden()
    };
    let report = imprint::bench::decode(engine, prompt, gen, runs.max(1), |done| {
        bar.set_position(done as u64)
    })?;
    bar.finish_and_clear();
    Ok(report)
}

fn print_table(reports: &[imprint::bench::DecodeReport]) {
    for report in reports {
        {
            println!("model:    {}", report.model);
            println!(
                "threads:  {}   gpu layers: {}   adapter: {}",
                report.threads,
                report.n_gpu_layers,
                report.adapter.as_deref().unwrap_or("none")
            );
            println!(
                "{:<10} {:>10} {:>10} {:>10}",
                "test", "median", "min", "max"
            );
            for (name, s) in [
                (
                    format!("pp{}", report.n_prompt),
                    &report.prompt_tokens_per_s,
                ),
                (
                    format!("tg{}", report.n_gen),
                    &report.generation_tokens_per_s,
                ),
            ] {
                println!(
                    "{name:<10} {:>10.1} {:>10.1} {:>10.1}   tokens/s",
                    s.median, s.min, s.max
                );
            }
        }
        println!();
    }
    if let [base, edited] = reports {
        println!(
            "with the adapter: generation at {:.3}x, prompt processing at {:.3}x the base speed (medians)",
            edited.generation_tokens_per_s.median / base.generation_tokens_per_s.median,
            edited.prompt_tokens_per_s.median / base.prompt_tokens_per_s.median
        );
    }
}
