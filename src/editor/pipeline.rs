//! The whole edit: build training sequences, train, verify through llama.cpp,
//! retry once with stronger settings, and accept or reject.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{Device, Tensor};

use super::adapter::write_adapter;
use super::ftm::{self, FtmSettings, TrainSequence};
use super::model::LlamaModel;
use super::nullspace;
use super::prompts::{self, same_attribute};
use super::rome::{self, subject_position, RomeSettings, SubjectSequence};
use super::verify::{
    agreement, answer, answer_for_target, contains_target, probe, probe_after, same_answer,
    teacher_forced_argmax, ProbeAnswer,
};
use super::{Edit, EditMetrics, EditRequest, EditorError, LoraFactors, Method};
use crate::engine::{ChatMessage, Engine};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, serde::Serialize)]
pub struct EditorSettings {
    pub method: Method,
    /// None: about 2/3 of the model's depth.
    pub layer: Option<usize>,
    pub rank: usize,
    pub max_steps: usize,
    pub learning_rate: f64,
    /// FT-M: the learning rate decays (cosine) to this share of itself by
    /// the last step; 1 keeps it constant.
    pub lr_floor: f64,
    pub anchor_weight: f64,
    /// Weight of the relative key-preservation term ([`AnchorMode::Keys`]).
    pub anchor_key_weight: f64,
    /// Weight of the ‖ΔW‖² penalty.
    pub l2: f64,
    /// FT-M: None, a target token is right once it is the argmax of the
    /// candidate vocabulary training reads; Some(m), it must lead the whole
    /// vocabulary by m logits (see [`super::ftm::DEFAULT_TARGET_MARGIN`]).
    pub target_margin: Option<f32>,
    /// Training stops once every target token is the argmax and the mean
    /// target loss is below this: lower gives firmer but larger edits.
    pub stop_loss: f32,
    pub use_nullspace: bool,
    /// Share of the ordinary keys' covariance energy the null-space
    /// projector removes from the edit's input side (0.95; AlphaEdit uses 0.99):
    /// lower leaves the edit more directions to act through.
    pub nullspace_energy: f64,
    /// The share the retry uses after a locality refusal (see
    /// [`nullspace::RETRY_ENERGY`]); equal to `nullspace_energy` to keep one.
    pub retry_nullspace_energy: f64,
    /// How the anchor questions (other attributes, general questions, the
    /// other active preferences) are kept from changing.
    pub anchors: AnchorMode,
    /// Share of the locality probes' answer tokens whose teacher-forced
    /// argmax must stay the same. Exact greedy answers are not used: on
    /// SmolLM2-135M any non-zero edit, however tiny, rewords some of them
    /// through llama.cpp's 8-bit activation rounding (docs/RESULTS.md), while
    /// token agreement separates that noise (≈ 99.6 %) from real damage.
    /// Hijacking (a probe answered with the target) is refused outright.
    pub min_locality: f64,
    /// Tokens compared per probe answer.
    pub probe_tokens: u32,
    /// Tokens of the model's own answer kept per anchor.
    pub anchor_tokens: u32,
    /// What the shipped anchors' keys are taken from on a `keys` first
    /// attempt (see [`KeyAnchors`]).
    pub key_anchors: KeyAnchors,
    pub system_prompt: String,
    pub retry: bool,
    /// ROME's own optimisation settings (its layer comes from `layer`).
    pub rome: RomeSettings,
}

impl Default for EditorSettings {
    fn default() -> Self {
        Self {
            method: Method::Ftm,
            layer: None,
            rank: 4,
            max_steps: 40,
            learning_rate: 5e-2,
            lr_floor: 1.0,
            anchor_weight: 1.0,
            anchor_key_weight: 100.0,
            l2: 0.01,
            target_margin: Some(super::ftm::DEFAULT_TARGET_MARGIN),
            stop_loss: 0.2,
            use_nullspace: true,
            nullspace_energy: nullspace::ENERGY,
            retry_nullspace_energy: nullspace::RETRY_ENERGY,
            anchors: AnchorMode::Keys,
            min_locality: 0.9,
            probe_tokens: 16,
            anchor_tokens: 6,
            key_anchors: KeyAnchors::Questions,
            system_prompt: "You are a helpful personal assistant. Answer briefly and directly."
                .into(),
            retry: true,
            rome: RomeSettings::default(),
        }
    }
}

/// Removes the scratch adapters (`<sha>.<pid>.verify-base.gguf`,
/// `….candidate.gguf`) that processes which are gone left behind. The
/// verify-base adapter stays while its process lives: the engine may attach
/// it again by path.
fn remove_stale_scratch(work_dir: &Path, model_sha256: &str) {
    let Ok(entries) = std::fs::read_dir(work_dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(rest) = name
            .to_str()
            .and_then(|n| n.strip_prefix(model_sha256))
            .and_then(|r| r.strip_prefix('.'))
        else {
            continue;
        };
        let Some((pid, kind)) = rest.split_once('.') else {
            continue;
        };
        if kind != "verify-base.gguf" && kind != "candidate.gguf" {
            continue;
        }
        let Ok(pid) = pid.parse::<i32>() else {
            continue;
        };
        if pid as u32 != std::process::id() && !process_alive(pid) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

fn process_alive(pid: i32) -> bool {
    // Signal 0 checks that the process exists without signalling it; EPERM
    // means it exists but belongs to someone else.
    // SAFETY: kill(2) with signal 0 has no effect on the target.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// With `AnchorMode::Keys`, how many questions of the profile's active
/// preferences (the most recent ones: 50 preferences of 3 questions) are
/// kept exactly; the gate checks every one of them in any case. They are
/// watched, not trained (see [`ftm::train`]): each costs a pass through the
/// lower layers once per edit and a gradient-free check whenever training is
/// ready to stop, and joins the loss only once the edit moves it. Bounds an
/// edit's cost however large the profile grows.
pub const PROFILE_ANCHORS: usize = 150;

/// Shipped anchors (general and personal questions) the retry keeps by
/// cross-entropy, nearest the request's keys first. All of them: keeping
/// only the nearest 12 or 32 (session 11) made the retry 2–4× faster, but
/// then a location edit ("I live in Porto") either answered "Where do I
/// want to travel next?" with "Porto" or missed one of its own questions,
/// and the gate refused it; with every anchor it passes (227 s on 2 cores).
/// `None` keeps them all, without ranking them.
pub const RETRY_ANCHORS: Option<usize> = None;

/// How anchors keep their answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AnchorMode {
    /// Project the anchors' layer-L keys out of the edit's input side: the
    /// edit adds exactly zero at every anchor position, so their answers
    /// cannot change, and training only runs the request's own questions.
    Project,
    /// Keep the anchors' answers with a cross-entropy term (each step runs
    /// every anchor through the upper layers: about 5× slower).
    Loss,
    /// Keep the layer's output on the anchors' keys (a soft
    /// ‖ΔW·K₀‖² penalty, see [`ftm::AnchorKeys`]): the anchors run once, up to
    /// layer L, and each step costs only the request's own questions — plus
    /// those questions of the most recent active preferences
    /// ([`PROFILE_ANCHORS`]) that the edit has moved, whose answers are then
    /// kept exactly with cross-entropy: an earlier edit's answer is fragile,
    /// and a small relative change of the layer's output breaks it. When the gate
    /// refuses the first attempt, the retry trains as [`AnchorMode::Loss`]
    /// would on its first attempt (with twice the steps if the edit did not
    /// learn its own questions).
    Keys,
    /// Both.
    Both,
    /// No anchors (for experiments).
    Off,
}

impl AnchorMode {
    fn projects(self) -> bool {
        matches!(self, AnchorMode::Project | AnchorMode::Both)
    }
    fn trains(self) -> bool {
        matches!(self, AnchorMode::Loss | AnchorMode::Both)
    }
    fn keeps_keys(self) -> bool {
        matches!(self, AnchorMode::Keys)
    }
}

impl std::str::FromStr for AnchorMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "project" => Ok(Self::Project),
            "loss" => Ok(Self::Loss),
            "keys" => Ok(Self::Keys),
            "both" => Ok(Self::Both),
            "off" | "none" => Ok(Self::Off),
            other => Err(format!(
                "unknown anchor mode {other:?}; use keys, loss, project, both or off"
            )),
        }
    }
}

/// What the shipped anchors are on the first attempt of an
/// [`AnchorMode::Keys`] edit, whose key term reads only their layer-L keys
/// (the profile's own anchors are always question and target).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyAnchors {
    /// Each question followed by the current profile's own short answer,
    /// generated through llama.cpp for every new profile state (about 5 s
    /// an edit on 2 cores).
    Answers,
    /// The chat-templated question alone, up to the token before the answer:
    /// nothing to generate, and the keys stay the same while no edit below
    /// the layer changes, so they are computed once. A retry still generates
    /// the answers, which its cross-entropy keeps.
    Questions,
}

impl std::str::FromStr for KeyAnchors {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "answers" => Ok(Self::Answers),
            "questions" => Ok(Self::Questions),
            other => Err(format!(
                "unknown key-anchor source {other:?}; use answers or questions"
            )),
        }
    }
}

/// Shipped anchors made under one editor state, remembered for the next
/// edit: the answered ones an edit keeps (regenerated once the profile
/// changes), or every question alone with its keys at one layer. Kept in
/// memory only: under a profile, the answers are the user's.
struct ShippedAnchors {
    /// What `sequences` depend on.
    state: String,
    sequences: Vec<TrainSequence>,
    /// What the keys depend on (the layer, and the edits below it), and the
    /// keys over every sequence.
    keys: Option<(String, ftm::AnchorKeys)>,
}

/// The result of [`Editor::compute`]: the edit (with its metrics) and the
/// gate's verdict.
#[derive(Debug, Clone)]
pub struct EditOutcome {
    pub edit: Edit,
    pub accepted: bool,
    pub reason: Option<String>,
    pub attempts: usize,
}

pub struct Editor {
    model: LlamaModel,
    /// Pristine down-projections of layers that currently carry edits.
    base_down: BTreeMap<usize, Tensor>,
    model_sha256: String,
    architecture: String,
    cache_dir: PathBuf,
    pub settings: EditorSettings,
    /// The answers the gate collected under one set of active edits, kept in
    /// memory only (they include answers to the user's own questions, which
    /// must not land unencrypted on disk). An accepted edit leaves the
    /// answers of the profile it creates here, so the next edit in a row
    /// (the daemon's worker, a sequential eval) skips the "before" pass.
    answers_memo: Option<AnswersMemo>,
    /// The shipped anchors with the current profile's answers.
    answered_anchors: Option<ShippedAnchors>,
    /// The shipped anchor questions alone ([`KeyAnchors::Questions`]).
    question_anchors: Option<ShippedAnchors>,
}

/// Gate answers under one adapter state.
struct AnswersMemo {
    /// Which state: the active edits' ids in order, the system prompt and the
    /// probe budget.
    key: String,
    /// By `memo_entry(question, max_tokens)`.
    answers: std::collections::HashMap<String, ProbeAnswer>,
}

fn memo_state(active: &[&Edit], settings: &EditorSettings) -> String {
    let ids: Vec<&str> = active.iter().map(|e| e.id.as_str()).collect();
    format!(
        "{}\u{0}{}\u{0}{}",
        ids.join(","),
        settings.system_prompt,
        settings.probe_tokens
    )
}

/// A question of an earlier active edit that answers its target before the
/// new edit, and must still do so after it.
struct OtherQuestion<'a> {
    question: &'a str,
    target: &'a str,
    target_tokens: Vec<i32>,
    budget: u32,
}

fn memo_entry(question: &str, max_tokens: u32) -> String {
    format!("{max_tokens}\u{0}{question}")
}

impl Editor {
    /// The model's GGUF architecture ("llama", "qwen2"): adapters carry it.
    pub fn architecture(&self) -> &str {
        &self.architecture
    }

    pub fn load(
        model_path: &Path,
        model_sha256: &str,
        cache_dir: &Path,
        settings: EditorSettings,
    ) -> Result<Self, EditorError> {
        let model = LlamaModel::load(model_path)?;
        remove_stale_scratch(&cache_dir.join("adapters"), model_sha256);
        Ok(Self {
            architecture: model.config.arch.clone(),
            model,
            base_down: BTreeMap::new(),
            model_sha256: model_sha256.to_string(),
            cache_dir: cache_dir.to_path_buf(),
            settings,
            answers_memo: None,
            answered_anchors: None,
            question_anchors: None,
        })
    }

    pub fn model(&self) -> &LlamaModel {
        &self.model
    }

    /// The fingerprint of the model this editor computes edits for.
    pub fn model_sha256(&self) -> &str {
        &self.model_sha256
    }

    pub fn default_layer(&self) -> usize {
        self.default_layer_for(self.settings.method)
    }

    /// FT-M: about 2/3 of the depth (where the spike found locality and
    /// efficacy both reachable). ROME: an early layer, about 1/6 of the depth
    /// (ROME's causal tracing puts factual recall in the early MLPs; GPT-J's
    /// layer 5 of 28).
    pub fn default_layer_for(&self, method: Method) -> usize {
        let n = self.model.config.n_layer;
        match method {
            Method::Ftm => (n * 2).div_ceil(3).min(n - 1),
            Method::Rome => (n / 6).clamp(1, n - 1),
        }
    }

    /// Makes the editor's weights equal base + the deltas of `active`, so a
    /// new edit is computed on top of the existing ones.
    fn sync_active(&mut self, active: &[Edit]) -> Result<(), EditorError> {
        let mut deltas: BTreeMap<usize, Tensor> = BTreeMap::new();
        for edit in active {
            for f in &edit.factors {
                let a = Tensor::from_slice(&f.a, (f.rank, f.n_in), &Device::Cpu)?;
                let b = Tensor::from_slice(&f.b, (f.n_out, f.rank), &Device::Cpu)?;
                let d = b.matmul(&a)?;
                let entry = deltas.remove(&edit.layer);
                deltas.insert(
                    edit.layer,
                    match entry {
                        Some(prev) => (prev + d)?,
                        None => d,
                    },
                );
            }
        }
        let touched: Vec<usize> = self
            .base_down
            .keys()
            .chain(deltas.keys())
            .copied()
            .collect();
        for layer in touched {
            let base = match self.base_down.get(&layer) {
                Some(b) => b.clone(),
                None => {
                    let b = self
                        .model
                        .down_proj(layer)
                        .ok_or_else(|| EditorError::Model(format!("no layer {layer}")))?
                        .clone();
                    self.base_down.insert(layer, b.clone());
                    b
                }
            };
            let current = self
                .model
                .down_proj(layer)
                .ok_or_else(|| EditorError::Model(format!("no layer {layer}")))?
                .clone();
            let target = match deltas.get(&layer) {
                Some(d) => (&base + d)?,
                None => base,
            };
            self.model.add_to_down_proj(layer, &(target - current)?)?;
        }
        Ok(())
    }

    fn templated(&self, engine: &Engine, question: &str) -> Result<Vec<u32>, EditorError> {
        templated(engine, &self.settings.system_prompt, question)
    }

    fn sequence(
        &self,
        engine: &Engine,
        question: &str,
        answer: &[u32],
        is_target: bool,
    ) -> Result<TrainSequence, EditorError> {
        chat_sequence(
            engine,
            &self.settings.system_prompt,
            question,
            answer,
            is_target,
        )
    }

    /// The profile's own anchors: every question of the most recent other
    /// active preferences (up to [`PROFILE_ANCHORS`] questions) with its
    /// target, marked `exact` (training may not stop while one of its
    /// tokens has moved).
    fn profile_anchors(
        &self,
        engine: &Engine,
        request: &EditRequest,
        active: &[Edit],
        eot: u32,
    ) -> Result<Vec<TrainSequence>, EditorError> {
        let mut others: Vec<&Edit> = active
            .iter()
            .filter(|e| !same_attribute(&e.request.attribute, &request.attribute))
            .collect();
        // The most recent ones, oldest first, up to PROFILE_ANCHORS questions.
        let mut kept = 0;
        let mut first = others.len();
        while first > 0 && kept + others[first - 1].request.asked().count() <= PROFILE_ANCHORS {
            first -= 1;
            kept += others[first].request.asked().count();
        }
        others.drain(..first);
        let mut anchors = Vec::new();
        for other in others {
            let answer = answer_tokens(engine, &other.request.target, eot);
            // Every question, not only the first: the gate checks them all,
            // and an edit that keeps "What's my hobby?" while losing "Which
            // hobby do I have?" is refused (docs/RESULTS.md, "Anchor modes,
            // session 6").
            for q in other.request.asked() {
                let mut anchor = self.sequence(engine, q, &answer, false)?;
                anchor.exact = true;
                anchors.push(anchor);
            }
        }
        Ok(anchors)
    }

    /// ROME's preserved keys: layer `layer`'s keys at every position of the
    /// questions (with their targets) of the most recent active edits at
    /// that layer about other attributes, up to [`PROFILE_ANCHORS`]
    /// questions. None when there are none or preservation is off.
    fn preserved_keys(
        &self,
        engine: &Engine,
        request: &EditRequest,
        active: &[Edit],
        layer: usize,
        target_tokens: &[u32],
    ) -> Result<Option<Tensor>, EditorError> {
        if self.settings.rome.preserve_weight <= 0.0 {
            return Ok(None);
        }
        let eot = *target_tokens.last().unwrap_or(&0);
        let mut sequences = Vec::new();
        for other in active.iter().rev().filter(|e| {
            e.layer == layer && !same_attribute(&e.request.attribute, &request.attribute)
        }) {
            if sequences.len() + other.request.asked().count() > PROFILE_ANCHORS {
                break;
            }
            let answer = answer_tokens(engine, &other.request.target, eot);
            for q in other.request.asked() {
                sequences.push(self.sequence(engine, q, &answer, false)?.tokens);
            }
        }
        if sequences.is_empty() {
            return Ok(None);
        }
        Ok(Some(nullspace::sequence_keys(
            &self.model,
            &sequences,
            layer,
        )?))
    }

    /// Times the paper's LoRA baseline (rank 8 on q/v of every layer) on
    /// `request`'s questions for `steps` steps: seconds per step.
    pub fn time_lora_baseline(
        &self,
        engine: &Engine,
        request: &EditRequest,
        steps: usize,
    ) -> Result<f64, EditorError> {
        request.validate()?;
        let mut answer: Vec<u32> = engine
            .tokenize_plain(request.target.trim())
            .into_iter()
            .map(|t| t as u32)
            .collect();
        answer.push(engine.end_of_turn_token() as u32);
        let sequences = request
            .questions
            .iter()
            .map(|q| self.sequence(engine, q, &answer, true))
            .collect::<Result<Vec<_>, _>>()?;
        super::baseline::seconds_per_step(&self.model, &sequences, 8, steps, 5e-4)
    }

    /// Computes, verifies and returns an edit for `request`, on top of the
    /// `active` edits. The engine is left with the adapter of `active`
    /// attached (or none), whatever the verdict.
    pub fn compute(
        &mut self,
        engine: &mut Engine,
        request: &EditRequest,
        active: &[Edit],
        mut progress: impl FnMut(&str),
    ) -> Result<EditOutcome, EditorError> {
        request.validate()?;
        let method = self.settings.method;
        let layer = self
            .settings
            .layer
            .unwrap_or_else(|| self.default_layer_for(method));
        if layer >= self.model.config.n_layer {
            return Err(EditorError::Invalid(format!(
                "layer {layer} does not exist; the model has layers 0..{}",
                self.model.config.n_layer - 1
            )));
        }
        self.sync_active(active)?;
        let work_dir = self.cache_dir.join("adapters");
        // Named per process: the daemon and an `imprint edit` (or two
        // evaluations) may compute edits for the same model at once, and each
        // must verify its own candidate.
        let scratch = |kind: &str| {
            work_dir.join(format!(
                "{}.{}.{kind}.gguf",
                self.model_sha256,
                std::process::id()
            ))
        };
        let active_adapter = scratch("verify-base");
        let candidate = scratch("candidate");
        let active_refs: Vec<&Edit> = active.iter().collect();
        let has_active = write_adapter(
            &active_refs,
            &self.architecture,
            &self.model_sha256,
            &active_adapter,
        )?;
        engine.set_adapter(has_active.then_some(active_adapter.as_path()))?;

        // What the current profile answers, before the edit.
        progress("collecting reference answers");
        let sys = self.settings.system_prompt.clone();
        let probes: Vec<_> = prompts::locality_probes()
            .into_iter()
            .filter(|p| !same_attribute(&p.attribute, &request.attribute))
            .collect();
        let memo_before = memo_state(&active_refs, &self.settings);
        let mut memo = match self.answers_memo.take() {
            Some(m) if m.key == memo_before => m.answers,
            _ => Default::default(),
        };
        tracing::debug!(remembered = memo.len(), "gate answers before the edit");
        let started = Instant::now();
        let probe_tokens = self.settings.probe_tokens;
        let mut probe_before = Vec::new();
        for p in &probes {
            let before = match memo.get(&memo_entry(&p.question, probe_tokens)) {
                Some(known) => known.clone(),
                None => probe(engine, &sys, &p.question, probe_tokens, None)?,
            };
            tracing::debug!(question = %p.question, before = %before.text, "probe before");
            probe_before.push(before);
        }

        // Which questions of earlier edits answer their targets now: a new
        // edit must not break any of them (not only each one's first
        // question: an edit that keeps "What's my hobby?" but loses "Which
        // hobby do I have?" is broken too).
        let mut others_before: Vec<OtherQuestion> = Vec::new();
        for other in active {
            let target = other.request.target.trim();
            let target_tokens = engine.tokenize_plain(target);
            let budget = target_tokens.len() as u32 + 8;
            for q in other.request.asked() {
                let entry = memo_entry(q, budget);
                let said = match memo.get(&entry) {
                    Some(known) => known.text.clone(),
                    None => answer_for_target(engine, &sys, q, target, &target_tokens, budget)?,
                };
                memo.insert(
                    entry,
                    ProbeAnswer {
                        text: said.clone(),
                        tokens: Vec::new(),
                        argmax: Vec::new(),
                    },
                );
                if contains_target(&said, target) {
                    others_before.push(OtherQuestion {
                        question: q.as_str(),
                        target,
                        target_tokens: target_tokens.clone(),
                        budget,
                    });
                }
            }
        }
        for (p, before) in probes.iter().zip(&probe_before) {
            memo.insert(memo_entry(&p.question, probe_tokens), before.clone());
        }
        tracing::debug!(
            ms = started.elapsed().as_millis() as u64,
            "gate answers before the edit collected"
        );
        // Until an edit is accepted, the profile (and so its answers) stays
        // as it is.
        let answers_before = AnswersMemo {
            key: memo_before,
            answers: memo,
        };

        let eot = engine.end_of_turn_token() as u32;
        let target_tokens = answer_tokens(engine, &request.target, eot);

        let mut sequences = Vec::new();
        for q in request.asked() {
            sequences.push(self.sequence(engine, q, &target_tokens, true)?);
        }
        // The anchors: the shipped ones not about this attribute (as the
        // current profile answers them, or their questions alone), then the
        // profile's own.
        let kept_shipped = shipped_anchors_kept(request);
        let question_anchors = self.settings.anchors.keeps_keys()
            && self.settings.key_anchors == KeyAnchors::Questions;
        let answered_state = format!(
            "{}\u{0}{}",
            memo_state(&active_refs, &self.settings),
            self.settings.anchor_tokens
        );
        let mut anchors = Vec::new();
        let mut shipped_anchors = 0;
        if method == Method::Ftm && self.settings.anchors != AnchorMode::Off {
            anchors = if question_anchors {
                let all = question_shipped(&mut self.question_anchors, engine, &self.settings)?;
                kept_shipped.iter().map(|&i| all[i].clone()).collect()
            } else {
                progress("collecting anchor answers");
                answered_shipped(
                    &mut self.answered_anchors,
                    engine,
                    &self.settings,
                    answered_state.clone(),
                    &kept_shipped,
                )?
            };
            shipped_anchors = anchors.len();
            anchors.extend(self.profile_anchors(engine, request, active, eot)?);
        }
        if self.settings.anchors.trains() {
            sequences.extend(anchors.iter().cloned());
        } else if self.settings.anchors.keeps_keys() {
            sequences.extend(anchors[shipped_anchors..].iter().cloned());
        }

        let dir = self.cache_dir.join("nullspace");
        // The corpus of ordinary keys, kept for a retry at another energy.
        let corpus = if method == Method::Ftm && self.settings.use_nullspace {
            progress("preparing the null-space projector (cached after the first time)");
            // The corpus comes from the base model's own answers.
            engine.set_adapter(None)?;
            let corpus = nullspace::corpus(engine, &sys, &dir, &self.model_sha256)?;
            engine.set_adapter(has_active.then_some(active_adapter.as_path()))?;
            Some(corpus)
        } else {
            None
        };
        let projector_at = |energy: f64| -> Result<Option<Tensor>, EditorError> {
            let Some(corpus) = &corpus else {
                return Ok(None);
            };
            let base = nullspace::load_or_compute(
                &self.model,
                corpus,
                &dir,
                &self.model_sha256,
                layer,
                energy,
            )?
            .projector;
            Ok(Some(base))
        };
        let mut nullspace_energy = self.settings.nullspace_energy;
        let mut projector = projector_at(nullspace_energy)?;
        let rome_inputs = if method == Method::Rome {
            progress("preparing the key covariance (cached after the first time)");
            engine.set_adapter(None)?;
            let corpus = nullspace::corpus(engine, &sys, &dir, &self.model_sha256)?;
            engine.set_adapter(has_active.then_some(active_adapter.as_path()))?;
            let c_inv = nullspace::load_or_compute_inverse_covariance(
                &self.model,
                &corpus,
                &dir,
                &self.model_sha256,
                layer,
            )?;
            let mut subjects = Vec::new();
            for (q, seq) in request.asked().zip(&sequences) {
                subjects.push(SubjectSequence {
                    subject: subject_position(engine, &seq.tokens, q, &request.attribute),
                    sequence: seq.clone(),
                });
            }
            let essence_question =
                format!("Tell me about {}.", request.attribute.replace('_', " "));
            let tokens = self.templated(engine, &essence_question)?;
            let essence = SubjectSequence {
                subject: subject_position(engine, &tokens, &essence_question, &request.attribute),
                sequence: TrainSequence {
                    answer_start: tokens.len(),
                    tokens,
                    is_target: false,
                    exact: false,
                },
            };
            let preserved = self.preserved_keys(engine, request, active, layer, &target_tokens)?;
            Some((subjects, essence, c_inv, preserved))
        } else {
            None
        };
        let mut anchor_keys = if method == Method::Ftm && self.settings.anchors.keeps_keys() {
            let started = Instant::now();
            let keys = if question_anchors {
                // The questions' keys are remembered between edits until
                // an edit below this layer changes (edits at the layer
                // itself act after its keys); each edit takes the rows of
                // the anchors it keeps and adds its profile anchors' own.
                let below: Vec<&str> = active
                    .iter()
                    .filter(|e| e.layer < layer)
                    .map(|e| e.id.as_str())
                    .collect();
                let key_state = format!("{layer}\u{0}{}", below.join(","));
                let shipped = match shipped_keys(
                    &mut self.question_anchors,
                    &self.model,
                    layer,
                    key_state,
                )? {
                    Some(all) => all.subset(&self.model, &kept_shipped, layer)?,
                    None => None,
                };
                let profile = &anchors[shipped_anchors..];
                let own = match &shipped {
                    Some(k) => {
                        ftm::AnchorKeys::collect_after(&self.model, profile, layer, k.shared_len)?
                    }
                    None => ftm::AnchorKeys::collect(&self.model, profile, layer)?,
                };
                match (shipped, own) {
                    (Some(s), Some(p)) => Some(s.join(p, shipped_anchors)?),
                    (s, p) => s.or(p),
                }
            } else {
                ftm::AnchorKeys::collect(&self.model, &anchors, layer)?
            };
            tracing::debug!(
                anchors = anchors.len(),
                ms = started.elapsed().as_millis() as u64,
                "anchor keys collected"
            );
            keys
        } else {
            None
        };
        // `--anchors project`: the anchors' own keys are removed too.
        let without_anchor_keys = |projector: Option<Tensor>, anchors: &[TrainSequence]| {
            if !self.settings.anchors.projects() || anchors.is_empty() {
                return Ok(projector);
            }
            let started = Instant::now();
            let tokens: Vec<Vec<u32>> = anchors.iter().map(|a| a.tokens.clone()).collect();
            let (narrowed, removed) =
                nullspace::exclude_keys(&self.model, projector.as_ref(), &tokens, layer)?;
            tracing::debug!(
                anchors = anchors.len(),
                removed,
                ms = started.elapsed().as_millis() as u64,
                "anchor keys projected out"
            );
            Ok::<_, EditorError>(Some(narrowed))
        };
        projector = without_anchor_keys(projector, &anchors)?;

        let mut ftm_settings = FtmSettings {
            layer,
            rank: self.settings.rank,
            max_steps: self.settings.max_steps,
            learning_rate: self.settings.learning_rate,
            lr_floor: self.settings.lr_floor,
            anchor_weight: if self.settings.anchors.trains() || self.settings.anchors.keeps_keys() {
                self.settings.anchor_weight
            } else {
                0.0
            },
            stop_loss: self.settings.stop_loss,
            l2: self.settings.l2,
            min_anchor_agreement: 0.95,
            anchor_key_weight: self.settings.anchor_key_weight,
            target_margin: self.settings.target_margin,
            seed: seed_for(request),
        };
        let mut rome_settings = RomeSettings {
            layer,
            ..self.settings.rome.clone()
        };
        let mut attempts = 0;
        let outcome = loop {
            attempts += 1;
            progress(&format!("training (attempt {attempts})"));
            let started = Instant::now();
            let tensor = format!("blk.{layer}.ffn_down.weight");
            let (factors, steps, final_loss) = match &rome_inputs {
                None => {
                    let r = ftm::train(
                        &self.model,
                        &sequences,
                        projector.as_ref(),
                        anchor_keys.as_ref(),
                        &ftm_settings,
                        |_, _| {},
                    )?;
                    let f = LoraFactors {
                        tensor,
                        rank: ftm_settings.rank,
                        n_in: r.n_in,
                        n_out: r.n_out,
                        a: r.a,
                        b: r.b,
                    };
                    (f, r.steps, r.final_loss)
                }
                Some((subjects, essence, c_inv, preserved)) => {
                    let r = rome::compute(
                        &self.model,
                        subjects,
                        essence,
                        c_inv,
                        preserved.as_ref(),
                        &rome_settings,
                    )?;
                    let f = LoraFactors {
                        tensor,
                        rank: 1,
                        n_in: r.n_in,
                        n_out: r.n_out,
                        a: r.a,
                        b: r.b,
                    };
                    (f, r.steps, r.final_loss)
                }
            };
            let train_seconds = started.elapsed().as_secs_f64();
            let edit = Edit {
                id: new_id(),
                request: request.clone(),
                method,
                model_sha256: self.model_sha256.clone(),
                layer,
                factors: vec![factors],
                metrics: EditMetrics {
                    final_loss,
                    steps,
                    train_seconds,
                    nullspace_energy: projector.is_some().then_some(nullspace_energy),
                    ..Default::default()
                },
                active: true,
                rejection: None,
                created: now(),
            };

            progress("verifying through llama.cpp");
            let verify_start = Instant::now();
            let mut all: Vec<&Edit> = active.iter().collect();
            all.push(&edit);
            write_adapter(&all, &self.architecture, &self.model_sha256, &candidate)?;
            engine.set_adapter(Some(&candidate))?;
            let mut metrics = edit.metrics.clone();
            let budget = target_tokens.len() as u32 + 8;
            for q in &request.questions {
                let a = answer(engine, &sys, q, budget)?;
                metrics.efficacy_total += 1;
                if contains_target(&a, &request.target) {
                    metrics.efficacy_hits += 1;
                }
                metrics.answers.push(a);
            }
            // What the profile with this edit answers, kept for the next edit
            // if this one is accepted.
            let mut answers_after = Vec::new();
            for (p, before) in probes.iter().zip(&probe_before) {
                let after_probe = probe_after(engine, &sys, &p.question, probe_tokens, before)?;
                let (same, compared) = agreement(&before.argmax, &after_probe.argmax);
                metrics.probe_tokens_kept += same;
                metrics.probe_tokens_total += compared;
                answers_after.push((memo_entry(&p.question, probe_tokens), after_probe.clone()));
                let (before, after) = (&before.text, after_probe.text);
                metrics.locality_total += 1;
                tracing::debug!(question = %p.question, %before, %after, same = same_answer(before, &after), "probe after");
                // A probe that starts answering with this edit's target, or
                // with an earlier edit's (stacked edits can push each other
                // onto unrelated questions), is hijacked.
                let leaked = std::iter::once(request.target.as_str())
                    .chain(active.iter().map(|e| e.request.target.as_str()))
                    .any(|t| contains_target(&after, t) && !contains_target(before, t));
                if leaked {
                    metrics.hijacked += 1;
                }
                if same_answer(before, &after) {
                    metrics.locality_kept += 1;
                } else {
                    metrics
                        .changed_probes
                        .push(format!("{} → {}", p.question, after.trim()));
                }
            }
            for other in &others_before {
                let a = answer_for_target(
                    engine,
                    &sys,
                    other.question,
                    other.target,
                    &other.target_tokens,
                    other.budget,
                )?;
                answers_after.push((
                    memo_entry(other.question, other.budget),
                    ProbeAnswer {
                        text: a.clone(),
                        tokens: Vec::new(),
                        argmax: Vec::new(),
                    },
                ));
                if !contains_target(&a, other.target) {
                    metrics.broken_edits += 1;
                    metrics.changed_probes.push(format!(
                        "{} → {} (was {:?})",
                        other.question,
                        a.trim(),
                        other.target
                    ));
                }
            }
            metrics.verify_seconds = verify_start.elapsed().as_secs_f64();
            let mut edit = edit;
            edit.metrics = metrics;
            let efficacy_ok = edit.metrics.efficacy_hits == edit.metrics.efficacy_total;
            let locality_ok = edit.metrics.hijacked == 0
                && edit.metrics.broken_edits == 0
                && edit.metrics.token_locality() >= self.settings.min_locality;
            let reason = match (efficacy_ok, locality_ok) {
                (true, true) => None,
                (false, _) => Some(format!(
                    "only {}/{} questions answered with the target",
                    edit.metrics.efficacy_hits, edit.metrics.efficacy_total
                )),
                (true, false) if edit.metrics.broken_edits > 0 => Some(format!(
                    "{} question(s) of earlier preferences no longer answer their targets",
                    edit.metrics.broken_edits
                )),
                (true, false) if edit.metrics.hijacked > 0 => Some(format!(
                    "{} unrelated question(s) now answer with the target of this or an earlier preference",
                    edit.metrics.hijacked
                )),
                (true, false) => Some(format!(
                    "it changed {:.1}% of the tokens of {} unrelated answers (at most {:.0}% may change)",
                    (1.0 - edit.metrics.token_locality()) * 100.0,
                    edit.metrics.locality_total,
                    (1.0 - self.settings.min_locality) * 100.0
                )),
            };
            let accepted = reason.is_none();
            if accepted {
                // Probes the edit moved were compared along the old answer;
                // as the next edit's "before" they need the argmax along their
                // own.
                for (entry, (p, before)) in answers_after
                    .iter_mut()
                    .zip(probes.iter().zip(&probe_before))
                {
                    if entry.1.tokens != before.tokens {
                        entry.1.argmax =
                            teacher_forced_argmax(engine, &sys, &p.question, &entry.1.tokens)?;
                    }
                }
                let mut with_edit = active_refs.clone();
                with_edit.push(&edit);
                self.answers_memo = Some(AnswersMemo {
                    key: memo_state(&with_edit, &self.settings),
                    answers: answers_after.into_iter().collect(),
                });
            }
            edit.active = accepted;
            edit.rejection = reason.clone();
            if accepted || !self.settings.retry || attempts >= 2 {
                break EditOutcome {
                    edit,
                    accepted,
                    reason,
                    attempts,
                };
            }
            // The one retry.
            let retry_energy = self.settings.retry_nullspace_energy;
            if efficacy_ok && corpus.is_some() && retry_energy != nullspace_energy {
                // A locality refusal: the edit fired on ordinary keys (at
                // 0.95, a one-question "my favorite sport" edit also answered
                // "my favorite color"), so the retry leaves it fewer of them.
                progress(
                    "preparing the retry's null-space projector (cached after the first time)",
                );
                nullspace_energy = retry_energy;
                projector = without_anchor_keys(projector_at(nullspace_energy)?, &anchors)?;
            }
            if anchor_keys.is_some() {
                // The key term can hold the edit away from keys it needs
                // (anchor questions that share words with the request's:
                // "Where do I want to travel next?" vs "Where do I live?"),
                // and strengthening it cannot help then. The retry trains
                // the way `--anchors loss` does on its first attempt: the
                // anchors' answers are kept through the whole model, which
                // only constrains what they end up answering. Slower, and
                // only for the edits that need it.
                // With a cap (RETRY_ANCHORS), the shipped anchors nearest
                // the request's keys, the ones it is likeliest to move;
                // every profile anchor either way.
                let nearest: Vec<usize> = match (RETRY_ANCHORS, &anchor_keys) {
                    (Some(cap), Some(keys)) => {
                        let targets: Vec<TrainSequence> =
                            sequences.iter().filter(|s| s.is_target).cloned().collect();
                        keys.ranked(&self.model, &targets, layer)?
                            .into_iter()
                            .filter(|&i| i < shipped_anchors)
                            .take(cap)
                            .collect()
                    }
                    _ => (0..shipped_anchors).collect(),
                };
                if question_anchors {
                    // The cross-entropy keeps answers: the ones the profile
                    // gives now, not the candidate's.
                    progress("collecting anchor answers");
                    engine.set_adapter(has_active.then_some(active_adapter.as_path()))?;
                    let answered = answered_shipped(
                        &mut self.answered_anchors,
                        engine,
                        &self.settings,
                        answered_state.clone(),
                        &kept_shipped,
                    )?;
                    for (slot, a) in anchors.iter_mut().zip(answered) {
                        *slot = a;
                    }
                }
                anchor_keys = None;
                sequences.retain(|s| s.is_target);
                sequences.extend(
                    anchors
                        .iter()
                        .enumerate()
                        .filter(|(i, _)| *i >= shipped_anchors || nearest.contains(i))
                        .map(|(_, a)| a.clone()),
                );
                ftm_settings.anchor_weight = self.settings.anchor_weight;
                // An edit that did not learn its own questions ran out of
                // steps (every refusal of that kind in the session-7 runs
                // used all 40); the loss anchors only add constraints.
                if !efficacy_ok {
                    ftm_settings.max_steps *= 2;
                }
                continue;
            }
            // Otherwise stronger settings.
            if !efficacy_ok {
                rome_settings.steps *= 2;
                rome_settings.clamp_norm_factor *= 1.5;
                ftm_settings.max_steps *= 2;
                ftm_settings.learning_rate *= 1.5;
                ftm_settings.stop_loss /= 2.0;
            } else {
                ftm_settings.anchor_weight *= 3.0;
                ftm_settings.anchor_key_weight *= 3.0;
                rome_settings.kl_weight *= 4.0;
            }
        };
        let _ = std::fs::remove_file(&candidate);
        if !outcome.accepted {
            self.answers_memo = Some(answers_before);
        }
        engine.set_adapter(has_active.then_some(active_adapter.as_path()))?;
        Ok(outcome)
    }
}

fn templated(
    engine: &Engine,
    system_prompt: &str,
    question: &str,
) -> Result<Vec<u32>, EditorError> {
    let messages = vec![
        ChatMessage::system(system_prompt),
        ChatMessage::user(question),
    ];
    Ok(engine
        .tokenize(&engine.render(&messages)?)
        .iter()
        .map(|t| t.0 as u32)
        .collect())
}

/// The chat-templated question followed by `answer` (the loss's part).
fn chat_sequence(
    engine: &Engine,
    system_prompt: &str,
    question: &str,
    answer: &[u32],
    is_target: bool,
) -> Result<TrainSequence, EditorError> {
    let mut tokens = templated(engine, system_prompt, question)?;
    let answer_start = tokens.len();
    tokens.extend_from_slice(answer);
    Ok(TrainSequence {
        tokens,
        answer_start,
        is_target,
        exact: false,
    })
}

/// Every shipped anchor question: the general ones, then the personal ones.
fn shipped_anchor_questions() -> Vec<prompts::TaggedQuestion> {
    prompts::general_anchors()
        .into_iter()
        .chain(prompts::personal_anchors())
        .collect()
}

/// Which shipped anchors (indices into [`shipped_anchor_questions`]) an edit
/// for `request` keeps: all but the personal ones about its own attribute,
/// whose answers it is meant to change.
fn shipped_anchors_kept(request: &EditRequest) -> Vec<usize> {
    let general = prompts::general_anchors().len();
    shipped_anchor_questions()
        .iter()
        .enumerate()
        .filter(|(i, a)| *i < general || !same_attribute(&a.attribute, &request.attribute))
        .map(|(i, _)| i)
        .collect()
}

/// The shipped anchors `kept` with the answers the engine's current adapter
/// gives (greedy, `anchor_tokens` long), generated side by side, or `memo`'s
/// when it holds them for `state` (the profile and settings they come from).
fn answered_shipped(
    memo: &mut Option<ShippedAnchors>,
    engine: &mut Engine,
    settings: &EditorSettings,
    state: String,
    kept: &[usize],
) -> Result<Vec<TrainSequence>, EditorError> {
    let kept_list: Vec<String> = kept.iter().map(usize::to_string).collect();
    let state = format!("{state}\u{0}{}", kept_list.join(","));
    if let Some(m) = memo.as_ref().filter(|m| m.state == state) {
        tracing::debug!("anchor answers remembered");
        return Ok(m.sequences.clone());
    }
    let started = Instant::now();
    let sys = &settings.system_prompt;
    let all = shipped_anchor_questions();
    let questions: Vec<&prompts::TaggedQuestion> = kept.iter().map(|&i| &all[i]).collect();
    // Side by side: one after another, every edit spent about 3 s more
    // on these answers (docs/RESULTS.md, "Edit speed and memory").
    let conversations: Vec<Vec<ChatMessage>> = questions
        .iter()
        .map(|q| vec![ChatMessage::system(sys), ChatMessage::user(&q.question)])
        .collect();
    let answers = engine.answer_all(&conversations, settings.anchor_tokens)?;
    let mut sequences = Vec::new();
    for (q, answer) in questions.iter().zip(answers) {
        let answer: Vec<u32> = answer.iter().map(|&t| t as u32).collect();
        sequences.push(chat_sequence(engine, sys, &q.question, &answer, false)?);
    }
    tracing::debug!(
        anchors = sequences.len(),
        ms = started.elapsed().as_millis() as u64,
        "anchor answers generated"
    );
    *memo = Some(ShippedAnchors {
        state,
        sequences: sequences.clone(),
        keys: None,
    });
    Ok(sequences)
}

/// The shipped anchor questions alone, chat-templated up to the answer.
fn question_shipped(
    memo: &mut Option<ShippedAnchors>,
    engine: &Engine,
    settings: &EditorSettings,
) -> Result<Vec<TrainSequence>, EditorError> {
    let state = settings.system_prompt.clone();
    if let Some(m) = memo.as_ref().filter(|m| m.state == state) {
        return Ok(m.sequences.clone());
    }
    let sequences = shipped_anchor_questions()
        .iter()
        .map(|q| chat_sequence(engine, &state, &q.question, &[], false))
        .collect::<Result<Vec<_>, _>>()?;
    *memo = Some(ShippedAnchors {
        state,
        sequences: sequences.clone(),
        keys: None,
    });
    Ok(sequences)
}

/// The layer-`layer` keys of every sequence `memo` holds, computed once per
/// `key_state` (what besides the sequences they depend on).
fn shipped_keys(
    memo: &mut Option<ShippedAnchors>,
    model: &LlamaModel,
    layer: usize,
    key_state: String,
) -> Result<Option<ftm::AnchorKeys>, EditorError> {
    let Some(m) = memo.as_mut() else {
        return Ok(None);
    };
    if let Some((state, keys)) = &m.keys {
        if *state == key_state {
            tracing::debug!("shipped anchor keys remembered");
            return Ok(Some(keys.clone()));
        }
    }
    let started = Instant::now();
    let keys = ftm::AnchorKeys::collect(model, &m.sequences, layer)?;
    tracing::debug!(
        anchors = m.sequences.len(),
        ms = started.elapsed().as_millis() as u64,
        "shipped anchor keys collected"
    );
    m.keys = keys.clone().map(|k| (key_state, k));
    Ok(keys)
}

/// `target` as the assistant's whole answer: its tokens and the end of turn.
fn answer_tokens(engine: &Engine, target: &str, eot: u32) -> Vec<u32> {
    let mut tokens: Vec<u32> = engine
        .tokenize_plain(target.trim())
        .into_iter()
        .map(|t| t as u32)
        .collect();
    tokens.push(eot);
    tokens
}

fn seed_for(request: &EditRequest) -> u64 {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(format!("{}\u{0}{}", request.attribute, request.target));
    u64::from_le_bytes(digest[..8].try_into().unwrap_or([0; 8]))
}

fn new_id() -> String {
    format!("{:08x}", rand::random::<u32>())
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scratch_adapters_of_gone_processes_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let own = format!("abc.{}.verify-base.gguf", std::process::id());
        // Above any pid_max: no such process.
        let gone = "abc.2000000000.candidate.gguf";
        let other_model = "def.2000000000.candidate.gguf";
        let unrelated = "abc.adapter.gguf";
        for name in [own.as_str(), gone, other_model, unrelated] {
            std::fs::write(dir.path().join(name), b"x").unwrap();
        }
        remove_stale_scratch(dir.path(), "abc");
        assert!(dir.path().join(&own).exists(), "this process's file stays");
        assert!(!dir.path().join(gone).exists());
        assert!(
            dir.path().join(other_model).exists(),
            "only this model's files"
        );
        assert!(dir.path().join(unrelated).exists());
    }
}
