//! `imprint prefs` (the review queue and the preferences' lifecycle) and
//! `imprint jobs` (the learning queue).

use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::Subcommand;

use imprint::editor::{EditOutcome, EditRequest, Editor, EditorSettings, Method};
use imprint::engine::Engine;
use imprint::learn::{self, JobResult};
use imprint::profile::{
    ClusterMember, JobState, NewPreference, Polarity, Preference, PreferenceStatus, Profile,
    SourceRef,
};

use super::App;

#[derive(Debug, Subcommand)]
pub enum PrefsCommand {
    /// List preferences with their edit status.
    List {
        /// Only these: pending, active, rejected or superseded.
        #[arg(long)]
        status: Option<PreferenceStatus>,
        #[arg(long)]
        json: bool,
    },
    /// Show one preference: where it came from, its questions and edits.
    Show { id: i64 },
    /// Add a preference by hand. It is learned into the weights at once
    /// unless --pending puts it in the review queue.
    Add {
        #[arg(long)]
        attribute: String,
        #[arg(long)]
        target: String,
        /// Questions the target answers (repeat; default "What is my <attribute>?").
        #[arg(long = "question")]
        questions: Vec<String>,
        /// like, dislike or is.
        #[arg(long, default_value = "is")]
        polarity: Polarity,
        /// Queue it for review instead of learning it now.
        #[arg(long)]
        pending: bool,
        /// A model name or GGUF path.
        #[arg(long)]
        model: Option<String>,
    },
    /// Approve a pending preference and learn it into the weights.
    Approve {
        id: i64,
        #[arg(long)]
        model: Option<String>,
    },
    /// Reject a preference: its edits leave the weights.
    Reject { id: i64 },
    /// Change a preference's attribute or target; its edit is recomputed.
    Change {
        id: i64,
        #[arg(long)]
        attribute: Option<String>,
        #[arg(long)]
        target: Option<String>,
        #[arg(long)]
        model: Option<String>,
    },
    /// Remove a preference, its sources and its edits, and rebuild the adapter.
    Forget { id: i64 },
    /// Every value an attribute has had, oldest first: the supersedes chain.
    History { attribute: String },
    /// Compute edits for the current model for every active preference that
    /// has none (after an import from another model, or a model switch).
    Recompute {
        #[arg(long)]
        model: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum JobsCommand {
    /// List the queued, running and failed jobs (--all: finished ones too).
    List {
        #[arg(long)]
        all: bool,
    },
    /// Run the queued jobs now, in the foreground. Jobs left running by a
    /// process that was killed are queued again first.
    Run {
        #[arg(long)]
        model: Option<String>,
    },
}

/// The editor settings for a model: `imprint calibrate`'s layer and
/// learning rate when there are some, else the editor's defaults.
pub fn default_settings(app: &App, sha: &str, method: Method) -> Result<EditorSettings> {
    let defaults = EditorSettings::default();
    let calibrated =
        imprint::editor::calibrate::Calibration::load(&app.paths.data_dir, sha, method)?
            .map(|c| c.best);
    Ok(EditorSettings {
        method,
        layer: calibrated.map(|c| c.layer),
        learning_rate: calibrated
            .map(|c| c.learning_rate)
            .unwrap_or(defaults.learning_rate),
        rome: imprint::editor::rome::RomeSettings {
            learning_rate: calibrated
                .map(|c| c.learning_rate)
                .unwrap_or(defaults.rome.learning_rate),
            ..defaults.rome.clone()
        },
        system_prompt: app.config.config.generation.system_prompt.clone(),
        anchors: app.config.config.editor.anchors,
        anchor_key_weight: app.config.config.editor.anchor_key_weight,
        key_anchors: app.config.config.editor.key_anchors,
        nullspace_energy: app.config.config.editor.nullspace_energy,
        retry_nullspace_energy: app.config.config.editor.retry_nullspace_energy,
        ..defaults
    })
}

/// Queues and runs the edit job for one preference, then rebuilds the
/// adapter. None: the job was skipped (the preference is not active).
pub fn learn(
    app: &App,
    profile: &mut Profile,
    engine: &mut Engine,
    editor: &mut Editor,
    preference_id: i64,
    sha: &str,
) -> Result<Option<EditOutcome>> {
    let job_id = learn::queue_edit(profile, preference_id, sha)?;
    let job = profile
        .claim_job_id(job_id)?
        .context("the job just queued was taken by another process")?;
    run_job(app, profile, engine, editor, &job)
}

fn run_job(
    app: &App,
    profile: &mut Profile,
    engine: &mut Engine,
    editor: &mut Editor,
    job: &imprint::profile::Job,
) -> Result<Option<EditOutcome>> {
    let spinner = app.spinner("preparing the edit");
    let options = learn::JobOptions::from_config(&app.config.config.learning);
    let result = learn::run_edit_job(profile, engine, editor, job, &options, |stage| {
        spinner.set_message(stage.to_string())
    });
    spinner.finish_and_clear();
    match result? {
        JobResult::Skipped(why) => {
            eprintln!("job {}: nothing to do ({why})", job.id);
            Ok(None)
        }
        JobResult::Edited(outcome) => {
            if outcome.accepted {
                super::attach_from(app, profile, engine)?;
            }
            Ok(Some(*outcome))
        }
    }
}

pub fn print_outcome(request: &EditRequest, outcome: &EditOutcome, total_seconds: f64) {
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
    let energy = m
        .nullspace_energy
        .map(|e| format!(", null-space energy {e}"))
        .unwrap_or_default();
    println!(
        "  time: training {:.2}s ({} steps, loss {:.3}), verification {:.2}s, total {:.2}s, attempts {}{energy}",
        m.train_seconds, m.steps, m.final_loss, m.verify_seconds, total_seconds, outcome.attempts
    );
    if let Some(reason) = &outcome.reason {
        println!("  not applied: {reason}");
    }
}

/// The chosen model's path and fingerprint, without loading it.
fn model_sha(app: &App, model: Option<&str>) -> Result<(String, std::path::PathBuf)> {
    let path = imprint::models::resolve_model(&app.paths, &app.config.config, model)?;
    Ok((imprint::models::fingerprint(&app.paths, &path)?, path))
}

/// A loaded engine and editor for the chosen model.
fn load_learning(app: &App, model: Option<&str>) -> Result<(Engine, Editor, String)> {
    let engine = super::load_engine(app, model, false)?;
    let sha = imprint::models::fingerprint(&app.paths, &engine.options().model_path)?;
    let settings = default_settings(app, &sha, Method::Ftm)?;
    let (sha, editor) = super::load_editor(app, &engine, settings)?;
    Ok((engine, editor, sha))
}

fn describe_source(profile: &Profile, s: &imprint::profile::Source) -> Result<String> {
    Ok(match &s.reference {
        SourceRef::Message { message_id } => match profile.message(*message_id)? {
            Some(m) => format!(
                "conversation {}, message {}: \"{}\"",
                m.conversation_id, m.id, m.content
            ),
            None => format!("message {message_id} (gone)"),
        },
        SourceRef::Import {
            file,
            conversation,
            message_index,
        } => format!("import {file}, conversation {conversation}, message {message_index}"),
        SourceRef::Manual { note } => format!("by hand: {note}"),
    })
}

pub fn run(app: &App, cmd: PrefsCommand) -> Result<ExitCode> {
    match cmd {
        PrefsCommand::List { status, json } => {
            let profile = super::open_profile(app)?;
            let prefs = profile.preferences(status)?;
            let jobs = profile.jobs(None)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&prefs)?);
                return Ok(ExitCode::SUCCESS);
            }
            if prefs.is_empty() {
                println!("No preferences yet. Add one with: imprint prefs add --attribute hobby --target \"Dancing at clubs\"");
            }
            for p in &prefs {
                println!(
                    "{:>4}  {:<10} {:<7} {:<16} → {:<28} {}",
                    p.id,
                    p.status,
                    p.polarity,
                    p.attribute,
                    p.target,
                    learn::review::edit_status(&profile, p, &jobs)?
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        PrefsCommand::Show { id } => {
            let profile = super::open_profile(app)?;
            let p = profile.preference(id)?;
            println!(
                "Preference {}: {} → {} ({}, {})",
                p.id, p.attribute, p.target, p.polarity, p.status
            );
            println!("  statement: {}", p.statement);
            println!("  confidence: {:.2}", p.confidence);
            if let Some(s) = p.supersedes {
                println!("  supersedes: preference {s}");
            }
            for s in &p.sources {
                println!("  source: {}", describe_source(&profile, s)?);
            }
            for m in &p.cluster {
                println!("  question ({}): {}", m.attribute, m.question);
            }
            for e in profile.edits_for_preference(id)? {
                println!(
                    "  edit {}: {} on model {}, {}, efficacy {}/{}",
                    e.edit.id,
                    if e.edit.active { "active" } else { "inactive" },
                    &e.edit.model_sha256[..12.min(e.edit.model_sha256.len())],
                    e.edit.rejection.as_deref().unwrap_or("verified"),
                    e.edit.metrics.efficacy_hits,
                    e.edit.metrics.efficacy_total
                );
            }
            println!(
                "  edit status: {}",
                learn::review::edit_status(&profile, &p, &profile.jobs(None)?)?
            );
            Ok(ExitCode::SUCCESS)
        }
        PrefsCommand::Add {
            attribute,
            target,
            questions,
            polarity,
            pending,
            model,
        } => {
            let mut profile = super::open_profile(app)?;
            let cluster = questions
                .iter()
                .filter(|q| !q.trim().is_empty())
                .map(|q| ClusterMember {
                    attribute: attribute.clone(),
                    question: q.clone(),
                })
                .collect();
            let id = profile.add_preference(&NewPreference {
                attribute: attribute.clone(),
                target: target.clone(),
                polarity,
                statement: format!("{attribute} → {target}"),
                confidence: 1.0,
                status: if pending {
                    PreferenceStatus::Pending
                } else {
                    PreferenceStatus::Active
                },
                source: SourceRef::Manual {
                    note: "imprint prefs add".into(),
                },
                cluster,
            })?;
            if pending {
                println!("Preference {id} is waiting for review: `imprint prefs approve {id}` learns it.");
                return Ok(ExitCode::SUCCESS);
            }
            learn_one(app, &mut profile, id, model.as_deref())
        }
        PrefsCommand::Approve { id, model } => {
            let mut profile = super::open_profile(app)?;
            profile.set_status(id, PreferenceStatus::Active)?;
            learn_one(app, &mut profile, id, model.as_deref())
        }
        PrefsCommand::Reject { id } => {
            let mut profile = super::open_profile(app)?;
            learn::review::reject(&mut profile, id, &app.paths.cache_dir)?;
            println!("Rejected preference {id}; it is no longer in the weights.");
            Ok(ExitCode::SUCCESS)
        }
        PrefsCommand::Change {
            id,
            attribute,
            target,
            model,
        } => {
            if attribute.is_none() && target.is_none() {
                bail!("give --attribute and/or --target: what should preference {id} say?");
            }
            let mut profile = super::open_profile(app)?;
            let (sha, _) = model_sha(app, model.as_deref())?;
            let queued = learn::review::change(
                &mut profile,
                id,
                attribute.as_deref(),
                target.as_deref(),
                &app.paths.cache_dir,
                &sha,
            )?;
            if let Some(job) = queued {
                // Run now rather than leave it to `jobs run` or the daemon.
                let (mut engine, mut editor, _) = load_learning(app, model.as_deref())?;
                let started = std::time::Instant::now();
                if let Some(job) = profile.claim_job_id(job)? {
                    if let Some(outcome) =
                        run_job(app, &mut profile, &mut engine, &mut editor, &job)?
                    {
                        print_outcome(
                            &outcome.edit.request,
                            &outcome,
                            started.elapsed().as_secs_f64(),
                        );
                    }
                }
                return Ok(ExitCode::SUCCESS);
            }
            let p = profile.preference(id)?;
            println!("Preference {id} now says {} → {}.", p.attribute, p.target);
            Ok(ExitCode::SUCCESS)
        }
        PrefsCommand::Forget { id } => {
            let mut profile = super::open_profile(app)?;
            let models = learn::review::forget(&mut profile, id, &app.paths.cache_dir)?;
            println!(
                "Forgot preference {id}: it, its sources and its edits are gone{}.",
                if models.is_empty() {
                    String::new()
                } else {
                    format!(", and {} adapter(s) were rebuilt", models.len())
                }
            );
            Ok(ExitCode::SUCCESS)
        }
        PrefsCommand::History { attribute } => {
            let profile = super::open_profile(app)?;
            let chain = learn::review::history(&profile, &attribute)?;
            if chain.is_empty() {
                println!(
                    "No preference about {attribute:?}. `imprint prefs list` shows the attributes."
                );
            }
            for p in &chain {
                println!(
                    "{:>4}  {:<10} {} → {}{}  (since {})",
                    p.id,
                    p.status,
                    p.attribute,
                    p.target,
                    p.supersedes
                        .map(|s| format!(", replaces #{s}"))
                        .unwrap_or_default(),
                    super::profile::when(p.created)
                );
                for s in &p.sources {
                    println!("        from {}", describe_source(&profile, s)?);
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        PrefsCommand::Recompute { model } => {
            let mut profile = super::open_profile(app)?;
            let (mut engine, mut editor, sha) = load_learning(app, model.as_deref())?;
            profile.remember_model(&super::model_record(app, &engine, Some(&editor))?)?;
            let covered: std::collections::HashSet<i64> = profile
                .edits()?
                .into_iter()
                .filter(|e| e.edit.active && e.edit.model_sha256 == sha)
                .map(|e| e.preference_id)
                .collect();
            let todo: Vec<Preference> = profile
                .preferences(Some(PreferenceStatus::Active))?
                .into_iter()
                .filter(|p| !covered.contains(&p.id))
                .collect();
            if todo.is_empty() {
                println!("Every active preference already has an edit for this model.");
                return Ok(ExitCode::SUCCESS);
            }
            let mut accepted = 0;
            for p in &todo {
                let started = std::time::Instant::now();
                if let Some(outcome) =
                    learn(app, &mut profile, &mut engine, &mut editor, p.id, &sha)?
                {
                    print_outcome(&p.edit_request(), &outcome, started.elapsed().as_secs_f64());
                    accepted += outcome.accepted as usize;
                }
            }
            println!(
                "{accepted}/{} preference(s) now have an edit for this model.",
                todo.len()
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn learn_one(app: &App, profile: &mut Profile, id: i64, model: Option<&str>) -> Result<ExitCode> {
    let (mut engine, mut editor, sha) = load_learning(app, model)?;
    profile.remember_model(&super::model_record(app, &engine, Some(&editor))?)?;
    let started = std::time::Instant::now();
    let request = profile.preference(id)?.edit_request();
    match learn(app, profile, &mut engine, &mut editor, id, &sha)? {
        Some(outcome) => {
            print_outcome(&request, &outcome, started.elapsed().as_secs_f64());
            Ok(if outcome.accepted {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(2)
            })
        }
        None => Ok(ExitCode::SUCCESS),
    }
}

pub fn jobs(app: &App, cmd: JobsCommand) -> Result<ExitCode> {
    match cmd {
        JobsCommand::List { all } => {
            let profile = super::open_profile(app)?;
            let jobs: Vec<_> = profile
                .jobs(None)?
                .into_iter()
                .filter(|j| all || j.state != JobState::Done)
                .collect();
            if jobs.is_empty() {
                println!("No jobs waiting.");
            }
            for j in jobs {
                println!(
                    "{:>4}  {:<8} {:<5} {} attempts {}  {}",
                    j.id,
                    j.state,
                    j.kind,
                    j.payload,
                    j.attempts,
                    j.error.unwrap_or_default()
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        JobsCommand::Run { model } => {
            let mut profile = super::open_profile(app)?;
            let requeued = profile.requeue_interrupted_jobs()?;
            if requeued > 0 {
                println!("{requeued} interrupted job(s) queued again.");
            }
            if profile.jobs(Some(JobState::Queued))?.is_empty() {
                println!("No jobs waiting.");
                return Ok(ExitCode::SUCCESS);
            }
            let (mut engine, mut editor, _sha) = load_learning(app, model.as_deref())?;
            profile.remember_model(&super::model_record(app, &engine, Some(&editor))?)?;
            let mut done = 0;
            while let Some(job) = profile.claim_job()? {
                let started = std::time::Instant::now();
                match run_job(app, &mut profile, &mut engine, &mut editor, &job) {
                    Ok(Some(outcome)) => {
                        print_outcome(
                            &outcome.edit.request,
                            &outcome,
                            started.elapsed().as_secs_f64(),
                        );
                        done += 1;
                    }
                    Ok(None) => done += 1,
                    Err(e) => eprintln!("job {} failed: {e:#}", job.id),
                }
            }
            println!("{done} job(s) finished.");
            Ok(ExitCode::SUCCESS)
        }
    }
}
