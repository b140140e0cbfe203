//! Locality: how much a set of edits changes what the model does elsewhere.
//!
//! Three measurements, each taken once on the model before the edits and
//! once with the edits' adapter attached:
//! - the greedy answers to a fixed set of 100+ unrelated prompts
//!   (`assets/eval/unrelated_prompts.txt`); an answer counts as unchanged only
//!   if its text is identical;
//! - accuracy on 100 simple factual questions (`general_knowledge.tsv`);
//! - perplexity of a held-out text (`heldout.txt`).
//!
//! Personal prompts about an attribute that the edits teach are left out:
//! changing those is the point of an edit.

use serde::{Deserialize, Serialize};

use super::scoring::contains_target;
use crate::editor::prompts::same_attribute;
use crate::editor::verify::{agreement, answer, probe};
use crate::engine::{Engine, EngineError};

const UNRELATED: &str = include_str!("../../assets/eval/unrelated_prompts.txt");
const KNOWLEDGE: &str = include_str!("../../assets/eval/general_knowledge.tsv");
const HELDOUT: &str = include_str!("../../assets/eval/heldout.txt");

/// Tokens compared per unrelated answer (the same length the edit gate uses).
pub const ANSWER_TOKENS: u32 = 16;
/// Tokens generated per factual answer.
const KNOWLEDGE_TOKENS: u32 = 24;

fn lines(text: &str) -> impl Iterator<Item = &str> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
}

/// `(attribute, prompt)` pairs of the unrelated set.
pub fn unrelated_prompts() -> Vec<(String, String)> {
    lines(UNRELATED)
        .filter_map(|l| l.split_once('\t'))
        .map(|(a, q)| (a.trim().to_string(), q.trim().to_string()))
        .collect()
}

/// `(question, accepted answers)` of the general-knowledge set.
pub fn knowledge_questions() -> Vec<(String, Vec<String>)> {
    lines(KNOWLEDGE)
        .filter_map(|l| l.split_once('\t'))
        .map(|(q, a)| {
            (
                q.trim().to_string(),
                a.split('|').map(|s| s.trim().to_string()).collect(),
            )
        })
        .collect()
}

/// What the model does on the locality sets at one moment.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Snapshot {
    /// Greedy answers to the unrelated prompts, in file order.
    pub answers: Vec<String>,
    /// Their tokens.
    pub answer_tokens: Vec<Vec<i32>>,
    /// With the reference snapshot's answer fed in (teacher forcing), the
    /// model's argmax at each answer position. Greedy text flips on any near
    /// tie and then diverges; this counts per token, so one flip costs one.
    pub teacher_argmax: Vec<Vec<i32>>,
    /// Whether each factual question was answered correctly.
    pub knowledge_correct: Vec<bool>,
    /// Perplexity of the held-out text.
    pub perplexity: f64,
}

impl Snapshot {
    /// Measures the engine as it is. `reference` (the base model's snapshot)
    /// supplies the answers to teacher-force; without it the model's own.
    pub fn take(
        engine: &mut Engine,
        system_prompt: &str,
        reference: Option<&Snapshot>,
    ) -> Result<Self, EngineError> {
        let mut answers = Vec::new();
        let mut answer_tokens = Vec::new();
        let mut teacher_argmax = Vec::new();
        for (i, (_, q)) in unrelated_prompts().iter().enumerate() {
            let reference = reference.and_then(|r| r.answer_tokens.get(i));
            let p = probe(
                engine,
                system_prompt,
                q,
                ANSWER_TOKENS,
                reference.map(Vec::as_slice),
            )?;
            teacher_argmax.push(p.argmax);
            answers.push(p.text);
            answer_tokens.push(p.tokens);
        }
        let knowledge_correct = knowledge_questions()
            .iter()
            .map(|(q, accepted)| {
                let a = answer(engine, system_prompt, q, KNOWLEDGE_TOKENS)?;
                Ok(accepted.iter().any(|t| contains_target(&a, t)))
            })
            .collect::<Result<Vec<_>, EngineError>>()?;
        Ok(Self {
            answers,
            answer_tokens,
            teacher_argmax,
            knowledge_correct,
            perplexity: perplexity(engine, HELDOUT)?,
        })
    }
}

/// log softmax(`logits`)[`token`], computed stably in f64.
pub fn log_prob(logits: &[f32], token: i32) -> f64 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let log_sum = logits
        .iter()
        .map(|&l| f64::from(l - max).exp())
        .sum::<f64>()
        .ln();
    let picked = usize::try_from(token)
        .ok()
        .and_then(|t| logits.get(t))
        .copied()
        .unwrap_or(f32::NEG_INFINITY);
    f64::from(picked - max) - log_sum
}

/// exp(mean negative log-likelihood) of `text`'s tokens, each predicted from
/// the ones before it.
pub fn perplexity(engine: &mut Engine, text: &str) -> Result<f64, EngineError> {
    let tokens = engine.tokenize_plain(text);
    if tokens.len() < 2 {
        return Ok(f64::NAN);
    }
    let logits = engine.logits_all(&tokens)?;
    let nll: f64 = logits
        .iter()
        .zip(&tokens[1..])
        .map(|(row, &next)| -log_prob(row, next))
        .sum();
    Ok((nll / (tokens.len() - 1) as f64).exp())
}

/// Before/after comparison.
#[derive(Debug, Clone, Serialize)]
pub struct LocalityReport {
    /// Unrelated prompts compared (those about edited attributes left out).
    pub unrelated_total: usize,
    pub unrelated_unchanged: usize,
    /// Answer tokens of those prompts whose teacher-forced argmax is the
    /// same before and after.
    pub tokens_total: usize,
    pub tokens_same: usize,
    pub knowledge_total: usize,
    pub knowledge_before: usize,
    pub knowledge_after: usize,
    pub perplexity_before: f64,
    pub perplexity_after: f64,
    /// Some changed answers, `prompt → before ⟶ after`, for reading.
    pub changed_examples: Vec<String>,
}

impl LocalityReport {
    pub fn unchanged_share(&self) -> f64 {
        self.unrelated_unchanged as f64 / self.unrelated_total.max(1) as f64
    }

    pub fn token_agreement(&self) -> f64 {
        self.tokens_same as f64 / self.tokens_total.max(1) as f64
    }

    /// Several profiles' reports as one: counts summed, perplexities
    /// averaged. None for none.
    pub fn pooled(reports: Vec<LocalityReport>) -> Option<LocalityReport> {
        let n = reports.len();
        let mut it = reports.into_iter();
        let mut all = it.next()?;
        for r in it {
            all.unrelated_total += r.unrelated_total;
            all.unrelated_unchanged += r.unrelated_unchanged;
            all.tokens_total += r.tokens_total;
            all.tokens_same += r.tokens_same;
            all.knowledge_total += r.knowledge_total;
            all.knowledge_before += r.knowledge_before;
            all.knowledge_after += r.knowledge_after;
            all.perplexity_before += r.perplexity_before;
            all.perplexity_after += r.perplexity_after;
            all.changed_examples.extend(r.changed_examples);
        }
        all.perplexity_before /= n as f64;
        all.perplexity_after /= n as f64;
        all.changed_examples.truncate(40);
        Some(all)
    }

    pub fn perplexity_change(&self) -> f64 {
        self.perplexity_after / self.perplexity_before - 1.0
    }

    /// Compares two snapshots; `edited_attributes` are left out of the
    /// unrelated set.
    pub fn compare(before: &Snapshot, after: &Snapshot, edited_attributes: &[String]) -> Self {
        let prompts = unrelated_prompts();
        let mut total = 0;
        let mut unchanged = 0;
        let mut changed_examples = Vec::new();
        let (mut tokens_total, mut tokens_same) = (0, 0);
        for (i, (((attribute, prompt), b), a)) in prompts
            .iter()
            .zip(&before.answers)
            .zip(&after.answers)
            .enumerate()
        {
            if attribute != "general"
                && edited_attributes
                    .iter()
                    .any(|e| same_attribute(e, attribute))
            {
                continue;
            }
            total += 1;
            if let (Some(tb), Some(ta)) =
                (before.teacher_argmax.get(i), after.teacher_argmax.get(i))
            {
                let (same, compared) = agreement(tb, ta);
                tokens_total += compared;
                tokens_same += same;
            }
            if b.trim() == a.trim() {
                unchanged += 1;
            } else if changed_examples.len() < 20 {
                changed_examples.push(format!("{prompt} → {} ⟶ {}", b.trim(), a.trim()));
            }
        }
        let count = |v: &[bool]| v.iter().filter(|&&c| c).count();
        Self {
            unrelated_total: total,
            unrelated_unchanged: unchanged,
            tokens_total,
            tokens_same,
            knowledge_total: before.knowledge_correct.len(),
            knowledge_before: count(&before.knowledge_correct),
            knowledge_after: count(&after.knowledge_correct),
            perplexity_before: before.perplexity,
            perplexity_after: after.perplexity,
            changed_examples,
        }
    }

    pub fn markdown(&self) -> String {
        format!(
            "| unrelated answers unchanged | their tokens unchanged (teacher-forced) | general knowledge before → after | held-out perplexity before → after |\n| --- | --- | --- | --- |\n| {}/{} ({:.1} %) | {:.1} % of {} | {}/{} → {}/{} | {:.3} → {:.3} ({:+.2} %) |\n",
            self.unrelated_unchanged,
            self.unrelated_total,
            self.unchanged_share() * 100.0,
            self.token_agreement() * 100.0,
            self.tokens_total,
            self.knowledge_before,
            self.knowledge_total,
            self.knowledge_after,
            self.knowledge_total,
            self.perplexity_before,
            self.perplexity_after,
            self.perplexity_change() * 100.0
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(unchanged: usize, ppl_after: f64) -> LocalityReport {
        LocalityReport {
            unrelated_total: 100,
            unrelated_unchanged: unchanged,
            tokens_total: 1000,
            tokens_same: 900,
            knowledge_total: 100,
            knowledge_before: 58,
            knowledge_after: 55,
            perplexity_before: 20.0,
            perplexity_after: ppl_after,
            changed_examples: vec!["a → b ⟶ c".into()],
        }
    }

    #[test]
    fn pooled_reports_sum_counts_and_average_perplexity() {
        assert!(LocalityReport::pooled(Vec::new()).is_none());
        let all = LocalityReport::pooled(vec![report(40, 21.0), report(60, 19.0)]).unwrap();
        assert_eq!((all.unrelated_unchanged, all.unrelated_total), (100, 200));
        assert_eq!(
            (
                all.knowledge_before,
                all.knowledge_after,
                all.knowledge_total
            ),
            (116, 110, 200)
        );
        assert_eq!(all.tokens_same, 1800);
        assert!((all.perplexity_change()).abs() < 1e-12);
        assert_eq!(all.changed_examples.len(), 2);
    }
    use crate::editor::prompts;

    #[test]
    fn sets_are_large_enough_and_disjoint_from_everything_the_editor_trains_or_probes() {
        let unrelated = unrelated_prompts();
        assert!(
            unrelated.len() >= 100,
            "{} unrelated prompts",
            unrelated.len()
        );
        assert!(knowledge_questions().len() >= 100);
        assert!(knowledge_questions().iter().all(|(_, a)| !a.is_empty()));
        let mut editor_side: Vec<String> = prompts::general_anchors()
            .into_iter()
            .chain(prompts::personal_anchors())
            .chain(prompts::locality_probes())
            .map(|p| p.question)
            .collect();
        editor_side.extend(prompts::corpus_prompts());
        for (_, p) in &unrelated {
            assert!(!editor_side.contains(p), "{p:?} is also an editor prompt");
        }
    }

    fn snapshot(answers: &[&str], knowledge: &[bool], perplexity: f64) -> Snapshot {
        Snapshot {
            answers: answers.iter().map(|s| s.to_string()).collect(),
            answer_tokens: vec![vec![1, 2]; answers.len()],
            teacher_argmax: answers
                .iter()
                .map(|a| vec![1, if a.starts_with("answer") { 2 } else { 3 }])
                .collect(),
            knowledge_correct: knowledge.to_vec(),
            perplexity,
        }
    }

    #[test]
    fn log_prob_is_a_log_softmax() {
        let lp: Vec<f64> = (0..3).map(|t| log_prob(&[1.0, 2.0, 3.0], t)).collect();
        let total: f64 = lp.iter().map(|l| l.exp()).sum();
        assert!((total - 1.0).abs() < 1e-9);
        assert!(lp[2] > lp[1] && lp[1] > lp[0]);
        assert_eq!(log_prob(&[1.0], 5), f64::NEG_INFINITY);
    }

    #[test]
    fn compare_counts_changes_and_skips_edited_attributes() {
        let n = unrelated_prompts().len();
        let before: Vec<String> = (0..n).map(|i| format!("answer {i}")).collect();
        let mut after = before.clone();
        // Change one general answer and every personal one.
        after[0] = "something else".into();
        let personal: Vec<usize> = unrelated_prompts()
            .iter()
            .enumerate()
            .filter(|(_, (a, _))| a == "music")
            .map(|(i, _)| i)
            .collect();
        for &i in &personal {
            after[i] = "changed".into();
        }
        fn refs(v: &[String]) -> Vec<&str> {
            v.iter().map(String::as_str).collect()
        }
        let b = snapshot(&refs(&before), &[true, true, false], 10.0);
        let a = snapshot(&refs(&after), &[true, false, false], 10.5);
        let r = LocalityReport::compare(&b, &a, &["music".to_string()]);
        assert_eq!(r.unrelated_total, n - personal.len());
        assert_eq!(r.unrelated_unchanged, n - personal.len() - 1);
        assert_eq!((r.knowledge_before, r.knowledge_after), (2, 1));
        assert!((r.perplexity_change() - 0.05).abs() < 1e-9);
        // One changed general answer: one of its two teacher-forced tokens.
        assert_eq!(r.tokens_total, 2 * r.unrelated_total);
        assert_eq!(r.tokens_same, r.tokens_total - 1);
        assert!(r.markdown().contains("+5.00 %"));
    }
}
