//! `imprint eval upqa`: teach each item's preference with the chosen method,
//! then ask the four UPQA question types with greedy decoding.
//!
//! Modes: `single` edits each preference alone on the base model (the
//! paper's setting); `sequential` keeps every accepted edit in one profile
//! and asks all questions at the end, as a real user's profile would be.

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;

use super::scoring::{contains_target, token_f1};
use super::upqa_data::{ClusterItem, UpqaItem};
use crate::editor::adapter::write_adapter;
use crate::editor::verify::answer;
use crate::editor::{Edit, EditRequest, Editor, EditorError};
use crate::engine::Engine;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum EvalMethod {
    /// The base model, no personalization.
    None,
    /// The preference stated in the system prompt.
    Prompt,
    /// FT-M weight edits.
    Ftm,
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
    pub questions: Vec<QuestionResult>,
}

#[derive(Debug, Clone, Serialize)]
pub struct TypeScore {
    pub kind: &'static str,
    pub accuracy: f64,
    pub f1: f64,
    pub n: usize,
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
    pub items: usize,
    pub scores: Vec<TypeScore>,
    pub edits_accepted: Option<usize>,
    pub edit_seconds_median: Option<f64>,
    pub edit_seconds_p95: Option<f64>,
    pub results: Vec<ItemResult>,
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
        match self.clusters {
            Some(c) => c[index].questions(self.cluster_size),
            None => vec![self.items[index].question.clone()],
        }
    }

    fn ask_all(
        &self,
        engine: &mut Engine,
        index: usize,
        system_prompt: &str,
    ) -> Result<Vec<QuestionResult>, EditorError> {
        let item = &self.items[index];
        // Every method and question type gets the same budget.
        let budget = engine.tokenize_plain(&item.target).len() as u32 + 16;
        questions_of(item)
            .into_iter()
            .map(|(kind, q)| {
                let a = answer(engine, system_prompt, q, budget)?;
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
            .map(|i| ItemResult {
                index: i,
                attribute: self.items[i].attribute_type.clone(),
                target: self.items[i].target.clone(),
                training_questions: Vec::new(),
                edit_accepted: None,
                edit_seconds: None,
                edit_locality: None,
                questions: Vec::new(),
            })
            .collect();
        let total_steps = if self.method == EvalMethod::Ftm && self.mode == EvalMode::Sequential {
            2 * n
        } else {
            n
        };
        let mut done = 0;
        engine.set_adapter(None)?;
        match (self.method, editor) {
            (EvalMethod::None, _) => {
                for (i, r) in results.iter_mut().enumerate() {
                    r.questions = self.ask_all(engine, i, self.system_prompt)?;
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
            (EvalMethod::Ftm, None) => {
                return Err(EditorError::Invalid(
                    "the ftm method needs the editor".into(),
                ));
            }
            (EvalMethod::Ftm, Some(editor)) => {
                let mut active: Vec<Edit> = Vec::new();
                let adapter = self.adapter_dir.join("eval.gguf");
                for (i, r) in results.iter_mut().enumerate() {
                    let request = EditRequest {
                        attribute: self.items[i].attribute_type.clone(),
                        target: self.items[i].target.clone(),
                        questions: self.training_questions(i),
                    };
                    let context: &[Edit] = if self.mode == EvalMode::Sequential {
                        &active
                    } else {
                        &[]
                    };
                    let started = Instant::now();
                    let outcome = editor.compute(engine, &request, context, |_| {})?;
                    r.training_questions = request.questions.clone();
                    r.edit_seconds = Some(started.elapsed().as_secs_f64());
                    r.edit_accepted = Some(outcome.accepted);
                    r.edit_locality = Some(format!(
                        "{}/{}",
                        outcome.edit.metrics.locality_kept, outcome.edit.metrics.locality_total
                    ));
                    if self.mode == EvalMode::Single {
                        let edits: Vec<&Edit> = if outcome.accepted {
                            vec![&outcome.edit]
                        } else {
                            vec![]
                        };
                        let has = write_adapter(&edits, "llama", self.model_sha256, &adapter)?;
                        engine.set_adapter(has.then_some(adapter.as_path()))?;
                        r.questions = self.ask_all(engine, i, self.system_prompt)?;
                        engine.set_adapter(None)?;
                    } else if outcome.accepted {
                        active.push(outcome.edit);
                    }
                    done += 1;
                    progress(done, total_steps);
                }
                if self.mode == EvalMode::Sequential {
                    let refs: Vec<&Edit> = active.iter().collect();
                    let has = write_adapter(&refs, "llama", self.model_sha256, &adapter)?;
                    engine.set_adapter(has.then_some(adapter.as_path()))?;
                    for (i, r) in results.iter_mut().enumerate() {
                        r.questions = self.ask_all(engine, i, self.system_prompt)?;
                        done += 1;
                        progress(done, total_steps);
                    }
                    engine.set_adapter(None)?;
                }
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
                }
            })
            .collect();
        let edit_times: Vec<f64> = results.iter().filter_map(|r| r.edit_seconds).collect();
        Ok(UpqaReport {
            data: self.data_path.to_path_buf(),
            clusters: self.clusters_path.map(Path::to_path_buf),
            method: self.method,
            mode: self.mode,
            cluster_size: if self.clusters.is_some() {
                self.cluster_size
            } else {
                1
            },
            model: engine.options().model_path.display().to_string(),
            model_sha256: self.model_sha256.to_string(),
            system_prompt: self.system_prompt.to_string(),
            max_new_tokens_rule: "target tokens + 16, every method and question type".into(),
            items: n,
            scores,
            edits_accepted: (self.method == EvalMethod::Ftm).then(|| {
                results
                    .iter()
                    .filter(|r| r.edit_accepted == Some(true))
                    .count()
            }),
            edit_seconds_median: percentile(&edit_times, 0.5),
            edit_seconds_p95: percentile(&edit_times, 0.95),
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
    if let Some(accepted) = report.edits_accepted {
        out.push_str(&format!(
            "\nEdits accepted by the verification gate: {accepted}/{}. Edit time per preference: median {:.1} s, p95 {:.1} s.\n",
            report.items,
            report.edit_seconds_median.unwrap_or(f64::NAN),
            report.edit_seconds_p95.unwrap_or(f64::NAN)
        ));
    }
    out
}
