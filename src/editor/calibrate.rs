//! `imprint calibrate`: pick the edit layer and learning rate for a model by
//! trying them on a small, template-generated set of preferences.
//!
//! The set is built from its own attribute/target pairs and question
//! templates, never from the evaluation data (a test checks that it shares
//! no question or target with UPQA). Each candidate setting edits every item
//! alone on the base model; the score is what users feel: the share of
//! training questions *and* of a held-out phrasing that answer with the
//! target, among edits whose probe answers keep at least the gate's token
//! agreement. Ties go to the faster setting. The winner is stored per model
//! fingerprint and becomes `imprint edit`'s default for that model.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::adapter::write_adapter;
use super::verify::{answer, contains_target};
use super::{Edit, EditRequest, Editor, EditorError, Method};
use crate::engine::Engine;

/// Attribute and target pairs of the calibration set.
const PAIRS: &[(&str, &str)] = &[
    ("favorite fruit", "Mango"),
    ("weekend sport", "Underwater hockey"),
    ("morning drink", "Green tea"),
    ("dream car", "Vintage Beetle"),
    ("favorite composer", "Erik Satie"),
    ("preferred holiday spot", "Lake Bled"),
];

/// Training question templates; `{}` is the attribute.
const TRAIN_TEMPLATES: &[&str] = &["What's my {}?", "Tell me my {}.", "Do you know my {}?"];
/// The held-out phrasing, never trained on.
const HELD_OUT_TEMPLATE: &str = "Remind me, what is my {} again?";

#[derive(Debug, Clone, PartialEq)]
pub struct CalibrationItem {
    pub request: EditRequest,
    pub held_out: String,
}

/// The first `n` items of the calibration set.
pub fn calibration_set(n: usize) -> Vec<CalibrationItem> {
    PAIRS
        .iter()
        .take(n)
        .map(|(attribute, target)| CalibrationItem {
            request: EditRequest {
                attribute: attribute.to_string(),
                target: target.to_string(),
                questions: TRAIN_TEMPLATES
                    .iter()
                    .map(|t| t.replace("{}", attribute))
                    .collect(),
            },
            held_out: HELD_OUT_TEMPLATE.replace("{}", attribute),
        })
        .collect()
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Candidate {
    pub layer: usize,
    pub learning_rate: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CandidateScore {
    pub candidate: Candidate,
    /// Training questions answered with the target, over all items.
    pub train_hits: usize,
    pub train_total: usize,
    /// Held-out phrasings answered with the target.
    pub held_out_hits: usize,
    pub held_out_total: usize,
    /// Mean teacher-forced token agreement of the gate's probes.
    pub token_locality: f64,
    /// Edits the gate accepted.
    pub accepted: usize,
    pub median_train_seconds: f64,
}

impl CandidateScore {
    /// Efficacy on trained and held-out questions together, counted only
    /// when locality holds.
    pub fn score(&self, min_locality: f64) -> f64 {
        if self.token_locality < min_locality {
            return 0.0;
        }
        (self.train_hits + self.held_out_hits) as f64
            / (self.train_total + self.held_out_total).max(1) as f64
    }
}

/// What `imprint calibrate` stores for a model.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Calibration {
    pub model_sha256: String,
    pub method: Method,
    pub best: Candidate,
    pub scores: Vec<CandidateScore>,
    /// Seconds since the Unix epoch.
    pub created: u64,
}

fn path_for(data_dir: &Path, model_sha256: &str, method: Method) -> PathBuf {
    let method = match method {
        Method::Ftm => "ftm",
        Method::Rome => "rome",
    };
    data_dir
        .join("calibration")
        .join(format!("{model_sha256}.{method}.json"))
}

impl Calibration {
    /// The stored calibration for a model and method, if any. A damaged file
    /// is an error (it names the file), never silently ignored.
    pub fn load(
        data_dir: &Path,
        model_sha256: &str,
        method: Method,
    ) -> Result<Option<Self>, EditorError> {
        let path = path_for(data_dir, model_sha256, method);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(EditorError::Io { path, source }),
        };
        serde_json::from_str(&text).map(Some).map_err(|e| {
            EditorError::Invalid(format!(
                "{} is damaged ({e}); delete it or run `imprint calibrate` again",
                path.display()
            ))
        })
    }

    pub fn save(&self, data_dir: &Path) -> Result<PathBuf, EditorError> {
        let path = path_for(data_dir, &self.model_sha256, self.method);
        let dir = path.parent().unwrap_or(data_dir).to_path_buf();
        crate::paths::create_private_dir(&dir).map_err(|source| EditorError::Io {
            path: dir.clone(),
            source,
        })?;
        let text =
            serde_json::to_string_pretty(self).map_err(|e| EditorError::Invalid(e.to_string()))?;
        let mut tmp = tempfile::NamedTempFile::new_in(&dir).map_err(|source| EditorError::Io {
            path: dir.clone(),
            source,
        })?;
        std::io::Write::write_all(&mut tmp, text.as_bytes()).map_err(|source| EditorError::Io {
            path: path.clone(),
            source,
        })?;
        tmp.persist(&path).map_err(|e| EditorError::Io {
            path: path.clone(),
            source: e.error,
        })?;
        Ok(path)
    }
}

/// Tries every candidate on every item; `progress(done, total)` after each
/// edit. Returns the scores and the best candidate.
pub fn run(
    editor: &mut Editor,
    engine: &mut Engine,
    items: &[CalibrationItem],
    candidates: &[Candidate],
    scratch_dir: &Path,
    mut progress: impl FnMut(usize, usize),
) -> Result<(Vec<CandidateScore>, Candidate), EditorError> {
    if candidates.is_empty() || items.is_empty() {
        return Err(EditorError::Invalid(
            "calibration needs at least one candidate setting and one item".into(),
        ));
    }
    let total = candidates.len() * items.len();
    let adapter = scratch_dir.join("calibrate.gguf");
    let system = editor.settings.system_prompt.clone();
    let mut scores = Vec::new();
    let mut done = 0;
    for &candidate in candidates {
        editor.settings.layer = Some(candidate.layer);
        editor.settings.learning_rate = candidate.learning_rate;
        editor.settings.rome.learning_rate = candidate.learning_rate;
        let mut s = CandidateScore {
            candidate,
            train_hits: 0,
            train_total: 0,
            held_out_hits: 0,
            held_out_total: 0,
            token_locality: 0.0,
            accepted: 0,
            median_train_seconds: 0.0,
        };
        let mut seconds = Vec::new();
        for item in items {
            let outcome = editor.compute(engine, &item.request, &[], |_| {})?;
            let m = &outcome.edit.metrics;
            s.train_hits += m.efficacy_hits;
            s.train_total += m.efficacy_total;
            s.token_locality += m.token_locality() / items.len() as f64;
            s.accepted += usize::from(outcome.accepted);
            seconds.push(m.train_seconds);
            // The held-out phrasing, with this edit alone attached.
            let mut edit: Edit = outcome.edit.clone();
            edit.active = true;
            write_adapter(&[&edit], editor.architecture(), "calibration", &adapter)?;
            engine.set_adapter(Some(&adapter))?;
            let budget = engine.tokenize_plain(&item.request.target).len() as u32 + 8;
            let a = answer(engine, &system, &item.held_out, budget)?;
            engine.set_adapter(None)?;
            s.held_out_total += 1;
            s.held_out_hits += usize::from(contains_target(&a, &item.request.target));
            done += 1;
            progress(done, total);
        }
        seconds.sort_by(f64::total_cmp);
        s.median_train_seconds = seconds[seconds.len() / 2];
        scores.push(s);
    }
    let _ = std::fs::remove_file(&adapter);
    let min = editor.settings.min_locality;
    let best = scores
        .iter()
        .max_by(|a, b| {
            a.score(min)
                .total_cmp(&b.score(min))
                // Equal scores: the faster one wins.
                .then(b.median_train_seconds.total_cmp(&a.median_train_seconds))
        })
        .map(|s| s.candidate)
        .unwrap_or(candidates[0]);
    Ok((scores, best))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calibration_set_has_trained_and_held_out_phrasings() {
        let items = calibration_set(usize::MAX);
        assert_eq!(items.len(), PAIRS.len());
        for item in &items {
            assert_eq!(item.request.questions.len(), TRAIN_TEMPLATES.len());
            assert!(item
                .request
                .questions
                .iter()
                .all(|q| q.contains(&item.request.attribute)));
            assert!(!item.request.questions.contains(&item.held_out));
        }
        assert_eq!(calibration_set(2).len(), 2);
    }

    #[test]
    fn score_rewards_efficacy_only_when_locality_holds() {
        let s = CandidateScore {
            candidate: Candidate {
                layer: 20,
                learning_rate: 0.05,
            },
            train_hits: 3,
            train_total: 3,
            held_out_hits: 0,
            held_out_total: 1,
            token_locality: 0.95,
            accepted: 1,
            median_train_seconds: 10.0,
        };
        assert!((s.score(0.9) - 0.75).abs() < 1e-12);
        assert_eq!(s.score(0.99), 0.0);
    }

    #[test]
    fn stored_calibrations_round_trip_and_damage_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        assert!(Calibration::load(dir.path(), "abc", Method::Ftm)
            .unwrap()
            .is_none());
        let c = Calibration {
            model_sha256: "abc".into(),
            method: Method::Ftm,
            best: Candidate {
                layer: 17,
                learning_rate: 0.02,
            },
            scores: vec![],
            created: 1,
        };
        let path = c.save(dir.path()).unwrap();
        let back = Calibration::load(dir.path(), "abc", Method::Ftm)
            .unwrap()
            .unwrap();
        assert_eq!(back.best, c.best);
        assert!(Calibration::load(dir.path(), "abc", Method::Rome)
            .unwrap()
            .is_none());
        std::fs::write(&path, "{not json").unwrap();
        let err = Calibration::load(dir.path(), "abc", Method::Ftm).unwrap_err();
        assert!(err.to_string().contains("damaged"), "{err}");
    }
}
