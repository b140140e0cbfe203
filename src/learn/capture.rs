//! Capture: from a stored user message to preferences in the profile.
//!
//! Each sentence of the message goes through the privacy filter, then the
//! extractor. Each candidate is then matched against what the profile
//! already holds:
//! - the same attribute and value again → one more source on the existing
//!   preference (dedupe);
//! - a new value for a single-valued attribute ("I moved to Porto") → a new
//!   preference that supersedes the old one, whose edits leave the weights;
//! - the same value with the opposite polarity ("I love jazz" after "I
//!   can't stand jazz") → a genuine contradiction: the new one waits in the
//!   review queue, and the audit log names both;
//! - otherwise a new preference, active when its confidence reaches the
//!   configured threshold, pending review when not.
//!
//! Active preferences get an edit job queued for the current model.

use serde::Serialize;

use super::extract::{self, match_f1};
use super::{cluster, privacy, queue_edit, LearnError};
use crate::profile::{NewPreference, Polarity, PreferenceStatus, Profile, SourceRef};

/// Attributes a person has one value of at a time.
const SINGLE_VALUED: &[&str] = &[
    "location",
    "hometown",
    "profession",
    "job",
    "age",
    "name",
    "relationship status",
    "diet",
    "religion",
    "vehicle",
];

#[derive(Debug, Clone)]
pub struct CaptureSettings {
    pub auto_apply_threshold: f64,
    pub cluster_size: usize,
}

impl From<&crate::config::LearningConfig> for CaptureSettings {
    fn from(c: &crate::config::LearningConfig) -> Self {
        Self {
            auto_apply_threshold: c.auto_apply_threshold,
            cluster_size: c.cluster_size,
        }
    }
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct CaptureReport {
    /// New preferences, active.
    pub learned: Vec<i64>,
    /// New preferences waiting for review.
    pub pending: Vec<i64>,
    /// Existing preferences that gained this message as a source.
    pub reinforced: Vec<i64>,
    /// (old, new) pairs.
    pub superseded: Vec<(i64, i64)>,
    /// Edit jobs queued for the new active preferences.
    pub jobs: Vec<i64>,
    /// Sentences skipped because they hold a secret (kinds only).
    pub secrets_skipped: privacy::SkippedSecrets,
}

fn same(a: &str, b: &str) -> bool {
    a.eq_ignore_ascii_case(b) || match_f1(a, b) >= 0.99
}

/// Captures the preferences in one user message already stored in the
/// profile as `message_id`. `model_sha256`: queue edit jobs for this model.
pub fn capture_message(
    profile: &mut Profile,
    message_id: i64,
    text: &str,
    settings: &CaptureSettings,
    model_sha256: Option<&str>,
    llm: Option<&mut crate::engine::Engine>,
) -> Result<CaptureReport, LearnError> {
    let mut report = CaptureReport::default();
    capture_text(
        profile,
        &SourceRef::Message { message_id },
        text,
        settings,
        model_sha256,
        llm,
        &mut report,
    )?;
    Ok(report)
}

/// Captures the preferences in one user message from any source (a stored
/// message, an imported chat), adding to `report`. With `llm`, sentences no
/// rule matched are also put to the model (`llm_extract`); what only the
/// model found always waits for review.
pub fn capture_text(
    profile: &mut Profile,
    source: &SourceRef,
    text: &str,
    settings: &CaptureSettings,
    model_sha256: Option<&str>,
    mut llm: Option<&mut crate::engine::Engine>,
    report: &mut CaptureReport,
) -> Result<(), LearnError> {
    for sentence in extract::sentences(text) {
        let secrets = privacy::scan(sentence);
        if !secrets.is_empty() {
            report.secrets_skipped.record(&secrets);
            continue;
        }
        let candidates = match (extract::extract_sentence_all(sentence), llm.as_deref_mut()) {
            (Ok(found), _) => found,
            (Err(extract::Skip::NoRule), Some(engine)) => {
                match super::llm_extract::extract_sentence(engine, sentence)
                    .map_err(crate::editor::EditorError::from)?
                {
                    Some(c) => vec![c],
                    None => continue,
                }
            }
            _ => continue,
        };
        for candidate in candidates {
            capture_candidate(
                profile,
                source,
                candidate,
                text,
                settings,
                model_sha256,
                report,
            )?;
        }
    }
    Ok(())
}

/// Files one candidate: reinforces the preference it repeats, supersedes
/// the single-valued one it changes, waits for review when it contradicts
/// one or is not confident enough, else becomes active and queues its edit.
fn capture_candidate(
    profile: &mut Profile,
    source: &SourceRef,
    candidate: extract::Candidate,
    text: &str,
    settings: &CaptureSettings,
    model_sha256: Option<&str>,
    report: &mut CaptureReport,
) -> Result<(), LearnError> {
    if !text.contains(&candidate.evidence) {
        return Ok(());
    }
    let source = source.clone();
    let current: Vec<_> = profile
        .preferences(None)?
        .into_iter()
        .filter(|p| {
            matches!(
                p.status,
                PreferenceStatus::Active | PreferenceStatus::Pending
            )
        })
        .collect();
    let known: Vec<_> = current
        .iter()
        .filter(|p| same(&p.attribute, &candidate.attribute))
        .collect();
    if let Some(p) = known
        .iter()
        .find(|p| same(&p.target, &candidate.target) && p.polarity == candidate.polarity)
    {
        profile.add_source(p.id, &source)?;
        report.reinforced.push(p.id);
        return Ok(());
    }
    // Likes and dislikes are filed under different attributes, so the
    // opposite of a preference is looked for among all of them.
    let contradiction = current.iter().find(|p| {
        same(&p.target, &candidate.target)
            && matches!(
                (p.polarity, candidate.polarity),
                (Polarity::Like, Polarity::Dislike) | (Polarity::Dislike, Polarity::Like)
            )
    });
    let confident = candidate.confidence >= settings.auto_apply_threshold;
    let status = if confident && contradiction.is_none() {
        PreferenceStatus::Active
    } else {
        PreferenceStatus::Pending
    };
    let new = NewPreference {
        attribute: candidate.attribute.clone(),
        target: candidate.target.clone(),
        polarity: candidate.polarity,
        statement: candidate.evidence.clone(),
        confidence: candidate.confidence,
        status,
        source,
        cluster: cluster::build(
            &candidate.attribute,
            candidate.polarity,
            settings.cluster_size,
        ),
    };
    let replaced = known.iter().find(|p| {
        SINGLE_VALUED.contains(&p.attribute.as_str())
            && p.status == PreferenceStatus::Active
            && !same(&p.target, &candidate.target)
    });
    let id = match (replaced, contradiction) {
        (Some(old), None) if status == PreferenceStatus::Active => {
            let id = profile.supersede(old.id, &new)?;
            report.superseded.push((old.id, id));
            id
        }
        _ => profile.add_preference(&new)?,
    };
    if let Some(other) = contradiction {
        profile.audit(
            "created",
            &format!("preference {id}"),
            &format!("contradicts preference {}; waiting for review", other.id),
        )?;
    }
    match status {
        PreferenceStatus::Active => {
            report.learned.push(id);
            if let Some(sha) = model_sha256 {
                report.jobs.push(queue_edit(profile, id, sha)?);
            }
        }
        _ => report.pending.push(id),
    }
    Ok(())
}
