//! Reviewing learned preferences: approve, reject, change, forget, and the
//! edit status shown beside each one.
//!
//! The CLI (`imprint prefs …`) and the daemon's `prefs.*` methods both go
//! through here, so a preference changes the same way whoever asks. Every
//! change that takes an edit out of the weights rebuilds the adapters it
//! was in; every change that needs a new edit queues a job (the caller
//! decides whether to run it now or leave it to the daemon's worker).

use std::path::Path;

use serde::Serialize;

use super::{queue_edit, EditJob, LearnError};
use crate::profile::{ClusterMember, Job, JobState, Preference, PreferenceStatus, Profile};

/// Where a preference's edit stands, for one line in a list.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "state", rename_all = "lowercase")]
pub enum EditStatus {
    /// An edit job waits in the queue.
    Queued,
    /// The editor is computing it now.
    Computing { progress: f64 },
    /// An accepted edit is in the weights.
    Verified { edit: String },
    /// The last job failed.
    Failed { reason: String },
    /// The edit was computed, and the verification gate refused it.
    Refused { reason: String },
    /// No edit and no job (pending or rejected preferences, or not learned yet).
    None,
}

impl std::fmt::Display for EditStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EditStatus::Queued => write!(f, "queued"),
            EditStatus::Computing { progress } if *progress > 0.0 => {
                write!(f, "computing ({:.0}%)", progress * 100.0)
            }
            EditStatus::Computing { .. } => write!(f, "computing"),
            EditStatus::Verified { edit } => write!(f, "verified ({edit})"),
            EditStatus::Failed { reason } => write!(f, "failed: {reason}"),
            EditStatus::Refused { reason } => write!(f, "refused by the gate: {reason}"),
            EditStatus::None => write!(f, "no edit"),
        }
    }
}

/// The edit status of `p`. `jobs`: the profile's jobs, read once by the
/// caller for a whole list.
pub fn edit_status(
    profile: &Profile,
    p: &Preference,
    jobs: &[Job],
) -> Result<EditStatus, LearnError> {
    let edits = profile.edits_for_preference(p.id)?;
    let job = jobs.iter().rev().find(|j| {
        EditJob::from_job(j).is_ok_and(|e| e.preference_id == p.id) && j.state != JobState::Done
    });
    Ok(match (edits.iter().rev().find(|e| e.edit.active), job) {
        (_, Some(j)) if j.state == JobState::Running => EditStatus::Computing {
            progress: j.progress,
        },
        (_, Some(j)) if j.state == JobState::Queued => EditStatus::Queued,
        (Some(e), _) => EditStatus::Verified {
            edit: e.edit.id.clone(),
        },
        (None, Some(j)) if j.state == JobState::Failed => EditStatus::Failed {
            reason: j.error.clone().unwrap_or_else(|| "unknown".into()),
        },
        (None, _) => match edits.last().and_then(|e| e.edit.rejection.clone()) {
            Some(reason) => EditStatus::Refused { reason },
            None => EditStatus::None,
        },
    })
}

/// Models whose adapters carry this preference's active edits.
pub fn models_of(profile: &Profile, id: i64) -> Result<Vec<String>, LearnError> {
    let mut models: Vec<String> = profile
        .edits_for_preference(id)?
        .into_iter()
        .filter(|e| e.edit.active)
        .map(|e| e.edit.model_sha256)
        .collect();
    models.sort();
    models.dedup();
    Ok(models)
}

/// Rebuilds these models' adapters from the profile's active edits.
pub fn rebuild_adapters(
    profile: &Profile,
    cache_dir: &Path,
    models: &[String],
) -> Result<(), LearnError> {
    let known = profile.models()?;
    for sha in models {
        let arch = known
            .iter()
            .find(|m| &m.sha256 == sha)
            .map(|m| m.architecture.clone())
            .unwrap_or_else(|| "llama".into());
        profile.assemble_adapter(cache_dir, sha, &arch)?;
    }
    Ok(())
}

/// Makes a pending (or rejected) preference active and queues its edit.
/// Returns the job id.
pub fn approve(profile: &mut Profile, id: i64, model_sha256: &str) -> Result<i64, LearnError> {
    profile.set_status(id, PreferenceStatus::Active)?;
    queue_edit(profile, id, model_sha256)
}

/// Rejects a preference: its edits leave the weights.
pub fn reject(profile: &mut Profile, id: i64, cache_dir: &Path) -> Result<(), LearnError> {
    let models = models_of(profile, id)?;
    profile.set_status(id, PreferenceStatus::Rejected)?;
    rebuild_adapters(profile, cache_dir, &models)
}

/// Changes what a preference says. Its questions are rewritten with the new
/// attribute, its old edits leave the weights, and an active preference
/// gets a new edit job (returned).
pub fn change(
    profile: &mut Profile,
    id: i64,
    attribute: Option<&str>,
    target: Option<&str>,
    cache_dir: &Path,
    model_sha256: &str,
) -> Result<Option<i64>, LearnError> {
    let old = profile.preference(id)?;
    let models = models_of(profile, id)?;
    let attribute = attribute.unwrap_or(&old.attribute).to_string();
    let target = target.unwrap_or(&old.target).to_string();
    let cluster: Vec<ClusterMember> = old
        .cluster
        .iter()
        .map(|m| ClusterMember {
            attribute: attribute.clone(),
            question: m.question.replace(&old.attribute, &attribute),
        })
        .collect();
    profile.update_preference(id, &attribute, &target, &cluster)?;
    rebuild_adapters(profile, cache_dir, &models)?;
    if profile.preference(id)?.status == PreferenceStatus::Active {
        return Ok(Some(queue_edit(profile, id, model_sha256)?));
    }
    Ok(None)
}

/// Forgets a preference with its sources and edits; returns the models
/// whose adapters were rebuilt.
pub fn forget(profile: &mut Profile, id: i64, cache_dir: &Path) -> Result<Vec<String>, LearnError> {
    let models = profile.forget(id)?;
    rebuild_adapters(profile, cache_dir, &models)?;
    Ok(models)
}

/// Every preference ever held about `attribute` (case-insensitive), oldest
/// first: the chain of supersessions.
pub fn history(profile: &Profile, attribute: &str) -> Result<Vec<Preference>, LearnError> {
    let wanted = attribute.to_lowercase();
    Ok(profile
        .preferences(None)?
        .into_iter()
        .filter(|p| p.attribute.to_lowercase() == wanted)
        .collect())
}
