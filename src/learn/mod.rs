//! Learning: from what the user says to an edit in the weights.
//!
//! - [`capture`]: a user message → new, reinforced, superseded or pending
//!   preferences, and edit jobs.
//! - [`cluster`]: each preference's synonym questions.
//! - [`import`]: chat-history importers (ChatGPT, Claude, JSONL, Markdown,
//!   plain text), streamed, into capture.
//! - [`inbox`]: the watched folder exports are dropped into.
//! - [`extract`]: rule-based extraction of first-person preferences.
//! - [`llm_extract`]: the model as a second extractor, grammar-constrained
//!   JSON, checked against the sentence.
//! - [`privacy`]: the filter that keeps secrets out of the profile and the
//!   weights.
//! - this file: the learning step, from a stored preference to an edit.
//!
//! Every learning step goes through the profile's job queue, so it can be
//! resumed after a crash: the preference is stored and an edit job queued
//! (one transaction), the editor computes and verifies the edit, and the
//! edit is stored together with the job's completion (one transaction).
//! The assembled adapter is a cache rebuilt from the stored edits. A
//! process killed anywhere leaves the job queued or done, never a
//! half-written edit.

pub mod capture;
pub mod cluster;
pub mod extract;
pub mod import;
pub mod inbox;
pub mod llm_extract;
pub mod privacy;
pub mod review;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::editor::{EditOutcome, Editor, EditorError};
use crate::engine::Engine;
use crate::profile::{Job, PreferenceStatus, Profile, ProfileError};

pub const EDIT_JOB: &str = "edit";

#[derive(Debug, Error)]
pub enum LearnError {
    #[error(transparent)]
    Profile(#[from] ProfileError),
    #[error(transparent)]
    Editor(#[from] EditorError),
    #[error("job {id} is not an edit job for this model: {reason}")]
    BadJob { id: i64, reason: String },
}

/// The payload of an edit job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EditJob {
    pub preference_id: i64,
    /// The model to compute the edit for.
    pub model_sha256: String,
}

impl EditJob {
    pub fn from_job(job: &Job) -> Result<Self, LearnError> {
        if job.kind != EDIT_JOB {
            return Err(LearnError::BadJob {
                id: job.id,
                reason: format!("its kind is {}", job.kind),
            });
        }
        serde_json::from_value(job.payload.clone()).map_err(|e| LearnError::BadJob {
            id: job.id,
            reason: e.to_string(),
        })
    }
}

/// Queues the computation of a preference's edit for a model.
pub fn queue_edit(
    profile: &Profile,
    preference_id: i64,
    model_sha256: &str,
) -> Result<i64, LearnError> {
    let payload = serde_json::to_value(EditJob {
        preference_id,
        model_sha256: model_sha256.to_string(),
    })
    .map_err(|e| ProfileError::Invalid(e.to_string()))?;
    Ok(profile.enqueue_job(EDIT_JOB, &payload)?)
}

/// What running one job did.
#[derive(Debug)]
pub enum JobResult {
    /// The edit was computed and stored (accepted by the gate or not).
    Edited(Box<EditOutcome>),
    /// Nothing to do: the preference is gone or no longer active.
    Skipped(String),
}

/// Runs one claimed edit job: computes the preference's edit with the
/// editor (on top of the model's other active edits), then stores it and
/// completes the job in one transaction. On failure the job is marked
/// failed with the reason. The caller rebuilds the adapter afterwards.
/// The user's choices an edit job follows (`[learning]` in the config).
#[derive(Debug, Clone)]
pub struct JobOptions {
    /// Refine a template-only cluster with the model's synonyms first.
    pub model_synonyms: bool,
}

impl Default for JobOptions {
    fn default() -> Self {
        Self {
            model_synonyms: true,
        }
    }
}

impl JobOptions {
    pub fn from_config(learning: &crate::config::LearningConfig) -> Self {
        Self {
            model_synonyms: learning.model_synonyms,
        }
    }
}

pub fn run_edit_job(
    profile: &mut Profile,
    engine: &mut Engine,
    editor: &mut Editor,
    job: &Job,
    options: &JobOptions,
    progress: impl FnMut(&str),
) -> Result<JobResult, LearnError> {
    let result = run_inner(profile, engine, editor, job, options, progress);
    match &result {
        Ok(JobResult::Skipped(why)) => profile.finish_job(job.id, None).map(|_| {
            tracing::info!("job {} skipped: {why}", job.id);
        })?,
        Ok(JobResult::Edited(_)) => {}
        Err(e) => profile.finish_job(job.id, Some(&e.to_string()))?,
    }
    result
}

fn run_inner(
    profile: &mut Profile,
    engine: &mut Engine,
    editor: &mut Editor,
    job: &Job,
    options: &JobOptions,
    mut progress: impl FnMut(&str),
) -> Result<JobResult, LearnError> {
    let spec = EditJob::from_job(job)?;
    let mut preference = match profile.preference(spec.preference_id) {
        Ok(p) => p,
        Err(ProfileError::UnknownPreference(_)) => {
            return Ok(JobResult::Skipped(format!(
                "preference {} was forgotten",
                spec.preference_id
            )))
        }
        Err(e) => return Err(e.into()),
    };
    if preference.status != PreferenceStatus::Active {
        return Ok(JobResult::Skipped(format!(
            "preference {} is {}",
            preference.id, preference.status
        )));
    }
    if editor.model_sha256() != spec.model_sha256 {
        return Err(LearnError::BadJob {
            id: job.id,
            reason: format!(
                "it is for model {}, and the editor holds {}",
                short(&spec.model_sha256),
                short(editor.model_sha256())
            ),
        });
    }
    if options.model_synonyms && cluster::is_template_cluster(&preference) {
        // An attribute the lexicon does not know: the model may know better
        // ways to ask about it than the templates do.
        progress("asking the model for synonyms");
        engine.set_adapter(None).map_err(EditorError::from)?;
        let refined = cluster::refine_with_model(
            engine,
            &preference.attribute,
            preference.polarity,
            preference.cluster.len(),
        )
        .map_err(EditorError::from)?;
        tracing::info!(
            attribute = %preference.attribute,
            proposed = ?refined.proposed,
            kept = ?refined.kept,
            "model synonyms"
        );
        if refined.cluster != preference.cluster {
            profile.set_cluster(preference.id, &refined.cluster)?;
            preference.cluster = refined.cluster;
        }
    }
    let request = preference.edit_request();
    // The preference's own earlier edit is being replaced, so it is not
    // one of the edits this one must leave intact.
    let mine: Vec<String> = profile
        .edits_for_preference(preference.id)?
        .into_iter()
        .map(|e| e.edit.id)
        .collect();
    let others: Vec<_> = profile
        .active_edits(&spec.model_sha256)?
        .into_iter()
        .filter(|e| !mine.contains(&e.id))
        .collect();
    let outcome = editor.compute(engine, &request, &others, progress)?;
    profile.save_edit(preference.id, &outcome.edit, Some(job.id))?;
    Ok(JobResult::Edited(Box::new(outcome)))
}

fn short(sha: &str) -> &str {
    &sha[..sha.len().min(12)]
}
