use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};

use imprint::editor::{AnchorMode, EditRequest, EditorSettings, KeyAnchors, Method};

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
    #[command(flatten)]
    tuning: EditorFlags,
    /// A model name or GGUF path.
    #[arg(long)]
    model: Option<String>,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(app: &App, args: EditArgs) -> Result<ExitCode> {
    match args.command {
        Some(EditCommand::List { json }) => {
            let profile = super::open_profile(app)?;
            let edits = profile.edits()?;
            if json {
                let list: Vec<_> = edits
                    .iter()
                    .map(|s| serde_json::json!({"preference_id": s.preference_id, "edit": s.edit}))
                    .collect();
                println!("{}", serde_json::to_string_pretty(&list)?);
                return Ok(ExitCode::SUCCESS);
            }
            if edits.is_empty() {
                println!("No edits yet. Teach one with: imprint edit --attribute hobby --target \"Dancing at clubs\" --question \"What's my hobby?\"");
            }
            for s in &edits {
                let e = &s.edit;
                let status = if e.active { "active  " } else { "inactive" };
                println!(
                    "{}  pref {:>3}  {status}  {:<14} → {:<28} {} layer {:>2}  efficacy {}/{}  locality {:.1}%  {:.1}s",
                    e.id,
                    s.preference_id,
                    e.request.attribute,
                    e.request.target,
                    match e.method {
                        Method::Ftm => "ftm ",
                        Method::Rome => "rome",
                    },
                    e.layer,
                    e.metrics.efficacy_hits,
                    e.metrics.efficacy_total,
                    e.metrics.token_locality() * 100.0,
                    e.metrics.train_seconds
                );
                if let Some(reason) = &e.rejection {
                    println!("          rejected: {reason}");
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Some(EditCommand::Remove { id }) => {
            let mut profile = super::open_profile(app)?;
            let removed = profile.remove_edit(&id)?;
            let arch = profile
                .models()?
                .into_iter()
                .find(|m| m.sha256 == removed.edit.model_sha256)
                .map(|m| m.architecture)
                .unwrap_or_else(|| "llama".into());
            profile.assemble_adapter(&app.paths.cache_dir, &removed.edit.model_sha256, &arch)?;
            println!(
                "Removed edit {id} ({} → {}); preference {} stays (`imprint prefs forget {}` removes it too).",
                removed.edit.request.attribute,
                removed.edit.request.target,
                removed.preference_id,
                removed.preference_id
            );
            Ok(ExitCode::SUCCESS)
        }
        None => new_edit(app, args.new),
    }
}

fn new_edit(app: &App, args: NewEdit) -> Result<ExitCode> {
    let attribute = args.attribute.clone().context(
        "give --attribute, --target and at least one --question (see `imprint edit --help`)",
    )?;
    let target = args
        .target
        .clone()
        .context("give --target: the answer to teach")?;
    let request = EditRequest {
        attribute,
        target,
        questions: args.questions.clone(),
    };
    request.validate()?;
    let mut profile = super::open_profile(app)?;

    let mut engine = super::load_engine(app, args.model.as_deref(), false)?;
    let sha = imprint::models::fingerprint(&app.paths, &engine.options().model_path)?;
    let settings = args
        .tuning
        .apply(super::prefs::default_settings(app, &sha, args.method)?);
    let started = std::time::Instant::now();
    let (sha, mut editor) = super::load_editor(app, &engine, settings)?;
    profile.remember_model(&super::model_record(app, &engine, Some(&editor))?)?;
    let preference = imprint::profile::NewPreference {
        attribute: request.attribute.clone(),
        target: request.target.clone(),
        polarity: imprint::profile::Polarity::Is,
        statement: format!("{} → {}", request.attribute, request.target),
        confidence: 1.0,
        status: imprint::profile::PreferenceStatus::Active,
        source: imprint::profile::SourceRef::Manual {
            note: "taught with imprint edit".into(),
        },
        cluster: request
            .questions
            .iter()
            .filter(|q| !q.trim().is_empty())
            .map(|q| imprint::profile::ClusterMember {
                attribute: request.attribute.clone(),
                question: q.clone(),
            })
            .collect(),
    };
    let preference_id = profile.add_preference(&preference)?;
    let outcome = super::prefs::learn(
        app,
        &mut profile,
        &mut engine,
        &mut editor,
        preference_id,
        &sha,
    )?;
    let Some(outcome) = outcome else {
        anyhow::bail!("the edit job for preference {preference_id} was skipped");
    };
    let total = started.elapsed().as_secs_f64();
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "id": outcome.edit.id,
                "preference_id": preference_id,
                "accepted": outcome.accepted,
                "reason": outcome.reason,
                "attempts": outcome.attempts,
                "layer": outcome.edit.layer,
                "metrics": outcome.edit.metrics,
                "total_seconds": total,
            })
        );
    } else {
        super::prefs::print_outcome(&request, &outcome, total);
    }
    Ok(if outcome.accepted {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(2)
    })
}

/// The editor's tuning knobs, shared by `imprint edit` and the evaluation
/// commands so an experiment can be run, and recorded, with the settings a
/// user would give one edit.
#[derive(Debug, Clone, Default, Args)]
pub struct EditorFlags {
    /// LoRA rank (default 4).
    #[arg(long)]
    pub rank: Option<usize>,
    /// Layer whose MLP down-projection is edited (default: `imprint calibrate`'s
    /// choice for this model, else about 2/3 of the depth for ftm, 1/6 for rome).
    #[arg(long)]
    pub layer: Option<usize>,
    /// Maximum optimisation steps (default 40 for ftm, 30 for rome).
    #[arg(long)]
    pub steps: Option<usize>,
    /// Adam learning rate (default 0.05 for ftm, 1.0 for rome's δ).
    #[arg(long)]
    pub lr: Option<f64>,
    /// FT-M: let the learning rate fall along a cosine to this share of
    /// itself by the last step (default 1: constant).
    #[arg(long)]
    pub lr_floor: Option<f64>,
    /// Weight of the anchor loss (locality) against the target loss (default 1).
    #[arg(long)]
    pub anchor_weight: Option<f64>,
    /// Weight of the ‖ΔW‖² penalty: smaller edits, better locality (default 0.01).
    #[arg(long)]
    pub l2: Option<f64>,
    /// Share of the unrelated probes' answer tokens that must keep their
    /// argmax (teacher-forced on the answers before the edit; default 0.9).
    #[arg(long)]
    pub min_locality: Option<f64>,
    /// FT-M: each target token must lead every token of the whole
    /// vocabulary by this many logits before training stops, and the tokens
    /// that come closer join the loss (default 0: the target must be the
    /// greedy answer; 1 guards against the logits candle and llama.cpp
    /// disagree by, at a cost in time: docs/RESULTS.md, "Target margin").
    #[arg(long, value_name = "LOGITS", value_parser = finite_logits)]
    pub target_margin: Option<f32>,
    /// Stop training once the mean target loss is below this (default 0.2).
    #[arg(long)]
    pub stop_loss: Option<f32>,
    /// Do not retry with stronger settings when the gate refuses the edit.
    #[arg(long)]
    pub no_retry: bool,
    /// Skip the null-space projection (worse locality; for experiments).
    #[arg(long)]
    pub no_nullspace: bool,
    /// Share of ordinary keys' covariance energy the null-space projector
    /// removes (default: `[editor] nullspace_energy`, 0.95; AlphaEdit uses 0.99):
    /// lower lets the edit act through more directions, at some cost to
    /// unrelated answers.
    #[arg(long)]
    pub nullspace_energy: Option<f64>,
    /// The share the retry uses when the gate refused the first attempt for
    /// changing other answers (default: `[editor] retry_nullspace_energy`,
    /// 0.95); a refusal for not learning retries at `--nullspace-energy`.
    /// `--nullspace-energy` alone does not move it: give both to measure a
    /// share, or `--no-retry`.
    #[arg(long)]
    pub retry_nullspace_energy: Option<f64>,
    /// How anchor questions keep their answers (default: `[editor] anchors`
    /// in the config, "keys"): `keys` (the edited layer keeps its output on
    /// the anchors' keys; the most recent preferences keep their answers by
    /// cross-entropy), `loss` (cross-entropy on every anchor: several times
    /// slower), `project` (their keys are removed from the edit's input
    /// side), `both`, or `off`.
    #[arg(long)]
    pub anchors: Option<AnchorMode>,
    /// ROME: how strongly the keys of earlier edits at the same layer are
    /// kept from firing, added to the key covariance as MEMIT adds the keys
    /// it must keep (default 1; 0 lets a new edit overwrite earlier ones).
    #[arg(long)]
    pub preserve_weight: Option<f64>,
    /// Weight of the key-preservation term of `--anchors keys` (default:
    /// `[editor] anchor_key_weight`, 100).
    #[arg(long)]
    pub anchor_key_weight: Option<f64>,
    /// What the key term's shipped anchors are made of on a first attempt
    /// (default: `[editor] key_anchors`, "questions"): `questions` (the
    /// questions alone, their keys computed once) or `answers` (each
    /// question with the profile's own short answer, generated per edit).
    #[arg(long)]
    pub key_anchors: Option<KeyAnchors>,
}

/// `--target-margin`: a number of logits; NaN or infinity would silently
/// switch the margin off or make every edit fail.
fn finite_logits(text: &str) -> Result<f32, String> {
    match text.parse::<f32>() {
        Ok(v) if v.is_finite() => Ok(v),
        _ => Err(format!(
            "expected a number of logits such as 1 or 0.5, not {text:?}"
        )),
    }
}

impl EditorFlags {
    /// Unset flags keep `defaults` (`imprint calibrate`'s choice for this
    /// model, else the editor's own defaults).
    pub fn apply(&self, defaults: EditorSettings) -> EditorSettings {
        EditorSettings {
            layer: self.layer.or(defaults.layer),
            rank: self.rank.unwrap_or(defaults.rank),
            max_steps: self.steps.unwrap_or(defaults.max_steps),
            learning_rate: self.lr.unwrap_or(defaults.learning_rate),
            lr_floor: self.lr_floor.unwrap_or(defaults.lr_floor),
            rome: imprint::editor::rome::RomeSettings {
                steps: self.steps.unwrap_or(defaults.rome.steps),
                learning_rate: self.lr.unwrap_or(defaults.rome.learning_rate),
                preserve_weight: self
                    .preserve_weight
                    .unwrap_or(defaults.rome.preserve_weight),
                ..defaults.rome.clone()
            },
            anchor_weight: self.anchor_weight.unwrap_or(defaults.anchor_weight),
            anchor_key_weight: self.anchor_key_weight.unwrap_or(defaults.anchor_key_weight),
            key_anchors: self.key_anchors.unwrap_or(defaults.key_anchors),
            stop_loss: self.stop_loss.unwrap_or(defaults.stop_loss),
            target_margin: self.target_margin.or(defaults.target_margin),
            l2: self.l2.unwrap_or(defaults.l2),
            min_locality: self.min_locality.unwrap_or(defaults.min_locality),
            use_nullspace: defaults.use_nullspace && !self.no_nullspace,
            nullspace_energy: self.nullspace_energy.unwrap_or(defaults.nullspace_energy),
            retry_nullspace_energy: self
                .retry_nullspace_energy
                .unwrap_or(defaults.retry_nullspace_energy),
            anchors: self.anchors.unwrap_or(defaults.anchors),
            retry: defaults.retry && !self.no_retry,
            ..defaults
        }
    }
}
