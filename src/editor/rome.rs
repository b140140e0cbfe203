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
//!    only (see `compute`);
//! 4. as MEMIT does, adds the keys of earlier edits at the layer to C, so a
//!    new edit leaves them alone (see [`edit_direction`]).

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
    /// Weight of the preserved keys (earlier edits' positions at this
    /// layer) added to C, as MEMIT adds the keys it must keep: 0 leaves
    /// them out. See [`edit_direction`].
    pub preserve_weight: f64,
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
            preserve_weight: 1.0,
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
/// distribution the KL term keeps; `c_inv` is C⁻¹ (`[n_ff, n_ff]`);
/// `preserved` (`[m, n_ff]`) are keys the edit should leave alone (those of
/// earlier edits' questions at this layer).
pub fn compute(
    model: &LlamaModel,
    sequences: &[SubjectSequence],
    essence: &SubjectSequence,
    c_inv: &Tensor,
    preserved: Option<&Tensor>,
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
    let a = edit_direction(c_inv, &k_col, preserved, settings)?;
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

    let base_hidden = hidden_at(None)?;
    let base_essence = candle_nn::ops::log_softmax(
        &model.vocab_logits(&base_hidden.narrow(0, n_rows, 1)?)?,
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
        let log_probs = candle_nn::ops::log_softmax(&model.vocab_logits(&hidden)?, D::Minus1)?;
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

/// a = C'⁻¹k* / (k*ᵀ C'⁻¹ k*) (`[n_ff, 1]`), the input side of ΔW = δ aᵀ:
/// aᵀk* = 1, and among such a the one with the least aᵀC'a, that is the
/// least effect on the keys C' describes.
///
/// C' = C + μ K_p K_pᵀ adds the preserved keys K_p with weight μ
/// (`preserve_weight`), as MEMIT adds the keys of the edits it must keep.
/// Without it, sequential rank-one edits at one layer overwrite each other:
/// a new edit fires on an earlier one's question wherever their keys
/// overlap (10 UPQA preferences one after another, session 12: 6 of 7
/// refusals were the new edit breaking an earlier preference). C⁻¹ is cached
/// per layer, so C'⁻¹k* comes from Woodbury's identity with an m × m solve:
/// C'⁻¹k* = C⁻¹k* − C⁻¹K_p (I/μ + K_pᵀC⁻¹K_p)⁻¹ K_pᵀC⁻¹k*.
pub fn edit_direction(
    c_inv: &Tensor,
    k_star: &Tensor,
    preserved: Option<&Tensor>,
    settings: &RomeSettings,
) -> Result<Tensor, EditorError> {
    let mut c_inv_k = c_inv.matmul(k_star)?;
    if let Some(kp) =
        preserved.filter(|k| settings.preserve_weight > 0.0 && k.dim(0).is_ok_and(|m| m > 0))
    {
        let m = kp.dim(0)?;
        // C⁻¹ is symmetric: K_pᵀC⁻¹ as rows.
        let kp_cinv = kp.matmul(c_inv)?;
        let gram = kp_cinv.matmul(&kp.t()?)?.to_vec2::<f32>()?;
        let u = kp_cinv.matmul(k_star)?.flatten_all()?.to_vec1::<f32>()?;
        let inv_weight = 1.0 / settings.preserve_weight;
        let g = nalgebra::DMatrix::from_fn(m, m, |r, c| {
            f64::from(gram[r][c]) + if r == c { inv_weight } else { 0.0 }
        });
        let rhs = nalgebra::DVector::from_iterator(m, u.iter().map(|&v| f64::from(v)));
        let x = g
            .cholesky()
            .ok_or_else(|| {
                EditorError::Model(format!(
                    "the preserved keys at layer {} give a singular system",
                    settings.layer
                ))
            })?
            .solve(&rhs);
        let x: Vec<f32> = x.iter().map(|&v| v as f32).collect();
        let x = Tensor::from_vec(x, (m, 1), &Device::Cpu)?;
        c_inv_k = (c_inv_k - kp_cinv.t()?.matmul(&x)?)?;
    }
    let denom = k_star
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
    if let Some(kp) = preserved.filter(|k| k.dim(0).is_ok_and(|m| m > 0)) {
        let fired = kp.matmul(&a)?.abs()?.max_all()?.to_scalar::<f32>()?;
        tracing::debug!(
            preserved = kp.dim(0)?,
            max_abs_a_k = fired,
            "rome: how strongly the edit fires on the preserved keys"
        );
    }
    Ok(a)
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A random symmetric positive definite `[n, n]` matrix's inverse, as
    /// the key covariance's would be.
    fn random_c_inv(n: usize) -> Tensor {
        let m = Tensor::randn(0f32, 1f32, (n, n), &Device::Cpu).expect("randn");
        let c = (m.t().and_then(|t| t.matmul(&m)).expect("mᵀm") / n as f64)
            .and_then(|c| c + Tensor::eye(n, DType::F32, &Device::Cpu).expect("eye"))
            .expect("C");
        let values = c.to_vec2::<f32>().expect("values");
        let inverse = nalgebra::DMatrix::from_fn(n, n, |r, col| f64::from(values[r][col]))
            .cholesky()
            .expect("positive definite")
            .inverse();
        let flat: Vec<f32> = inverse.iter().map(|&v| v as f32).collect();
        Tensor::from_vec(flat, (n, n), &Device::Cpu).expect("C⁻¹")
    }

    fn max_abs(t: &Tensor) -> f32 {
        t.abs()
            .and_then(|t| t.max_all())
            .and_then(|t| t.to_scalar::<f32>())
            .expect("max")
    }

    #[test]
    fn preserved_keys_stop_firing_while_the_subject_key_still_maps_to_one() {
        let n = 48;
        let c_inv = random_c_inv(n);
        let k_star = Tensor::randn(0f32, 1f32, (n, 1), &Device::Cpu).expect("k*");
        // One preserved key close to k* (an earlier edit whose subject looks
        // like this one's) and four unrelated ones.
        let near = ((k_star.t().expect("t") * 0.8).expect("scale")
            + (Tensor::randn(0f32, 0.3f32, (1, n), &Device::Cpu).expect("noise")))
        .expect("near");
        let others = Tensor::randn(0f32, 1f32, (4, n), &Device::Cpu).expect("others");
        let preserved = Tensor::cat(&[&near, &others], 0).expect("cat");

        let plain = RomeSettings {
            preserve_weight: 0.0,
            ..Default::default()
        };
        let a_plain = edit_direction(&c_inv, &k_star, Some(&preserved), &plain).expect("plain");
        let a_none = edit_direction(&c_inv, &k_star, None, &plain).expect("none");
        assert!(max_abs(&(&a_plain - &a_none).expect("diff")) < 1e-6);

        let strong = RomeSettings {
            preserve_weight: 1e4,
            ..Default::default()
        };
        let a = edit_direction(&c_inv, &k_star, Some(&preserved), &strong).expect("preserving");
        let on_subject = a
            .t()
            .and_then(|a| a.matmul(&k_star))
            .and_then(|v| v.flatten_all())
            .and_then(|v| v.to_vec1::<f32>())
            .expect("aᵀk*")[0];
        assert!((on_subject - 1.0).abs() < 1e-3, "aᵀk* = {on_subject}");
        let fired_plain = max_abs(&preserved.matmul(&a_plain).expect("plain on kept"));
        let fired = max_abs(&preserved.matmul(&a).expect("on kept"));
        assert!(
            fired < 0.01 * fired_plain,
            "preserved keys still fire: {fired} (unpreserved {fired_plain})"
        );
    }
}
