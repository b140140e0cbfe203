//! The editor: turns a preference into a small low-rank weight edit, checks
//! it through the real runtime, and assembles active edits into one LoRA
//! adapter that llama.cpp applies.
//!
//! - [`model`]: differentiable llama forward over the dequantized GGUF.
//! - [`ftm`]: FT-M, trained as a rank-r LoRA on one MLP down-projection,
//!   with null-space projection and contrastive anchors for locality.
//! - [`calibrate`]: `imprint calibrate`, a layer × learning-rate sweep on a
//!   generated set, stored per model.
//! - [`rome`]: ROME, a rank-one edit of an early MLP with a closed-form
//!   update weighted by the inverse key covariance.
//! - [`nullspace`]: the AlphaEdit-style projector and the key covariance,
//!   cached per model and layer.
//! - [`adapter`]: the GGUF LoRA writer and reader.
//! - [`verify`]: the gate that runs each edit through llama.cpp.
//! - [`Editor`]: the whole pipeline.
//!
//! Edits are stored in the profile ([`crate::profile`]).

pub mod adapter;
pub mod baseline;
pub mod calibrate;
pub mod ftm;
pub mod model;
pub mod nullspace;
pub mod pipeline;
pub mod prompts;
pub mod rome;
pub mod verify;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use thiserror::Error;

pub use pipeline::{AnchorMode, EditOutcome, Editor, EditorSettings, KeyAnchors};

#[derive(Debug, Error)]
pub enum EditorError {
    #[error("editor model error: {0}")]
    Model(String),
    #[error("tensor math failed: {0}")]
    Tensor(#[from] candle_core::Error),
    #[error(transparent)]
    Gguf(#[from] crate::models::gguf::GgufError),
    #[error(transparent)]
    Engine(#[from] crate::engine::EngineError),
    #[error("cannot access {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(String),
    #[error(
        "adapter {path} belongs to another model: {reason}. Recompute the edits for this model."
    )]
    WrongModel { path: PathBuf, reason: String },
    #[error("no edit with id {0}; `imprint edit list` shows the ids")]
    UnknownEdit(String),
}

/// What to teach the model: the answer `target` to every question.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EditRequest {
    /// The preference's subject, e.g. "hobby".
    pub attribute: String,
    /// The answer, e.g. "Dancing at clubs".
    pub target: String,
    /// Questions that contain the attribute or a synonym of it.
    pub questions: Vec<String>,
}

impl EditRequest {
    /// The questions that ask something (blank entries are skipped
    /// everywhere: training, anchors and the gate).
    pub fn asked(&self) -> impl Iterator<Item = &String> {
        self.questions.iter().filter(|q| !q.trim().is_empty())
    }

    pub fn validate(&self) -> Result<(), EditorError> {
        if self.target.trim().is_empty() {
            return Err(EditorError::Invalid("the target answer is empty".into()));
        }
        if self.asked().next().is_none() {
            return Err(EditorError::Invalid(
                "an edit needs at least one question (--question)".into(),
            ));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// Fine-tuning with masked loss (the paper's FT-M), as a rank-r LoRA.
    Ftm,
    /// ROME: a rank-one edit of an early layer's MLP.
    Rome,
}

impl std::str::FromStr for Method {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "ftm" | "ft-m" => Ok(Method::Ftm),
            "rome" => Ok(Method::Rome),
            other => Err(format!("unknown edit method {other:?}; use ftm or rome")),
        }
    }
}

/// Low-rank factors for one weight tensor: ΔW = B·A, with A `[rank, n_in]`
/// and B `[n_out, rank]`, both row-major f32. Any scale is already folded
/// into B.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraFactors {
    /// The base tensor's GGUF name, e.g. `blk.20.ffn_down.weight`.
    pub tensor: String,
    pub rank: usize,
    pub n_in: usize,
    pub n_out: usize,
    #[serde(skip)]
    pub a: Vec<f32>,
    #[serde(skip)]
    pub b: Vec<f32>,
}

/// What the verification gate measured through llama.cpp.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EditMetrics {
    /// Questions of the request answered with the target.
    pub efficacy_hits: usize,
    pub efficacy_total: usize,
    /// Locality probes whose greedy answer did not change.
    pub locality_kept: usize,
    pub locality_total: usize,
    /// Probe answer tokens (teacher-forced on the answer before the edit)
    /// whose argmax did not change, and how many were compared.
    #[serde(default)]
    pub probe_tokens_kept: usize,
    #[serde(default)]
    pub probe_tokens_total: usize,
    /// Probes whose answer now contains the target, or an earlier active
    /// edit's target: an edit fires where it should not. The gate allows none.
    #[serde(default)]
    pub hijacked: usize,
    /// Questions of earlier active edits that answered their target before
    /// this edit and no longer do (every question of every earlier edit is
    /// checked). The gate allows none.
    #[serde(default)]
    pub broken_edits: usize,
    pub final_loss: f32,
    pub steps: usize,
    pub train_seconds: f64,
    pub verify_seconds: f64,
    /// The null-space energy share of the attempt that was kept (None:
    /// no projector, or an edit made before this was recorded).
    #[serde(default)]
    pub nullspace_energy: Option<f64>,
    /// Answers given to the request's questions, for the user to see.
    pub answers: Vec<String>,
    /// Probes whose answers changed.
    pub changed_probes: Vec<String>,
}

impl EditMetrics {
    pub fn efficacy(&self) -> f64 {
        self.efficacy_hits as f64 / self.efficacy_total.max(1) as f64
    }
    /// Share of probe answer tokens kept (1 when nothing was compared).
    pub fn token_locality(&self) -> f64 {
        if self.probe_tokens_total == 0 {
            1.0
        } else {
            self.probe_tokens_kept as f64 / self.probe_tokens_total as f64
        }
    }

    pub fn locality(&self) -> f64 {
        if self.locality_total == 0 {
            1.0
        } else {
            self.locality_kept as f64 / self.locality_total as f64
        }
    }
}

/// A computed, verified edit.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Edit {
    pub id: String,
    pub request: EditRequest,
    pub method: Method,
    /// sha256 of the GGUF the edit was computed for.
    pub model_sha256: String,
    pub layer: usize,
    pub factors: Vec<LoraFactors>,
    pub metrics: EditMetrics,
    pub active: bool,
    /// Why the verification gate refused it (rejected edits are kept,
    /// inactive, so their metrics stay visible).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rejection: Option<String>,
    /// Seconds since the Unix epoch.
    pub created: u64,
}
