//! ROME (Meng et al., "Locating and Editing Factual Associations in GPT"):
//! a rank-one edit of one early layer's MLP down-projection.
//!
//! The MLP is read as a key–value memory: the down-projection maps the key
//! k (its input at the subject's last token) to a value added to the
//! residual stream. ROME
//! 1. takes k* as the mean key at the subject's last token over the
//!    request's questions (each question is a different context, which is
//!    what ROME's random prefixes are for);
//! 2. writes the edit in the closed form ΔW = δ aᵀ, a = C⁻¹k* / (k*ᵀ C⁻¹ k*),
//!    where C is the covariance of ordinary keys at that layer: the change
//!    that maps k* to δ while disturbing ordinary keys least;
//! 3. optimizes δ so that the answer becomes the target, with a KL term that
//!    keeps what the model says about the subject itself (the "essence"
//!    prompt), a weight decay and a norm clamp. Unlike ROME's own code, δ is
//!    trained through ΔW itself: at every position the residual gets
//!    (aᵀk) δ, the amount the written edit adds there, not δ at the subject
//!    only (see `compute`).

use candle_core::{DType, Device, Tensor, Var, D};

use super::ftm::{Adam, TrainSequence};
use super::model::{Batch, LlamaModel};
use super::EditorError;
use crate::engine::Engine;

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct RomeSettings {
    pub layer: usize,
    pub steps: usize,
    pub learning_rate: f64,
    /// Weight of KL(base ‖ edited) on the essence prompt (ROME: 0.0625).
    pub kl_weight: f64,
    /// Weight decay on ‖δ‖² relative to ‖h‖² at the subject (ROME: 0.5).
    pub weight_decay: f64,
    /// ‖δ‖ never exceeds this multiple of the residual's norm there (ROME: 4).
    pub clamp_norm_factor: f64,
    /// Stop once the mean target loss is below this.
    pub stop_loss: f32,
}

impl Default for RomeSettings {
    fn default() -> Self {
        Self {
            layer: 5,
            steps: 30,
            learning_rate: 1.0,
            kl_weight: 0.0625,
            weight_decay: 0.5,
            clamp_norm_factor: 4.0,
            stop_loss: 0.2,
        }
    }
}

/// Below this largest |aᵀk| over the shared prefix's positions, the written
/// edit's effect there is left out of δ's optimisation.
const SHARED_SCALE_NEGLIGIBLE: f32 = 0.01;

/// One question of the request with the position of its subject's last
/// token, or the essence prompt (`answer_start == tokens.len()`).
#[derive(Debug, Clone)]
pub struct SubjectSequence {
    pub sequence: TrainSequence,
    pub subject: usize,
}

#[derive(Debug, Clone)]
pub struct RomeResult {
    /// `[1, n_ff]`: (C⁻¹k*)ᵀ / (k*ᵀ C⁻¹ k*).
    pub a: Vec<f32>,
    /// `[n_embd, 1]`: δ.
    pub b: Vec<f32>,
    pub n_in: usize,
    pub n_out: usize,
    pub steps: usize,
    pub final_loss: f32,
}

/// Computes the rank-one edit. `sequences` are the request's questions with
/// their target answers; `essence` is the subject on its own, whose next-token
/// distribution the KL term keeps; `c_inv` is C⁻¹ (`[n_ff, n_ff]`).
pub fn compute(
    model: &LlamaModel,
    sequences: &[SubjectSequence],
    essence: &SubjectSequence,
    c_inv: &Tensor,
    settings: &RomeSettings,
) -> Result<RomeResult, EditorError> {
    if sequences.is_empty() {
        return Err(EditorError::Invalid("no training question".into()));
    }
    let device = Device::Cpu;
    let cfg = &model.config;
    let (n_in, n_out) = (cfg.n_ff, cfg.n_embd);
    let all: Vec<&SubjectSequence> = sequences.iter().chain(std::iter::once(essence)).collect();
    let mut batch = Batch::new(all.iter().map(|s| s.sequence.tokens.clone()).collect());
    // The subjects and every loss position must lie in the continuations.
    batch.shared_limit = all
        .iter()
        .map(|s| s.subject.min(s.sequence.answer_start.saturating_sub(1)))
        .min()
        .unwrap_or(0);
    let prefix = model.prefix(&batch, settings.layer)?;
    let (b, width, shared) = (all.len(), prefix.width, prefix.shared_len);

    // k*: the mean key at the questions' subjects (not the essence prompt's).
    let keys = prefix.keys.reshape((b * width, n_in))?;
    let base = prefix.base.reshape((b * width, n_out))?;
    let subject_rows: Vec<u32> = all
        .iter()
        .enumerate()
        .map(|(i, s)| (i * width + s.subject - shared) as u32)
        .collect();
    let question_rows =
        Tensor::from_slice(&subject_rows[..sequences.len()], sequences.len(), &device)?;
    let k_star = keys.index_select(&question_rows, 0)?.mean(0)?;
    let h_norm = base
        .index_select(&question_rows, 0)?
        .sqr()?
        .sum(1)?
        .sqrt()?
        .mean_all()?
        .to_scalar::<f32>()? as f64;

    // The edit written is ΔW = δ aᵀ with a = C⁻¹k* / (k*ᵀ C⁻¹ k*): it adds
    // (aᵀk) δ wherever the key is k. ROME's own optimisation adds δ whole at
    // the subject and nowhere else, which is what ΔW does only when every
    // question's subject key equals k* and no other key projects onto a.
    // Three phrasings have three different subject tokens ("hobby",
    // "pastime", "days"), so there the written edit delivered a fraction of
    // the δ it was trained with, and fired on other tokens it was never
    // trained on (1/3 questions answered at lr 0.5, 2/3 at lr 1.0).
    // Training δ through the per-position scales aᵀk, at every position of
    // the prompts, optimises the edit that is written (3/3 at lr 0.5, 1.0
    // and 2.0; docs/RESULTS.md, ROME).
    let k_col = k_star.reshape((n_in, 1))?;
    let c_inv_k = c_inv.matmul(&k_col)?;
    let denom = k_col
        .t()?
        .matmul(&c_inv_k)?
        .squeeze(0)?
        .squeeze(0)?
        .to_scalar::<f32>()?;
    if !(denom.is_finite() && denom > 0.0) {
        return Err(EditorError::Model(format!(
            "the key covariance is degenerate at layer {} (k*ᵀC⁻¹k* = {denom})",
            settings.layer
        )));
    }
    let a = (c_inv_k / f64::from(denom))?;
    let scale = keys.matmul(&a)?.reshape((b, width, 1))?;
    let scale_shared = prefix
        .keys_shared
        .reshape((shared, n_in))?
        .matmul(&a)?
        .reshape((1, shared, 1))?;

    // Loss rows: the answer tokens of the questions; the essence prompt's
    // last position for the KL term.
    let mut rows = Vec::new();
    let mut labels = Vec::new();
    for (i, s) in sequences.iter().enumerate() {
        let t = &s.sequence;
        for p in t.answer_start.max(shared + 1)..t.tokens.len() {
            rows.push((i * width + p - 1 - shared) as u32);
            labels.push(t.tokens[p]);
        }
    }
    let n_rows = rows.len();
    let essence_row = ((b - 1) * width + essence.sequence.tokens.len() - 1 - shared) as u32;
    rows.push(essence_row);
    let rows_t = Tensor::from_vec(rows, n_rows + 1, &device)?;
    let labels_t = Tensor::from_vec(labels.clone(), (n_rows, 1), &device)?;

    // The system prompt's keys barely project onto a (|aᵀk| ≤ 0.003 for the
    // default prompt and the hobby request, against 0.8–1.3 at the
    // subjects): then the shared prefix is left out of the edit and its
    // upper-layer states are computed once, not once per step.
    let shared_scale_max = scale_shared.abs()?.max_all()?.to_scalar::<f32>()?;
    let frozen = if shared_scale_max < SHARED_SCALE_NEGLIGIBLE {
        Some(model.frozen_shared(&prefix)?)
    } else {
        None
    };
    tracing::debug!(
        shared,
        width,
        sequences = b,
        shared_scale_max,
        scale = ?scale.flatten_all()?.to_vec1::<f32>()?,
        "rome: how strongly the written edit fires at each position"
    );
    let hidden_at = |delta: Option<&Tensor>| -> Result<Tensor, EditorError> {
        match (&frozen, delta) {
            (Some(f), d) => {
                let dq = d.map(|d| scale.broadcast_mul(d)).transpose()?;
                model.suffix_hidden_frozen_shared(&prefix, f, dq.as_ref(), &rows_t)
            }
            (None, Some(d)) => {
                let dq = scale.broadcast_mul(d)?;
                let ds = scale_shared.broadcast_mul(d)?;
                model.suffix_hidden(&prefix, Some((&ds, &dq)), &rows_t)
            }
            (None, None) => model.suffix_hidden(&prefix, None, &rows_t),
        }
    };

    let output_t = model.output().t()?;

    let base_hidden = hidden_at(None)?;
    let base_essence = candle_nn::ops::log_softmax(
        &base_hidden.narrow(0, n_rows, 1)?.matmul(&output_t)?,
        D::Minus1,
    )?;
    let base_essence_p = base_essence.exp()?;

    let delta = Var::from_tensor(&Tensor::zeros((1, 1, n_out), DType::F32, &device)?)?;
    let mut adam = Adam::new(delta.as_tensor())?;
    let max_norm = settings.clamp_norm_factor * h_norm;
    let mut final_loss = f32::INFINITY;
    let mut steps = 0;
    for step in 0..settings.steps {
        let hidden = hidden_at(Some(delta.as_tensor()))?;
        let log_probs = candle_nn::ops::log_softmax(&hidden.matmul(&output_t)?, D::Minus1)?;
        let answer_lp = log_probs.narrow(0, 0, n_rows)?;
        let target_lp = answer_lp.gather(&labels_t, 1)?;
        let nll = target_lp.mean_all()?.neg()?;
        final_loss = nll.to_scalar::<f32>()?;
        // As FT-M: done once every target token is the greedy choice and
        // the loss is low enough to keep it so through llama.cpp's rounding.
        let argmax: Vec<u32> = answer_lp.argmax(D::Minus1)?.to_vec1()?;
        let greedy = argmax == labels;
        tracing::debug!(step, loss = final_loss, greedy, "rome δ step");
        if final_loss < settings.stop_loss && greedy {
            break;
        }
        let essence_lp = log_probs.narrow(0, n_rows, 1)?;
        let kl = (&base_essence_p * (&base_essence - essence_lp)?)?.sum_all()?;
        let decay = (delta.as_tensor().sqr()?.sum_all()? / (h_norm * h_norm))?;
        let loss = ((nll + (kl * settings.kl_weight)?)? + (decay * settings.weight_decay)?)?;
        let grads = loss.backward()?;
        let grad = grads
            .get(delta.as_tensor())
            .ok_or_else(|| EditorError::Model("no gradient reached ROME's δ".into()))?;
        adam.step(&delta, grad, settings.learning_rate)?;
        // The norm clamp.
        let norm = delta
            .as_tensor()
            .sqr()?
            .sum_all()?
            .sqrt()?
            .to_scalar::<f32>()? as f64;
        if norm > max_norm {
            delta.set(&(delta.as_tensor() * (max_norm / norm))?)?;
        }
        steps = step + 1;
    }

    Ok(RomeResult {
        a: a.flatten_all()?.to_vec1()?,
        b: delta.as_tensor().flatten_all()?.to_vec1()?,
        n_in,
        n_out,
        steps,
        final_loss,
    })
}

/// The index in `tokens` (a templated question) of the last token of the
/// question's subject: the attribute if the question names it (whole, or its
/// longest word), else the question's last word. ROME edits the key there.
pub fn subject_position(engine: &Engine, tokens: &[u32], question: &str, attribute: &str) -> usize {
    let ids: Vec<i32> = tokens.iter().map(|&t| t as i32).collect();
    let pieces = engine.token_pieces(&ids);
    let mut text = Vec::new();
    let mut ends = Vec::with_capacity(pieces.len());
    for p in &pieces {
        text.extend_from_slice(p);
        ends.push(text.len());
    }
    let text = String::from_utf8_lossy(&text).to_ascii_lowercase();
    let last = tokens.len().saturating_sub(1);
    let Some(q_start) = text.rfind(&question.to_ascii_lowercase()) else {
        return last;
    };
    let q_text = question.to_ascii_lowercase();
    let attribute = attribute.to_ascii_lowercase().replace(['_', '-'], " ");
    let mut candidates = vec![attribute.clone()];
    let mut words: Vec<&str> = attribute.split_whitespace().collect();
    words.sort_by_key(|w| std::cmp::Reverse(w.len()));
    candidates.extend(words.iter().map(|w| w.to_string()));
    let subject_end = candidates
        .iter()
        .filter(|c| !c.is_empty())
        .find_map(|c| q_text.rfind(c.as_str()).map(|i| i + c.len()))
        // Else the end of the question's last word.
        .unwrap_or_else(|| {
            q_text
                .trim_end_matches(|ch: char| !ch.is_alphanumeric())
                .len()
        });
    let byte = q_start + subject_end.max(1) - 1;
    ends.iter().position(|&e| e > byte).unwrap_or(last)
}
