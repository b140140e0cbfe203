//! `imprint eval upqa`: teach each item's preference with the chosen method,
//! then ask the four UPQA question types with greedy decoding.
//!
//! Modes: `single` edits each preference alone on the base model (the
//! paper's setting); `sequential` keeps every accepted edit in one profile
//! and asks all questions at the end, as a real user's profile would be.

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;

use super::locality::{LocalityReport, Snapshot};
use super::retrieval::Retrieval;
use super::scoring::{contains_target, token_f1};
use super::upqa_data::{first_person, ClusterItem, ClusterPerson, UpqaItem};
use crate::editor::adapter::write_adapter;
use crate::editor::{Edit, EditRequest, Editor, EditorError};
use crate::engine::{ChatMessage, Engine, GenerationParams};
use std::ops::ControlFlow;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum EvalMethod {
    /// The base model, no personalization.
    None,
    /// The preference stated in the system prompt.
    Prompt,
    /// The preference stated in the conversation's first user turn (as
    /// PrefEval does), acknowledged by the assistant, before any distractor
    /// turns.
    PromptTurn,
    /// Retrieval: the top-3 of all the run's stated preferences by
    /// embedding similarity to the question (embeddings from llama.cpp,
    /// mean-pooled), put in the system prompt.
    Rag,
    /// FT-M weight edits.
    Ftm,
    /// ROME weight edits.
    Rome,
}

impl EvalMethod {
    pub fn edits(self) -> bool {
        matches!(self, EvalMethod::Ftm | EvalMethod::Rome)
    }
}

/// How questions are put to the model.
#[derive(Debug, Clone, Default, Serialize)]
pub struct QuestionStyle {
    /// The paper's budget (target tokens for the explicit question, +8 for
    /// the others) instead of target tokens + 16 for every question.
    pub paper_budget: bool,
    /// Raw prompts without the chat template, as the paper fed them.
    pub raw: bool,
    /// Distractor turns (user + assistant pairs) before each question.
    pub turns: usize,
}

/// `turns` distractor user + assistant pairs for item `index`: a different
/// stretch of the conversations for each item, wrapping around.
pub fn distractor_turns(
    distractors: &[(String, String)],
    index: usize,
    turns: usize,
) -> Vec<ChatMessage> {
    if distractors.is_empty() {
        return Vec::new();
    }
    let start = index * 7 % distractors.len();
    (0..turns)
        .flat_map(|t| {
            let (u, a) = &distractors[(start + t) % distractors.len()];
            [ChatMessage::user(u), ChatMessage::assistant(a)]
        })
        .collect()
}

/// What the assistant says after a preference stated in the first turn.
pub const ACKNOWLEDGEMENT: &str = "Got it, I will keep that in mind.";
/// Each distractor message is cut to this many characters, so ten turns fit
/// the context and the run stays affordable on a CPU.
const DISTRACTOR_CHARS: usize = 400;

/// User + assistant pairs taken in order from PrefEval's multi-turn
/// conversations (`filtered_inter_turns_rm_few_items.json`).
pub fn distractor_pairs(path: &Path) -> Result<Vec<(String, String)>, EditorError> {
    #[derive(serde::Deserialize)]
    struct Message {
        role: String,
        content: String,
    }
    #[derive(serde::Deserialize)]
    struct Conversation {
        conversation: Vec<Message>,
    }
    let text = std::fs::read_to_string(path).map_err(|source| EditorError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let conversations: Vec<Conversation> = serde_json::from_str(&text).map_err(|e| {
        EditorError::Invalid(format!(
            "{} is not a PrefEval conversation file (line {}, column {}): {e}",
            path.display(),
            e.line(),
            e.column()
        ))
    })?;
    let cut = |s: &str| s.chars().take(DISTRACTOR_CHARS).collect::<String>();
    let mut pairs = Vec::new();
    for c in &conversations {
        for w in c.conversation.windows(2) {
            if w[0].role == "user" && w[1].role == "assistant" {
                pairs.push((cut(&w[0].content), cut(&w[1].content)));
            }
        }
    }
    if pairs.is_empty() {
        return Err(EditorError::Invalid(format!(
            "{} holds no user/assistant turns",
            path.display()
        )));
    }
    Ok(pairs)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum EvalMode {
    Single,
    Sequential,
}

pub const QUESTION_TYPES: [&str; 4] = ["explicit", "paraphrased", "implicit", "product"];

#[derive(Debug, Clone, Serialize)]
pub struct QuestionResult {
    pub kind: &'static str,
    pub question: String,
    pub answer: String,
    pub correct: bool,
    pub f1: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ItemResult {
    pub index: usize,
    pub attribute: String,
    pub target: String,
    pub training_questions: Vec<String>,
    pub edit_accepted: Option<bool>,
    pub edit_seconds: Option<f64>,
    pub edit_locality: Option<String>,
    /// Why the gate refused the edit (after its retry), when it did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub edit_rejection: Option<String>,
    /// Adam steps and training seconds of the edit (last attempt).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub edit_steps: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub edit_train_seconds: Option<f64>,
    /// Attempts the edit took (2: it was retried) and the null-space energy
    /// share of the last one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub edit_attempts: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub edit_nullspace_energy: Option<f64>,
    pub questions: Vec<QuestionResult>,
}

impl ItemResult {
    /// An item before its edit and questions have run.
    pub fn unscored(index: usize, attribute: String, target: String) -> Self {
        Self {
            index,
            attribute,
            target,
            training_questions: Vec::new(),
            edit_accepted: None,
            edit_seconds: None,
            edit_locality: None,
            edit_rejection: None,
            edit_steps: None,
            edit_train_seconds: None,
            edit_attempts: None,
            edit_nullspace_energy: None,
            questions: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct TypeScore {
    pub kind: &'static str,
    pub accuracy: f64,
    pub f1: f64,
    pub n: usize,
    /// Answers that name another item's target instead of their own: an
    /// edit that fires on the wrong personal question ("What do I do for a
    /// living?" → the hobby). The `none` baseline gives the chance level.
    pub other_target: usize,
}

/// How many of `results`' answers to questions of `kind` contain another
/// item's target (case-insensitive) and not their own.
pub fn other_target_answers(results: &[ItemResult], kind: &str) -> usize {
    results
        .iter()
        .flat_map(|r| {
            r.questions
                .iter()
                .filter(move |q| q.kind == kind && !q.correct)
                .map(move |q| (r, q))
        })
        .filter(|(r, q)| {
            let answer = q.answer.to_lowercase();
            results.iter().any(|o| {
                o.index != r.index
                    && !o.target.trim().is_empty()
                    && !o.target.eq_ignore_ascii_case(&r.target)
                    && answer.contains(&o.target.to_lowercase())
            })
        })
        .count()
}

#[derive(Debug, Clone, Serialize)]
pub struct UpqaReport {
    pub data: PathBuf,
    pub clusters: Option<PathBuf>,
    pub method: EvalMethod,
    pub mode: EvalMode,
    pub cluster_size: usize,
    pub model: String,
    pub model_sha256: String,
    pub system_prompt: String,
    pub max_new_tokens_rule: String,
    pub style: QuestionStyle,
    /// The edits were trained without the explicit question (k > 1), so the
    /// explicit score measures generalization to a held-out question.
    pub explicit_held_out: bool,
    /// How the cluster's questions were worded for training.
    pub cluster_person: ClusterPerson,
    /// Sequential edits only: unrelated answers, general knowledge and
    /// perplexity, before and after all edits.
    pub locality: Option<LocalityReport>,
    /// Edit methods: how many profiles the items were edited into (see
    /// [`persona_profiles`]; `single` mode: one per item).
    pub profiles: usize,
    pub items: usize,
    pub scores: Vec<TypeScore>,
    pub edits_accepted: Option<usize>,
    pub edit_seconds_median: Option<f64>,
    pub edit_seconds_p95: Option<f64>,
    /// The whole process's peak resident set (engine, editor and caches)
    /// when the run ended, in MB (Linux; None elsewhere).
    pub peak_rss_mb: Option<f64>,
    /// Edit methods: the editor's settings (layer, rank, steps, anchors…),
    /// so a run can be repeated and compared.
    pub editor: Option<serde_json::Value>,
    pub results: Vec<ItemResult>,
}

/// Sequential mode's profiles, as lists of item indices: the j-th item of
/// each attribute type goes to profile j. UPQA's items are different
/// personas, and `balanced_subset.json` holds ten per type that share their
/// explicit question ("What's my hobby?") with different targets; one
/// profile holding them all would have to give ten hobbies one answer. A
/// profile here holds at most one preference per attribute type, as a real
/// user's does; with one item per type (`--every 10`) there is one profile.
pub fn persona_profiles(items: &[UpqaItem]) -> Vec<Vec<usize>> {
    let mut seen: std::collections::HashMap<String, usize> = Default::default();
    let mut profiles: Vec<Vec<usize>> = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let count = seen
            .entry(item.attribute_type.trim().to_lowercase())
            .or_insert(0);
        if profiles.len() <= *count {
            profiles.push(Vec::new());
        }
        profiles[*count].push(i);
        *count += 1;
    }
    profiles
}

pub struct UpqaRun<'a> {
    pub data_path: &'a Path,
    pub clusters_path: Option<&'a Path>,
    pub items: &'a [UpqaItem],
    pub clusters: Option<&'a [ClusterItem]>,
    pub method: EvalMethod,
    pub mode: EvalMode,
    pub cluster_size: usize,
    pub system_prompt: &'a str,
    pub model_sha256: &'a str,
    pub adapter_dir: &'a Path,
    pub style: QuestionStyle,
    /// Train on the k cluster questions before the explicit one, keeping the
    /// explicit question out of training.
    pub hold_out_explicit: bool,
    /// Train on the cluster questions turned to the first person, or word
    /// for word.
    pub cluster_person: ClusterPerson,
    /// Distractor (user, assistant) pairs for `style.turns`.
    pub distractors: &'a [(String, String)],
    /// The base model's locality snapshot; sequential edit runs compare
    /// against it.
    pub locality_before: Option<&'a Snapshot>,
}

fn percentile(values: &[f64], p: f64) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let idx = ((p * (v.len() - 1) as f64).round() as usize).min(v.len() - 1);
    Some(v[idx])
}

fn questions_of(item: &UpqaItem) -> [(&'static str, &str); 4] {
    [
        ("explicit", &item.question),
        ("paraphrased", &item.question_paraphrased),
        ("implicit", &item.implicit_question),
        ("product", &item.product_recommendation_question),
    ]
}

impl UpqaRun<'_> {
    fn training_questions(&self, index: usize) -> Vec<String> {
        let questions = match (self.clusters, self.hold_out_explicit) {
            (Some(c), true) => {
                let mut q = c[index].questions(self.cluster_size + 1);
                q.pop();
                q
            }
            (Some(c), false) => c[index].questions(self.cluster_size),
            (None, _) => vec![self.items[index].question.clone()],
        };
        match self.cluster_person {
            ClusterPerson::First => questions.iter().map(|q| first_person(q)).collect(),
            ClusterPerson::Verbatim => questions,
        }
    }

    /// The conversation before the question: the preference stated in the
    /// first turn (PromptTurn), then `style.turns` distractor pairs.
    fn history(&self, index: usize) -> Vec<ChatMessage> {
        let mut messages = Vec::new();
        if self.method == EvalMethod::PromptTurn {
            messages.push(ChatMessage::user(&self.items[index].input_attribute));
            messages.push(ChatMessage::assistant(ACKNOWLEDGEMENT));
        }
        messages.extend(distractor_turns(self.distractors, index, self.style.turns));
        messages
    }

    fn ask(
        &self,
        engine: &mut Engine,
        system_prompt: &str,
        history: &[ChatMessage],
        question: &str,
        budget: u32,
    ) -> Result<String, EditorError> {
        let params = GenerationParams::greedy(budget);
        let mut quiet = |_: &str| ControlFlow::Continue(());
        if self.style.raw {
            let prompt = engine.tokenize(question);
            return Ok(engine.generate(&prompt, &params, &mut quiet)?.text);
        }
        let mut messages = vec![ChatMessage::system(system_prompt)];
        messages.extend_from_slice(history);
        messages.push(ChatMessage::user(question));
        Ok(engine.chat(&messages, &params, &mut quiet)?.text)
    }

    fn ask_all(
        &self,
        engine: &mut Engine,
        index: usize,
        system_prompt: &str,
    ) -> Result<Vec<QuestionResult>, EditorError> {
        self.ask_all_with(engine, index, system_prompt, None)
    }

    fn ask_all_with(
        &self,
        engine: &mut Engine,
        index: usize,
        system_prompt: &str,
        retrieval: Option<&Retrieval>,
    ) -> Result<Vec<QuestionResult>, EditorError> {
        let item = &self.items[index];
        let target_tokens = engine.tokenize_plain(&item.target).len() as u32;
        let history = self.history(index);
        questions_of(item)
            .into_iter()
            .map(|(kind, q)| {
                // Every method and question type gets the same budget,
                // unless the paper's is asked for.
                let budget = match (self.style.paper_budget, kind) {
                    (true, "explicit") => target_tokens,
                    (true, _) => target_tokens + 8,
                    (false, _) => target_tokens + 16,
                };
                let system = match retrieval {
                    Some(r) => r.system_prompt(engine, system_prompt, q)?,
                    None => system_prompt.to_string(),
                };
                let a = self.ask(engine, &system, &history, q, budget)?;
                Ok(QuestionResult {
                    kind,
                    question: q.to_string(),
                    correct: contains_target(&a, &item.target),
                    f1: token_f1(&a, &item.target),
                    answer: a,
                })
            })
            .collect()
    }

    fn prompt_for(&self, index: usize) -> String {
        format!(
            "{}\nWhat you know about the user: {}",
            self.system_prompt, self.items[index].input_attribute
        )
    }

    /// Runs the evaluation; `progress(done, total)` after each step.
    pub fn run(
        &self,
        engine: &mut Engine,
        editor: Option<&mut Editor>,
        mut progress: impl FnMut(usize, usize),
    ) -> Result<UpqaReport, EditorError> {
        let n = self.items.len();
        let mut results: Vec<ItemResult> = (0..n)
            .map(|i| {
                ItemResult::unscored(
                    i,
                    self.items[i].attribute_type.clone(),
                    self.items[i].target.clone(),
                )
            })
            .collect();
        let total_steps = if self.method.edits() && self.mode == EvalMode::Sequential {
            2 * n
        } else {
            n
        };
        let mut done = 0;
        let mut locality = None;
        let mut profiles = 0;
        engine.set_adapter(None)?;
        match (self.method, editor) {
            (EvalMethod::None | EvalMethod::PromptTurn, _) => {
                for (i, r) in results.iter_mut().enumerate() {
                    r.questions = self.ask_all(engine, i, self.system_prompt)?;
                    done += 1;
                    progress(done, total_steps);
                }
            }
            (EvalMethod::Rag, _) => {
                let store = Retrieval::new(
                    engine,
                    self.items
                        .iter()
                        .map(|i| i.input_attribute.clone())
                        .collect(),
                )?;
                for (i, r) in results.iter_mut().enumerate() {
                    r.questions = self.ask_all_with(engine, i, self.system_prompt, Some(&store))?;
                    done += 1;
                    progress(done, total_steps);
                }
            }
            (EvalMethod::Prompt, _) => {
                for (i, r) in results.iter_mut().enumerate() {
                    r.questions = self.ask_all(engine, i, &self.prompt_for(i))?;
                    done += 1;
                    progress(done, total_steps);
                }
            }
            (EvalMethod::Ftm | EvalMethod::Rome, None) => {
                return Err(EditorError::Invalid("edit methods need the editor".into()));
            }
            (EvalMethod::Ftm | EvalMethod::Rome, Some(editor)) => {
                let adapter = self.adapter_dir.join("eval.gguf");
                let groups = match self.mode {
                    EvalMode::Single => (0..n).map(|i| vec![i]).collect(),
                    EvalMode::Sequential => persona_profiles(self.items),
                };
                profiles = groups.len();
                let mut localities = Vec::new();
                for members in &groups {
                    // One profile: its edits stack, then its items are asked.
                    let mut active: Vec<Edit> = Vec::new();
                    for &i in members {
                        let r = &mut results[i];
                        let request = EditRequest {
                            attribute: self.items[i].attribute_type.clone(),
                            target: self.items[i].target.clone(),
                            questions: self.training_questions(i),
                        };
                        let started = Instant::now();
                        let outcome = editor.compute(engine, &request, &active, |_| {})?;
                        r.training_questions = request.questions.clone();
                        r.edit_seconds = Some(started.elapsed().as_secs_f64());
                        r.edit_accepted = Some(outcome.accepted);
                        r.edit_locality = Some(format!(
                            "{}/{}",
                            outcome.edit.metrics.locality_kept, outcome.edit.metrics.locality_total
                        ));
                        r.edit_rejection = outcome.reason.clone();
                        r.edit_steps = Some(outcome.edit.metrics.steps);
                        r.edit_train_seconds = Some(outcome.edit.metrics.train_seconds);
                        r.edit_attempts = Some(outcome.attempts);
                        r.edit_nullspace_energy = outcome.edit.metrics.nullspace_energy;
                        if outcome.accepted {
                            active.push(outcome.edit);
                        }
                        done += 1;
                        progress(done, total_steps);
                    }
                    let refs: Vec<&Edit> = active.iter().collect();
                    let has =
                        write_adapter(&refs, editor.architecture(), self.model_sha256, &adapter)?;
                    engine.set_adapter(has.then_some(adapter.as_path()))?;
                    for &i in members {
                        results[i].questions = self.ask_all(engine, i, self.system_prompt)?;
                        if self.mode == EvalMode::Sequential {
                            done += 1;
                            progress(done, total_steps);
                        }
                    }
                    if let (EvalMode::Sequential, Some(before)) = (self.mode, self.locality_before)
                    {
                        let after = Snapshot::take(engine, self.system_prompt, Some(before))?;
                        let attributes: Vec<String> =
                            active.iter().map(|e| e.request.attribute.clone()).collect();
                        localities.push(LocalityReport::compare(before, &after, &attributes));
                    }
                    engine.set_adapter(None)?;
                }
                locality = LocalityReport::pooled(localities);
                let _ = std::fs::remove_file(&adapter);
            }
        }

        let scores = QUESTION_TYPES
            .iter()
            .map(|&kind| {
                let qs: Vec<&QuestionResult> = results
                    .iter()
                    .flat_map(|r| r.questions.iter().filter(|q| q.kind == kind))
                    .collect();
                let count = qs.len().max(1) as f64;
                TypeScore {
                    kind,
                    accuracy: qs.iter().filter(|q| q.correct).count() as f64 / count,
                    f1: qs.iter().map(|q| q.f1).sum::<f64>() / count,
                    n: qs.len(),
                    other_target: other_target_answers(&results, kind),
                }
            })
            .collect();
        let edit_times: Vec<f64> = results.iter().filter_map(|r| r.edit_seconds).collect();
        Ok(UpqaReport {
            data: self.data_path.to_path_buf(),
            clusters: self.clusters_path.map(Path::to_path_buf),
            method: self.method,
            mode: self.mode,
            profiles,
            cluster_size: if self.clusters.is_some() {
                self.cluster_size
            } else {
                1
            },
            model: engine.options().model_path.display().to_string(),
            model_sha256: self.model_sha256.to_string(),
            system_prompt: self.system_prompt.to_string(),
            max_new_tokens_rule: if self.style.paper_budget {
                "the paper's: target tokens for explicit, +8 for the others".into()
            } else {
                "target tokens + 16, every method and question type".into()
            },
            style: self.style.clone(),
            explicit_held_out: self.hold_out_explicit && self.clusters.is_some(),
            cluster_person: self.cluster_person,
            locality,
            items: n,
            scores,
            edits_accepted: self.method.edits().then(|| {
                results
                    .iter()
                    .filter(|r| r.edit_accepted == Some(true))
                    .count()
            }),
            edit_seconds_median: percentile(&edit_times, 0.5),
            edit_seconds_p95: percentile(&edit_times, 0.95),
            peak_rss_mb: crate::bench::peak_rss_bytes().map(|b| b as f64 / 1e6),
            editor: None,
            results,
        })
    }
}

/// The report as Markdown, in the paper's layout (one row per method).
pub fn markdown(report: &UpqaReport) -> String {
    let mut out = String::new();
    out.push_str(&format!(
        "# UPQA: {} ({} mode, cluster size {}), {} items\n\nModel `{}` (sha256 {}…). Strict score = target appears in the greedy answer (case-insensitive); F1 = token overlap. Budget: {}.\n\n",
        serde_json::to_string(&report.method).unwrap_or_default().trim_matches('"'),
        serde_json::to_string(&report.mode).unwrap_or_default().trim_matches('"'),
        report.cluster_size,
        report.items,
        report.model,
        report.model_sha256.get(..12).unwrap_or(&report.model_sha256),
        report.max_new_tokens_rule
    ));
    if report.mode == EvalMode::Sequential && report.profiles > 1 {
        out.push_str(&format!(
            "Edited into {} profiles of at most one item per attribute type (the j-th item of each type in profile j); locality is pooled over them.\n\n",
            report.profiles
        ));
    }
    out.push_str("| method | explicit | paraphrased | implicit | product |\n| --- | --- | --- | --- | --- |\n");
    let cell = |kind: &str| {
        report
            .scores
            .iter()
            .find(|s| s.kind == kind)
            .map(|s| format!("{:.1} % (F1 {:.2})", s.accuracy * 100.0, s.f1))
            .unwrap_or_default()
    };
    out.push_str(&format!(
        "| {} | {} | {} | {} | {} |\n",
        serde_json::to_string(&report.method)
            .unwrap_or_default()
            .trim_matches('"'),
        cell("explicit"),
        cell("paraphrased"),
        cell("implicit"),
        cell("product")
    ));
    let crosstalk: Vec<String> = report
        .scores
        .iter()
        .map(|s| format!("{} {}/{}", s.kind, s.other_target, s.n))
        .collect();
    out.push_str(&format!(
        "\nAnswers naming another item's target instead of their own: {}.\n",
        crosstalk.join(", ")
    ));
    let mut notes = Vec::new();
    if report.explicit_held_out {
        notes.push(
            "the explicit question was held out of every edit's training questions".to_string(),
        );
    }
    if report.clusters.is_some() && report.method.edits() {
        notes.push(match report.cluster_person {
            ClusterPerson::First => {
                "cluster questions turned to the first person (\"your\" → \"my\")".to_string()
            }
            ClusterPerson::Verbatim => "cluster questions word for word, as the paper".to_string(),
        });
    }
    if report.style.raw {
        notes.push("raw prompts, no chat template".to_string());
    }
    if report.style.turns > 0 {
        notes.push(format!(
            "{} distractor turns before each question",
            report.style.turns
        ));
    }
    if !notes.is_empty() {
        out.push_str(&format!("\nSetting: {}.\n", notes.join("; ")));
    }
    if let Some(l) = &report.locality {
        out.push_str("\nLocality of the whole profile (base model → all edits):\n\n");
        out.push_str(&l.markdown());
    }
    if let Some(accepted) = report.edits_accepted {
        out.push_str(&format!(
            "\nEdits accepted by the verification gate: {accepted}/{}. Edit time per preference: median {:.1} s, p95 {:.1} s.\n",
            report.items,
            report.edit_seconds_median.unwrap_or(f64::NAN),
            report.edit_seconds_p95.unwrap_or(f64::NAN)
        ));
    }
    if let Some(mb) = report.peak_rss_mb {
        out.push_str(&format!(
            "
Peak memory of the whole run (RSS): {mb:.0} MB.
"
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(attribute_type: &str) -> UpqaItem {
        UpqaItem {
            input_attribute: String::new(),
            attribute_type: attribute_type.into(),
            question: String::new(),
            question_paraphrased: String::new(),
            implicit_question: String::new(),
            product_recommendation_question: String::new(),
            target: String::new(),
        }
    }

    fn answered(index: usize, target: &str, answers: &[(&'static str, &str)]) -> ItemResult {
        ItemResult {
            questions: answers
                .iter()
                .map(|&(kind, answer)| QuestionResult {
                    kind,
                    question: String::new(),
                    answer: answer.into(),
                    correct: answer.to_lowercase().contains(&target.to_lowercase()),
                    f1: 0.0,
                })
                .collect(),
            ..ItemResult::unscored(index, String::new(), target.into())
        }
    }

    #[test]
    fn answers_with_another_items_target_are_counted_as_crosstalk() {
        let results = vec![
            answered(
                0,
                "Dancing at clubs",
                &[
                    ("explicit", "Dancing at clubs"),
                    ("paraphrased", "I like jazz music"),
                ],
            ),
            answered(
                1,
                "Jazz music",
                &[
                    ("explicit", "dancing at clubs!"),
                    ("paraphrased", "Jazz music, of course"),
                ],
            ),
            // Its own target beside another one is not crosstalk; an item
            // sharing a target with another is never counted against it.
            answered(
                2,
                "Dancing at clubs",
                &[
                    ("explicit", "Jazz music and dancing at clubs"),
                    ("paraphrased", "No idea"),
                ],
            ),
        ];
        assert_eq!(other_target_answers(&results, "explicit"), 1);
        assert_eq!(other_target_answers(&results, "paraphrased"), 1);
        assert_eq!(other_target_answers(&results, "implicit"), 0);
    }

    #[test]
    fn a_profile_holds_at_most_one_item_per_attribute_type() {
        let items: Vec<UpqaItem> = ["hobby", "job", "Hobby ", "pet", "job", "hobby"]
            .iter()
            .map(|t| item(t))
            .collect();
        assert_eq!(
            persona_profiles(&items),
            vec![vec![0, 1, 3], vec![2, 4], vec![5]]
        );
        let distinct: Vec<UpqaItem> = ["hobby", "job", "pet"].iter().map(|t| item(t)).collect();
        assert_eq!(persona_profiles(&distinct), vec![vec![0, 1, 2]]);
        assert!(persona_profiles(&[]).is_empty());
    }
}
