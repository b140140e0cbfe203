//! `imprint eval extract`: how well the extractors read preferences.
//!
//! - Positives with gold labels: every UPQA_1000 `input_attribute`
//!   sentence, with its `attribute_type` and `target`.
//! - Positives without labels: every PrefEval `explicit_preference`
//!   statement (only whether something is extracted can be measured).
//! - Negatives: `assets/eval/non_preferences.txt`, 225 sentences with no
//!   preference of the user (questions, other people, hypotheticals,
//!   assistant-style text, secrets, small talk).
//!
//! Matching rule (documented in docs/RESULTS.md): both strings are
//! lower-cased, split on non-alphanumerics, stripped of stop words, and
//! each word is reduced by a light suffix stemmer ("dancing", "dance" →
//! "danc"). A prediction matches when the token F1 of the two bags is at
//! least 0.5. Precision = matches / sentences with a prediction; recall =
//! matches / labelled sentences. The first candidate of a sentence is the
//! prediction; candidates that carry a secret are dropped first, as the
//! learner drops them.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::upqa_data::{load_items, read_json, DataError};
use crate::learn::extract::{self, match_f1};
use crate::learn::privacy;

const NEGATIVES: &str = include_str!("../../assets/eval/non_preferences.txt");

/// The negative sentences with their category.
pub fn negatives() -> Vec<(String, String)> {
    let mut category = String::from("uncategorised");
    let mut out = Vec::new();
    for line in NEGATIVES.lines() {
        if let Some(c) = line.strip_prefix("## ") {
            category = c.trim().to_string();
        } else if !line.starts_with('#') && !line.trim().is_empty() {
            out.push((category.clone(), line.trim().to_string()));
        }
    }
    out
}

pub const MATCH_THRESHOLD: f64 = 0.5;

#[derive(Debug, Clone, Default, Serialize)]
pub struct Prf {
    pub predicted: usize,
    pub gold: usize,
    pub matched: usize,
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
    /// Mean token F1 over labelled sentences (0 where nothing was predicted).
    pub mean_token_f1: f64,
}

impl Prf {
    fn finish(&mut self, token_f1_sum: f64) {
        self.precision = self.matched as f64 / self.predicted.max(1) as f64;
        self.recall = self.matched as f64 / self.gold.max(1) as f64;
        self.f1 = if self.precision + self.recall > 0.0 {
            2.0 * self.precision * self.recall / (self.precision + self.recall)
        } else {
            0.0
        };
        self.mean_token_f1 = token_f1_sum / self.gold.max(1) as f64;
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Example {
    pub sentence: String,
    pub gold: String,
    pub predicted: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ExtractReport {
    pub upqa_sentences: usize,
    pub target: Prf,
    pub attribute: Prf,
    pub prefeval_statements: usize,
    pub prefeval_extracted: usize,
    pub negatives: usize,
    pub false_positives: usize,
    pub false_positive_rate: f64,
    /// False positives per negative category.
    pub false_positives_by_category: BTreeMap<String, (usize, usize)>,
    pub false_positive_examples: Vec<String>,
    pub secrets_skipped: privacy::SkippedSecrets,
    pub missed_examples: Vec<Example>,
    pub wrong_examples: Vec<Example>,
    /// Whether the model was asked where no rule matched, and how many of
    /// the predictions came from it.
    pub llm: bool,
    pub llm_predictions: usize,
    /// UPQA sentences whose rules give more than one candidate (capture
    /// keeps them all; the scores above count only the first).
    pub several_candidates: usize,
    /// …of which a later candidate matches the gold target the first missed.
    pub later_candidate_matches: usize,
}

#[derive(Debug, Deserialize)]
struct ExplicitPreference {
    preference: String,
}

/// The first candidate of `sentence` that holds no secret: the rules',
/// else (with an engine) the model's.
fn predict(
    sentence: &str,
    skipped: &mut privacy::SkippedSecrets,
    llm: &mut Option<&mut crate::engine::Engine>,
    llm_used: &mut usize,
) -> Result<Option<extract::Candidate>, crate::engine::EngineError> {
    let found = privacy::scan(sentence);
    if !found.is_empty() {
        skipped.record(&found);
        return Ok(None);
    }
    if let Some(c) = extract::extract(sentence).into_iter().next() {
        return Ok(Some(c));
    }
    if let Some(engine) = llm {
        for s in extract::sentences(sentence) {
            if let Some(c) = crate::learn::llm_extract::extract_sentence(engine, s)? {
                *llm_used += 1;
                return Ok(Some(c));
            }
        }
    }
    Ok(None)
}

#[derive(Debug, thiserror::Error)]
pub enum ExtractEvalError {
    #[error(transparent)]
    Data(#[from] DataError),
    #[error(transparent)]
    Engine(#[from] crate::engine::EngineError),
}

/// Runs the measurement. `llm`: also ask the model where no rule matched.
/// `limit`: only the first n UPQA sentences and PrefEval statements.
pub fn run(
    upqa: &Path,
    prefeval_dir: Option<&Path>,
    mut llm: Option<&mut crate::engine::Engine>,
    limit: Option<usize>,
) -> Result<ExtractReport, ExtractEvalError> {
    let mut items = load_items(upqa)?;
    if let Some(n) = limit {
        items.truncate(n);
    }
    let mut llm_used = 0usize;
    let mut skipped = privacy::SkippedSecrets::default();
    let mut target = Prf {
        gold: items.len(),
        ..Default::default()
    };
    let mut attribute = target.clone();
    let (mut target_f1_sum, mut attribute_f1_sum) = (0.0, 0.0);
    let (mut missed, mut wrong) = (Vec::new(), Vec::new());
    let (mut several_candidates, mut later_candidate_matches) = (0, 0);
    for item in &items {
        let all = extract::extract(&item.input_attribute);
        if all.len() > 1 {
            several_candidates += 1;
            if match_f1(&all[0].target, &item.target) < MATCH_THRESHOLD
                && all[1..]
                    .iter()
                    .any(|c| match_f1(&c.target, &item.target) >= MATCH_THRESHOLD)
            {
                later_candidate_matches += 1;
            }
        }
        let Some(c) = predict(&item.input_attribute, &mut skipped, &mut llm, &mut llm_used)? else {
            if missed.len() < 400 {
                missed.push(Example {
                    sentence: item.input_attribute.clone(),
                    gold: format!("{} → {}", item.attribute_type, item.target),
                    predicted: None,
                });
            }
            continue;
        };
        target.predicted += 1;
        attribute.predicted += 1;
        let tf = match_f1(&c.target, &item.target);
        let af = match_f1(&c.attribute, &item.attribute_type);
        target_f1_sum += tf;
        attribute_f1_sum += af;
        target.matched += (tf >= MATCH_THRESHOLD) as usize;
        attribute.matched += (af >= MATCH_THRESHOLD) as usize;
        if tf < MATCH_THRESHOLD && wrong.len() < 200 {
            wrong.push(Example {
                sentence: item.input_attribute.clone(),
                gold: format!("{} → {}", item.attribute_type, item.target),
                predicted: Some(format!("{} → {}", c.attribute, c.target)),
            });
        }
    }
    target.finish(target_f1_sum);
    attribute.finish(attribute_f1_sum);

    let (mut statements, mut extracted) = (0, 0);
    if let Some(dir) = prefeval_dir {
        // PrefEval's own layout keeps the statements one folder down;
        // accept the dataset folder itself too.
        let nested = dir.join("explicit_preference");
        let dir = if nested.is_dir() {
            nested.as_path()
        } else {
            dir
        };
        let mut files: Vec<_> = std::fs::read_dir(dir)
            .map_err(|source| DataError::Io {
                path: dir.to_path_buf(),
                source,
            })?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "json"))
            .collect();
        files.sort();
        for f in files {
            let prefs: Vec<ExplicitPreference> = read_json(&f)?;
            for p in prefs {
                if limit.is_some_and(|n| statements >= n) {
                    break;
                }
                statements += 1;
                extracted += predict(&p.preference, &mut skipped, &mut llm, &mut llm_used)?
                    .is_some() as usize;
            }
        }
    }

    let negatives = negatives();
    let mut by_category: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    let mut fp_examples = Vec::new();
    let mut fp = 0;
    let mut seen = HashSet::new();
    for (category, sentence) in &negatives {
        if !seen.insert(sentence.clone()) {
            continue;
        }
        let entry = by_category.entry(category.clone()).or_default();
        entry.1 += 1;
        if let Some(c) = predict(sentence, &mut skipped, &mut llm, &mut llm_used)? {
            fp += 1;
            entry.0 += 1;
            fp_examples.push(format!("{sentence} → {} → {}", c.attribute, c.target));
        }
    }
    Ok(ExtractReport {
        upqa_sentences: items.len(),
        target,
        attribute,
        prefeval_statements: statements,
        prefeval_extracted: extracted,
        negatives: seen.len(),
        false_positives: fp,
        false_positive_rate: fp as f64 / seen.len().max(1) as f64,
        false_positives_by_category: by_category,
        false_positive_examples: fp_examples,
        secrets_skipped: skipped,
        missed_examples: missed,
        wrong_examples: wrong,
        llm: llm.is_some(),
        llm_predictions: llm_used,
        several_candidates,
        later_candidate_matches,
    })
}

impl ExtractReport {
    pub fn markdown(&self) -> String {
        let row = |name: &str, p: &Prf| {
            format!(
                "| {name} | {} / {} | {:.3} | {:.3} | {:.3} | {:.3} |\n",
                p.matched, p.predicted, p.precision, p.recall, p.f1, p.mean_token_f1
            )
        };
        let mut md = format!(
            "## Extraction ({})\n\nUPQA_1000 sentences: {}\n\n| field | matched / predicted | precision | recall | F1 | mean token F1 |\n|---|---|---|---|---|---|\n",
            if self.llm {
                format!("rules, then the model: {} predictions from the model", self.llm_predictions)
            } else {
                "rules only".to_string()
            },
            self.upqa_sentences
        );
        md += &row("target", &self.target);
        md += &row("attribute", &self.attribute);
        md += &format!(
            "\nThe first candidate of each sentence is scored. {} sentences state more than one; in {} of them a later candidate matches the gold target the first one missed.\n",
            self.several_candidates, self.later_candidate_matches
        );
        md += &format!(
            "\nPrefEval explicit statements with a candidate: {} / {} ({:.1}%)\n\nNegatives: {} false positives of {} ({:.1}%)\n\n| category | false positives |\n|---|---|\n",
            self.prefeval_extracted,
            self.prefeval_statements,
            100.0 * self.prefeval_extracted as f64 / self.prefeval_statements.max(1) as f64,
            self.false_positives,
            self.negatives,
            100.0 * self.false_positive_rate
        );
        for (c, (fp, n)) in &self.false_positives_by_category {
            md += &format!("| {c} | {fp} / {n} |\n");
        }
        md += &format!(
            "\nSecrets skipped (by kind, no content): {}\n",
            if self.secrets_skipped.total() == 0 {
                "none".to_string()
            } else {
                self.secrets_skipped.describe()
            }
        );
        md
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matching_rule() {
        assert!(match_f1("dance at the club", "Dancing at clubs") >= 0.99);
        assert!(match_f1("advertising", "Advertising") >= 0.99);
        assert_eq!(match_f1("chess", "Dancing at clubs"), 0.0);
        assert!(match_f1("two dogs", "Two dogs and one cat") >= MATCH_THRESHOLD);
    }

    #[test]
    fn the_negative_set_is_big_enough_and_categorised() {
        let n = negatives();
        assert!(n.len() >= 200, "{}", n.len());
        let cats: HashSet<&str> = n.iter().map(|(c, _)| c.as_str()).collect();
        for c in [
            "questions",
            "other people",
            "hypotheticals",
            "assistant-style text",
            "secrets",
            "small talk",
        ] {
            assert!(cats.contains(c), "{c}");
        }
    }
}
