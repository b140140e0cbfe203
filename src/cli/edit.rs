use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};

use imprint::editor::store::{rebuild_adapter, EditStore};
use imprint::editor::{AnchorMode, EditRequest, EditorSettings, Method};

use super::App;

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct EditArgs {
    #[command(subcommand)]
    command: Option<EditCommand>,
    #[command(flatten)]
    new: NewEdit,
}

#[derive(Debug, Subcommand)]
enum EditCommand {
    /// List the edits (active, then rejected) for the current model.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Remove an edit and rebuild the adapter without it.
    Remove { id: String },
}

#[derive(Debug, Args)]
struct NewEdit {
    /// What the preference is about, e.g. "hobby".
    #[arg(long)]
    attribute: Option<String>,
    /// The answer to teach, e.g. "Dancing at clubs".
    #[arg(long)]
    target: Option<String>,
    /// A question the target answers (repeat for several; more questions generalize better).
    #[arg(long = "question")]
    questions: Vec<String>,
    /// Edit method.
    #[arg(long, default_value = "ftm")]
    method: Method,
    /// LoRA rank (default 4).
    #[arg(long)]
    rank: Option<usize>,
    /// Layer whose MLP down-projection is edited (default: `imprint calibrate`'s
    /// choice for this model, else about 2/3 of the depth for ftm, 1/6 for rome).
    #[arg(long)]
    layer: Option<usize>,
    /// Maximum optimisation steps (default 40 for ftm, 25 for rome).
    #[arg(long)]
    steps: Option<usize>,
    /// Adam learning rate (default 0.05 for ftm, 0.5 for rome's δ).
    #[arg(long)]
    lr: Option<f64>,
    /// Weight of the anchor loss (locality) against the target loss (default 1).
    #[arg(long)]
    anchor_weight: Option<f64>,
    /// Weight of the ‖ΔW‖² penalty: smaller edits, better locality (default 0.01).
    #[arg(long)]
    l2: Option<f64>,
    /// Share of the unrelated probes' answer tokens that must keep their
    /// argmax (teacher-forced on the answers before the edit; default 0.9).
    #[arg(long)]
    min_locality: Option<f64>,
    /// Stop training once the mean target loss is below this (default 0.2).
    #[arg(long)]
    stop_loss: Option<f32>,
    /// Do not retry with stronger settings when the gate refuses the edit.
    #[arg(long)]
    no_retry: bool,
    /// Skip the null-space projection (worse locality; for experiments).
    #[arg(long)]
    no_nullspace: bool,
    /// How anchor questions keep their answers: `loss` (a cross-entropy
    /// term; the default), `project` (their keys are removed from the edit's
    /// input side: about 3× faster, but larger perplexity changes), `both`,
    /// or `off`.
    #[arg(long)]
    anchors: Option<AnchorMode>,
    /// A model name or GGUF path.
    #[arg(long)]
    model: Option<String>,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(app: &App, args: EditArgs) -> Result<ExitCode> {
    let store = EditStore::new(&app.paths.data_dir);
    match args.command {
        Some(EditCommand::List { json }) => {
            let edits = store.list()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&edits)?);
                return Ok(ExitCode::SUCCESS);
            }
            if edits.is_empty() {
                println!("No edits yet. Teach one with: imprint edit --attribute hobby --target \"Dancing at clubs\" --question \"What's my hobby?\"");
            }
            for e in &edits {
                let status = if e.active { "active  " } else { "rejected" };
                println!(
                    "{}  {status}  {:<14} → {:<28} layer {:>2}  efficacy {}/{}  locality {}/{}  {:.1}s",
                    e.id,
                    e.request.attribute,
                    e.request.target,
                    e.layer,
                    e.metrics.efficacy_hits,
                    e.metrics.efficacy_total,
                    e.metrics.locality_kept,
                    e.metrics.locality_total,
                    e.metrics.train_seconds
                );
                if let Some(reason) = &e.rejection {
                    println!("          rejected: {reason}");
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Some(EditCommand::Remove { id }) => {
            let removed = store.remove(&id)?;
            rebuild_adapter(&store, &app.paths.cache_dir, &removed.model_sha256, "llama")?;
            println!(
                "Removed edit {id} ({} → {}).",
                removed.request.attribute, removed.request.target
            );
            Ok(ExitCode::SUCCESS)
        }
        None => new_edit(app, &store, args.new),
    }
}

fn new_edit(app: &App, store: &EditStore, args: NewEdit) -> Result<ExitCode> {
    let attribute = args.attribute.context(
        "give --attribute, --target and at least one --question (see `imprint edit --help`)",
    )?;
    let target = args.target.context("give --target: the answer to teach")?;
    let request = EditRequest {
        attribute,
        target,
        questions: args.questions,
    };
    request.validate()?;

    let mut engine = super::load_engine(app, args.model.as_deref(), false)?;
    // Unset flags keep `imprint calibrate`'s choice for this model, else the
    // editor's defaults (EditorSettings::default).
    let defaults = EditorSettings::default();
    let sha = imprint::models::fingerprint(&app.paths, &engine.options().model_path)?;
    let calibrated =
        imprint::editor::calibrate::Calibration::load(&app.paths.data_dir, &sha, args.method)?
            .map(|c| c.best);
    let settings = EditorSettings {
        method: args.method,
        layer: args.layer.or(calibrated.map(|c| c.layer)),
        rank: args.rank.unwrap_or(defaults.rank),
        max_steps: args.steps.unwrap_or(defaults.max_steps),
        learning_rate: args
            .lr
            .or(calibrated.map(|c| c.learning_rate))
            .unwrap_or(defaults.learning_rate),
        rome: imprint::editor::rome::RomeSettings {
            steps: args.steps.unwrap_or(defaults.rome.steps),
            learning_rate: args
                .lr
                .or(calibrated.map(|c| c.learning_rate))
                .unwrap_or(defaults.rome.learning_rate),
            ..defaults.rome.clone()
        },
        anchor_weight: args.anchor_weight.unwrap_or(defaults.anchor_weight),
        stop_loss: args.stop_loss.unwrap_or(defaults.stop_loss),
        l2: args.l2.unwrap_or(defaults.l2),
        min_locality: args.min_locality.unwrap_or(defaults.min_locality),
        use_nullspace: !args.no_nullspace,
        anchors: args.anchors.unwrap_or(defaults.anchors),
        retry: !args.no_retry,
        system_prompt: app.config.config.generation.system_prompt.clone(),
        ..defaults
    };
    let started = std::time::Instant::now();
    let (sha, mut editor) = super::load_editor(app, &engine, settings)?;
    let active = store.active_for(&sha)?;
    let spinner = app.spinner("preparing the edit");
    let outcome = editor.compute(&mut engine, &request, &active, |stage| {
        spinner.set_message(stage.to_string())
    })?;
    spinner.finish_and_clear();
    store.save(&outcome.edit)?;
    if outcome.accepted {
        rebuild_adapter(store, &app.paths.cache_dir, &sha, "llama")?;
    }
    let total = started.elapsed().as_secs_f64();
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "id": outcome.edit.id,
                "accepted": outcome.accepted,
                "reason": outcome.reason,
                "attempts": outcome.attempts,
                "layer": outcome.edit.layer,
                "metrics": outcome.edit.metrics,
                "total_seconds": total,
            })
        );
    } else {
        let m = &outcome.edit.metrics;
        println!(
            "{} edit {} ({} → {}) at layer {}",
            if outcome.accepted {
                "Accepted"
            } else {
                "Rejected"
            },
            outcome.edit.id,
            request.attribute,
            request.target,
            outcome.edit.layer
        );
        println!(
            "  efficacy: {}/{} questions answer with the target",
            m.efficacy_hits, m.efficacy_total
        );
        for (q, a) in request.questions.iter().zip(&m.answers) {
            println!("    {q} → {}", a.trim());
        }
        println!(
            "  locality: {}/{} unrelated answers unchanged word for word, {:.1}% of their tokens",
            m.locality_kept,
            m.locality_total,
            m.token_locality() * 100.0
        );
        for c in &m.changed_probes {
            println!("    changed: {c}");
        }
        println!(
            "  time: training {:.2}s ({} steps, loss {:.3}), verification {:.2}s, total {:.2}s, attempts {}",
            m.train_seconds, m.steps, m.final_loss, m.verify_seconds, total, outcome.attempts
        );
        if let Some(reason) = &outcome.reason {
            println!("  not applied: {reason}");
        }
    }
    Ok(if outcome.accepted {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(2)
    })
}
