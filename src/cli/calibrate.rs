use std::process::ExitCode;

use anyhow::Result;
use clap::Args;

use imprint::editor::calibrate::{self, Calibration, Candidate};
use imprint::editor::{EditorSettings, Method};

use super::App;

#[derive(Debug, Args)]
pub struct CalibrateArgs {
    /// Edit method to calibrate.
    #[arg(long, default_value = "ftm")]
    method: Method,
    /// Layers to try (default: the method's default layer and ±4).
    #[arg(long, value_delimiter = ',')]
    layers: Vec<usize>,
    /// Learning rates to try (default: 0.02,0.05 for ftm; 1.0,2.0 for rome).
    #[arg(long, value_delimiter = ',')]
    lrs: Vec<f64>,
    /// Calibration preferences to edit per setting (at most 6).
    #[arg(long, default_value_t = 3)]
    items: usize,
    /// A model name or GGUF path.
    #[arg(long)]
    model: Option<String>,
}

pub fn run(app: &App, args: CalibrateArgs) -> Result<ExitCode> {
    let mut engine = super::load_engine(app, args.model.as_deref(), false)?;
    let settings = EditorSettings {
        method: args.method,
        retry: false,
        system_prompt: app.config.config.generation.system_prompt.clone(),
        ..EditorSettings::default()
    };
    let (sha, mut editor) = super::load_editor(app, &engine, settings)?;
    let n_layer = editor.model().config.n_layer;
    let layers = if args.layers.is_empty() {
        let d = editor.default_layer_for(args.method);
        let mut l = vec![d.saturating_sub(4).max(1), d, (d + 4).min(n_layer - 1)];
        l.dedup();
        l
    } else {
        args.layers.clone()
    };
    if let Some(bad) = layers.iter().find(|&&l| l >= n_layer) {
        anyhow::bail!(
            "layer {bad} does not exist; the model has layers 0..{}",
            n_layer - 1
        );
    }
    let lrs = match (args.lrs.is_empty(), args.method) {
        (false, _) => args.lrs.clone(),
        (true, Method::Ftm) => vec![0.02, 0.05],
        (true, Method::Rome) => vec![1.0, 2.0],
    };
    let candidates: Vec<Candidate> = layers
        .iter()
        .flat_map(|&layer| {
            lrs.iter().map(move |&learning_rate| Candidate {
                layer,
                learning_rate,
            })
        })
        .collect();
    let items = calibrate::calibration_set(args.items.max(1));
    println!(
        "Calibrating {} settings × {} preferences ({} edits; about half a minute each on two cores).",
        candidates.len(),
        items.len(),
        candidates.len() * items.len()
    );
    let bar = app.progress((candidates.len() * items.len()) as u64, "calibrate");
    let scratch = app.paths.cache_dir.join("adapters");
    imprint::paths::create_private_dir(&scratch)?;
    let (scores, best) = calibrate::run(
        &mut editor,
        &mut engine,
        &items,
        &candidates,
        &scratch,
        |done, _| bar.set_position(done as u64),
    )?;
    bar.finish_and_clear();
    let min = editor.settings.min_locality;
    println!("| layer | lr | trained | held out | token locality | accepted | median training |");
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    for s in &scores {
        println!(
            "| {} | {} | {}/{} | {}/{} | {:.1} % | {}/{} | {:.1} s |{}",
            s.candidate.layer,
            s.candidate.learning_rate,
            s.train_hits,
            s.train_total,
            s.held_out_hits,
            s.held_out_total,
            s.token_locality * 100.0,
            s.accepted,
            items.len(),
            s.median_train_seconds,
            if s.candidate == best { " ← best" } else { "" }
        );
    }
    let best_score = scores
        .iter()
        .find(|s| s.candidate == best)
        .map_or(0.0, |s| s.score(min));
    if best_score == 0.0 {
        println!(
            "No setting taught the target while keeping {:.0} % of probe tokens; nothing stored.",
            min * 100.0
        );
        return Ok(ExitCode::from(2));
    }
    let calibration = Calibration {
        model_sha256: sha,
        method: args.method,
        best,
        scores,
        created: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    };
    let path = calibration.save(&app.paths.data_dir)?;
    println!(
        "Stored layer {} and learning rate {} as this model's defaults for `imprint edit --method {}` ({}).",
        best.layer,
        best.learning_rate,
        match args.method {
            Method::Ftm => "ftm",
            Method::Rome => "rome",
        },
        path.display()
    );
    Ok(ExitCode::SUCCESS)
}
