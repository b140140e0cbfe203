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
        /// Also measure with an adapter of N synthetic rank-4 edits, in
        /// rounds alternating with the base model, and report the ratio.
        #[arg(long, default_value_t = 0)]
        edits: usize,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Time edits (3 questions, with the locality machinery) and report peak memory.
    Edit(EditBenchArgs),
    /// Time to first token and tokens/s through the daemon's socket vs in this process, 1 and N clients.
    Serve(super::bench_serve::ServeBenchArgs),
}

#[derive(Debug, clap::Args)]
pub struct EditBenchArgs {
    /// Edit method.
    #[arg(long, default_value = "ftm")]
    method: imprint::editor::Method,
    /// FT-M anchor mode (keys, loss, project, both, off).
    #[arg(long)]
    anchors: Option<imprint::editor::AnchorMode>,
    /// Weight of the key-preservation term (`--anchors keys`).
    #[arg(long)]
    anchor_key_weight: Option<f64>,
    /// What that term's shipped anchors are made of (answers, questions).
    #[arg(long)]
    key_anchors: Option<imprint::editor::KeyAnchors>,
    /// Timed edits, each computed from scratch on the base model.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// A model name or GGUF path.
    #[arg(long)]
    model: Option<String>,
    /// Layer to edit (default: about 2/3 of the depth).
    #[arg(long)]
    layer: Option<usize>,
    /// Steps of the paper's LoRA baseline actually run (its time is
    /// reported per step and scaled to its 70 steps); 0 skips it.
    #[arg(long, default_value_t = 5)]
    baseline_steps: usize,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
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
            if edits == 0 {
                let report = measure(app, &mut engine, prompt, gen, runs)?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&report)?);
                } else {
                    print_table(&[&report]);
                }
                return Ok(ExitCode::SUCCESS);
            }
            let summary = engine.summary().clone();
            let layer = (summary.n_layer as usize * 2)
                .div_ceil(3)
                .min(summary.n_layer as usize - 1);
            let n_ff = imprint::editor::model::LlamaModel::n_ff_of(&engine.options().model_path)?;
            let synthetic = imprint::editor::adapter::synthetic_edits(
                edits,
                layer,
                n_ff,
                summary.n_embd as usize,
                1,
            );
            let refs: Vec<_> = synthetic.iter().collect();
            let adapter_dir = tempfile::tempdir()?;
            let path = adapter_dir.path().join("bench.gguf");
            imprint::editor::adapter::write_adapter(&refs, &summary.architecture, "bench", &path)?;
            let bar = app.progress(runs as u64, "bench decode (without and with the adapter)");
            let overhead =
                imprint::bench::adapter_overhead(&mut engine, &path, prompt, gen, runs, |done| {
                    bar.set_position(done as u64)
                })?;
            bar.finish_and_clear();
            if json {
                println!("{}", serde_json::to_string_pretty(&overhead)?);
            } else {
                print_table(&[&overhead.base, &overhead.with_adapter]);
                let (g, p) = (&overhead.generation_ratio, &overhead.prompt_ratio);
                println!(
                    "with the adapter, per round: generation at {:.3}x (min {:.3}, max {:.3}), prompt processing at {:.3}x (min {:.3}, max {:.3}) the base speed (medians of {} alternating rounds)",
                    g.median, g.min, g.max, p.median, p.min, p.max, runs.max(1)
                );
            }
        }
        BenchCommand::Edit(args) => bench_edit(app, args)?,
        BenchCommand::Serve(args) => return super::bench_serve::run(app, args),
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
    let bar = app.progress(runs as u64, "bench decode");
    let report = imprint::bench::decode(engine, prompt, gen, runs.max(1), |done| {
        bar.set_position(done as u64)
    })?;
    bar.finish_and_clear();
    Ok(report)
}

fn print_table(reports: &[&imprint::bench::DecodeReport]) {
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
}

/// The request timed by `bench edit`: one preference, three cluster questions.
fn demo_request() -> imprint::editor::EditRequest {
    imprint::editor::EditRequest {
        attribute: "hobby".into(),
        target: "Dancing at clubs".into(),
        questions: vec![
            "What's my hobby?".into(),
            "What's my favorite pastime?".into(),
            "What's my main interest these days?".into(),
        ],
    }
}

fn bench_edit(app: &App, args: EditBenchArgs) -> Result<()> {
    let EditBenchArgs {
        method,
        anchors,
        anchor_key_weight,
        key_anchors,
        runs,
        model,
        layer,
        baseline_steps,
        json,
    } = args;
    let model = model.as_deref();
    use imprint::editor::EditorSettings;
    let mut engine = super::load_engine(app, model, false)?;
    let config = &app.config.config.editor;
    let defaults = EditorSettings {
        anchors: config.anchors,
        anchor_key_weight: config.anchor_key_weight,
        key_anchors: config.key_anchors,
        nullspace_energy: config.nullspace_energy,
        retry_nullspace_energy: config.retry_nullspace_energy,
        ..EditorSettings::default()
    };
    let settings = EditorSettings {
        method,
        anchors: anchors.unwrap_or(defaults.anchors),
        anchor_key_weight: anchor_key_weight.unwrap_or(defaults.anchor_key_weight),
        key_anchors: key_anchors.unwrap_or(defaults.key_anchors),
        layer,
        retry: false,
        system_prompt: app.config.config.generation.system_prompt.clone(),
        ..defaults
    };
    let (_, mut editor) = super::load_editor(app, &engine, settings)?;
    let request = demo_request();
    // The first edit also builds the null-space cache; it is not timed.
    let bar = app.progress(
        runs as u64 + 1,
        "bench edit (the first, untimed run builds caches)",
    );
    editor.compute(&mut engine, &request, &[], |_| {})?;
    bar.inc(1);
    let mut train = Vec::new();
    let mut verify = Vec::new();
    let mut total = Vec::new();
    let mut outcomes = Vec::new();
    for _ in 0..runs.max(1) {
        let started = std::time::Instant::now();
        let outcome = editor.compute(&mut engine, &request, &[], |_| {})?;
        total.push(started.elapsed().as_secs_f64());
        train.push(outcome.edit.metrics.train_seconds);
        verify.push(outcome.edit.metrics.verify_seconds);
        outcomes.push(outcome);
        bar.inc(1);
    }
    bar.finish_and_clear();
    let baseline_step = if baseline_steps > 0 {
        Some(editor.time_lora_baseline(&engine, &request, baseline_steps)?)
    } else {
        None
    };
    let ftm_median = imprint::bench::Summary::of(&train).median;
    let report = serde_json::json!({
        "model": engine.options().model_path.display().to_string(),
        "method": method,
        "anchors": editor.settings.anchors,
        "threads": engine.options().resolved_threads(),
        "layer": outcomes.first().map(|o| o.edit.layer),
        "runs": runs,
        "train_seconds": imprint::bench::Summary::of(&train),
        "verify_seconds": imprint::bench::Summary::of(&verify),
        "total_seconds": imprint::bench::Summary::of(&total),
        "steps": outcomes.iter().map(|o| o.edit.metrics.steps).collect::<Vec<_>>(),
        "efficacy": outcomes.iter().map(|o| format!("{}/{}", o.edit.metrics.efficacy_hits, o.edit.metrics.efficacy_total)).collect::<Vec<_>>(),
        "locality": outcomes.iter().map(|o| format!("{}/{}", o.edit.metrics.locality_kept, o.edit.metrics.locality_total)).collect::<Vec<_>>(),
        "probe_token_agreement": outcomes.iter().map(|o| o.edit.metrics.token_locality()).collect::<Vec<_>>(),
        "accepted": outcomes.iter().filter(|o| o.accepted).count(),
        "peak_rss_mb": imprint::bench::peak_rss_bytes().map(|b| b as f64 / 1e6),
        "lora_baseline": baseline_step.map(|s| serde_json::json!({
            "steps_run": baseline_steps,
            "seconds_per_step": s,
            "seconds_for_70_steps_extrapolated": s * 70.0,
            "speedup_of_training": s * 70.0 / ftm_median,
        })),
    });
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        let t = imprint::bench::Summary::of(&train);
        let v = imprint::bench::Summary::of(&verify);
        let all = imprint::bench::Summary::of(&total);
        println!(
            "model: {}  method: {}  anchors: {}  threads: {}  layer: {}",
            report["model"],
            report["method"],
            report["anchors"],
            report["threads"],
            report["layer"]
        );
        println!(
            "training      median {:.2}s  min {:.2}s  max {:.2}s",
            t.median, t.min, t.max
        );
        println!(
            "verification  median {:.2}s  min {:.2}s  max {:.2}s",
            v.median, v.min, v.max
        );
        println!(
            "whole edit    median {:.2}s  min {:.2}s  max {:.2}s",
            all.median, all.min, all.max
        );
        println!(
            "steps {}  efficacy {}  locality {} (identical answers; token agreement {})  accepted {}/{}",
            report["steps"],
            report["efficacy"],
            report["locality"],
            report["probe_token_agreement"],
            report["accepted"],
            runs
        );
        if let Some(s) = baseline_step {
            println!(
                "LoRA baseline (rank 8, q/v, all layers): {s:.2}s/step over {baseline_steps} steps → {:.1}s for its 70 steps (extrapolated); this method's training is {:.1}x faster",
                s * 70.0,
                s * 70.0 / ftm_median
            );
        }
        match imprint::bench::peak_rss_bytes() {
            Some(b) => println!(
                "peak RSS of this process: {:.0} MB (engine + editor)",
                b as f64 / 1e6
            ),
            None => println!("peak RSS: not available on this platform"),
        }
    }
    Ok(())
}
