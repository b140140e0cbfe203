//! `imprint eval prefeval`: does the model still honour a stated preference
//! after N distractor turns?
//!
//! Items are PrefEval's `prefeval_pro_balanced.json` entries (a stated
//! preference, a later question whose generic answer would violate it, and a
//! short `target` naming what the answer should respect). Each method makes
//! the preference known in its own way (edits, a system prompt, or the
//! conversation's first turn), then the question is asked after 0, 2, 4, …
//! real distractor turns.
//!
//! An answer *acknowledges* the preference by the rule in [`acknowledges`].

use std::ops::ControlFlow;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::retrieval::Retrieval;
use super::upqa::{distractor_pairs, distractor_turns, ACKNOWLEDGEMENT};
use crate::editor::adapter::write_adapter;
use crate::editor::{Edit, EditRequest, Editor, EditorError};
use crate::engine::{ChatMessage, Engine, GenerationParams};

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct PrefEvalItem {
    pub topic: String,
    pub preference: String,
    pub question: String,
    pub subject: String,
    pub target: String,
}

pub fn load_items(path: &Path) -> Result<Vec<PrefEvalItem>, EditorError> {
    let text = std::fs::read_to_string(path).map_err(|source| EditorError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|e| {
        EditorError::Invalid(format!(
            "{} is not a PrefEval item file (line {}, column {}): {e}. Expected a list of {{topic, preference, question, subject, target}}.",
            path.display(),
            e.line(),
            e.column()
        ))
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum PrefMethod {
    /// The base model: how often the preference is honoured by chance.
    None,
    /// The preference in the system prompt.
    Prompt,
    /// The preference as the conversation's first user turn (PrefEval's
    /// setting), acknowledged by the assistant.
    PromptTurn,
    /// Retrieval: the top-3 of all the items' preferences by embedding
    /// similarity to the question, in the system prompt.
    Rag,
    /// Every item's preference as an FT-M edit, all in one profile.
    Ftm,
}

const STOPWORDS: &[&str] = &[
    "about", "after", "also", "because", "been", "being", "from", "have", "into", "like", "more",
    "most", "only", "other", "over", "some", "such", "than", "that", "their", "them", "then",
    "there", "these", "they", "this", "very", "what", "when", "which", "while", "with", "would",
    "your", "based", "free", "friendly", "options", "option", "focused",
];

/// Phrases with which an answer refers back to what the user said.
const REFERENCE_PHRASES: &[&str] = &[
    "you mentioned",
    "you prefer",
    "your preference",
    "you dislike",
    "you don't like",
    "you do not like",
    "you mentioned that",
    "since you",
    "as you like",
    "you'd prefer",
    "you would prefer",
];

/// The words of `text` that carry meaning: at least four letters, not a
/// stopword, cut to a five-letter stem so "certification"/"certified" match.
fn key_terms(text: &str) -> Vec<String> {
    text.split(|c: char| !c.is_alphanumeric())
        .map(str::to_lowercase)
        .filter(|w| w.len() >= 4 && !STOPWORDS.contains(&w.as_str()))
        .map(|w| w.chars().take(5).collect())
        .collect()
}

/// The acknowledgment rule. An answer acknowledges the preference when
/// 1. it contains the target (case-insensitive), or
/// 2. it contains every key term of the target (five-letter stems of its
///    words of four or more letters, minus stopwords; "non-computer-based" →
///    "compu"), or
/// 3. it refers back to the user's stated preference ("you mentioned",
///    "since you", "your preference", …).
///
/// It is generous on purpose (a base model that happens to mention the
/// target word counts), which is why `none` is reported as the floor.
pub fn acknowledges(answer: &str, target: &str) -> bool {
    let lower = answer.to_lowercase();
    if lower.contains(&target.trim().to_lowercase()) {
        return true;
    }
    let answer_stems: Vec<String> = key_terms(answer);
    let target_terms = key_terms(target);
    if !target_terms.is_empty() && target_terms.iter().all(|t| answer_stems.contains(t)) {
        return true;
    }
    REFERENCE_PHRASES.iter().any(|p| lower.contains(p))
}

#[derive(Debug, Clone, Serialize)]
pub struct PrefAnswer {
    pub item: usize,
    pub turns: usize,
    pub answer: String,
    pub acknowledged: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct PrefRate {
    pub turns: usize,
    pub acknowledged: usize,
    pub total: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct PrefEvalReport {
    pub data: String,
    pub method: PrefMethod,
    pub model_sha256: String,
    pub items: usize,
    pub max_new_tokens: u32,
    pub rule: String,
    pub edits_accepted: Option<usize>,
    /// ftm: "the test question" or "held-out questions".
    pub trained_on: Option<String>,
    pub rates: Vec<PrefRate>,
    pub answers: Vec<PrefAnswer>,
}

pub struct PrefEvalRun<'a> {
    pub data_path: &'a Path,
    pub items: &'a [PrefEvalItem],
    pub method: PrefMethod,
    pub turns: &'a [usize],
    pub system_prompt: &'a str,
    pub model_sha256: &'a str,
    pub distractors_path: &'a Path,
    pub adapter_dir: &'a Path,
    pub max_new_tokens: u32,
    /// `ftm`: train each edit on the very question it is then asked
    /// (measures recall of a trained answer, not preference following);
    /// by default the edit is trained on questions written from the item's
    /// subject, and the PrefEval question stays unseen.
    pub train_on_test_question: bool,
}

/// The questions an `ftm` edit for `item` is trained on when the test
/// question is held out: generic ones about the item's subject.
pub fn held_out_questions(item: &PrefEvalItem) -> Vec<String> {
    vec![
        format!("What kind of {} do I prefer?", item.subject),
        format!(
            "What should you keep in mind when you recommend {} to me?",
            item.subject
        ),
    ]
}

impl PrefEvalRun<'_> {
    pub fn run(
        &self,
        engine: &mut Engine,
        editor: Option<&mut Editor>,
        mut progress: impl FnMut(usize, usize),
    ) -> Result<PrefEvalReport, EditorError> {
        let distractors = distractor_pairs(self.distractors_path)?;
        let n = self.items.len();
        let total = n * self.turns.len() + if self.method == PrefMethod::Ftm { n } else { 0 };
        let mut done = 0;
        engine.set_adapter(None)?;
        let adapter = self.adapter_dir.join("prefeval.gguf");
        let mut edits_accepted = None;
        if self.method == PrefMethod::Ftm {
            let editor =
                editor.ok_or_else(|| EditorError::Invalid("ftm needs the editor".into()))?;
            let mut active: Vec<Edit> = Vec::new();
            for item in self.items {
                let request = EditRequest {
                    attribute: item.subject.clone(),
                    target: item.target.clone(),
                    questions: if self.train_on_test_question {
                        vec![item.question.clone()]
                    } else {
                        held_out_questions(item)
                    },
                };
                let outcome = editor.compute(engine, &request, &active, |_| {})?;
                if outcome.accepted {
                    active.push(outcome.edit);
                }
                done += 1;
                progress(done, total);
            }
            edits_accepted = Some(active.len());
            let refs: Vec<&Edit> = active.iter().collect();
            let has = write_adapter(&refs, editor.architecture(), self.model_sha256, &adapter)?;
            engine.set_adapter(has.then_some(adapter.as_path()))?;
        }
        // Retrieval looks at the question only (not the distractor turns),
        // so each item's system prompt is the same at every turn count.
        let retrieved: Option<Vec<String>> = if self.method == PrefMethod::Rag {
            let store = Retrieval::new(
                engine,
                self.items.iter().map(|i| i.preference.clone()).collect(),
            )?;
            Some(
                self.items
                    .iter()
                    .map(|item| store.system_prompt(engine, self.system_prompt, &item.question))
                    .collect::<Result<_, _>>()?,
            )
        } else {
            None
        };
        let mut answers = Vec::new();
        let mut rates = Vec::new();
        for &turns in self.turns {
            let mut acknowledged = 0;
            for (i, item) in self.items.iter().enumerate() {
                let system = match (self.method, &retrieved) {
                    (PrefMethod::Prompt, _) => format!(
                        "{}\nWhat you know about the user: {}",
                        self.system_prompt, item.preference
                    ),
                    (PrefMethod::Rag, Some(prompts)) => prompts[i].clone(),
                    _ => self.system_prompt.to_string(),
                };
                let mut messages = vec![ChatMessage::system(system)];
                if self.method == PrefMethod::PromptTurn {
                    messages.push(ChatMessage::user(&item.preference));
                    messages.push(ChatMessage::assistant(ACKNOWLEDGEMENT));
                }
                messages.extend(distractor_turns(&distractors, i, turns));
                messages.push(ChatMessage::user(&item.question));
                let answer = engine
                    .chat(
                        &messages,
                        &GenerationParams::greedy(self.max_new_tokens),
                        &mut |_| ControlFlow::Continue(()),
                    )?
                    .text;
                let ok = acknowledges(&answer, &item.target);
                acknowledged += usize::from(ok);
                answers.push(PrefAnswer {
                    item: i,
                    turns,
                    answer,
                    acknowledged: ok,
                });
                done += 1;
                progress(done, total);
            }
            rates.push(PrefRate {
                turns,
                acknowledged,
                total: n,
            });
        }
        engine.set_adapter(None)?;
        let _ = std::fs::remove_file(&adapter);
        Ok(PrefEvalReport {
            data: self.data_path.display().to_string(),
            method: self.method,
            model_sha256: self.model_sha256.to_string(),
            items: n,
            max_new_tokens: self.max_new_tokens,
            rule: "target substring, or all of the target's key-term stems, or a phrase referring to the user's stated preference".into(),
            edits_accepted,
            trained_on: (self.method == PrefMethod::Ftm).then(|| {
                if self.train_on_test_question {
                    "the test question".to_string()
                } else {
                    "held-out questions".to_string()
                }
            }),
            rates,
            answers,
        })
    }
}

pub fn markdown(report: &PrefEvalReport) -> String {
    let method = serde_json::to_string(&report.method).unwrap_or_default();
    let mut out = format!(
        "# PrefEval acknowledgment: {} ({} items)\n\nModel sha256 {}…; greedy, {} new tokens; rule: {}.\n\n| turns | acknowledged |\n| --- | --- |\n",
        method.trim_matches('"'),
        report.items,
        report.model_sha256.get(..12).unwrap_or(&report.model_sha256),
        report.max_new_tokens,
        report.rule
    );
    for r in &report.rates {
        out.push_str(&format!(
            "| {} | {}/{} ({:.0} %) |\n",
            r.turns,
            r.acknowledged,
            r.total,
            100.0 * r.acknowledged as f64 / r.total.max(1) as f64
        ));
    }
    if let Some(a) = report.edits_accepted {
        out.push_str(&format!(
            "\nEdits accepted: {a}/{}, trained on {}.\n",
            report.items,
            report.trained_on.as_deref().unwrap_or("?")
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acknowledgment_rule() {
        // The target itself, any case.
        assert!(acknowledges(
            "Try NON-COMPUTER-BASED resources.",
            "non-computer-based"
        ));
        // Every key term of the target, as a stem.
        assert!(acknowledges(
            "Look for courses that are certified and offer a certificate.",
            "certification"
        ));
        assert!(acknowledges(
            "Printed books avoid the computer.",
            "non-computer-based"
        ));
        // A reference to what the user said.
        assert!(acknowledges(
            "Since you dislike screens, read books.",
            "audiobooks"
        ));
        // Neither.
        assert!(!acknowledges(
            "Here are ten great websites to visit.",
            "non-computer-based"
        ));
        assert!(!acknowledges("", "vegan"));
        // Short words and stopwords are not key terms.
        assert!(key_terms("a non-free option").is_empty());
    }
}
