//! FT-M (fine-tuning with the loss masked to the answer), trained as a rank-r
//! LoRA on one layer's MLP down-projection.
//!
//! The loss is cross-entropy on the target tokens only, conditioned on each
//! chat-templated question. Locality comes from two terms that a spike on
//! SmolLM2 found necessary (DESIGN.md, "Feasibility spike"):
//! - the LoRA's input side is A·P, with P projecting out the directions that
//!   ordinary inputs' MLP keys occupy, so ordinary inputs barely move it;
//! - anchor sequences (the model's own answers to other questions) are kept
//!   with cross-entropy, weighted by `anchor_weight`.
//!
//! Everything before layer L is computed once ([`LlamaModel::prefix`]); each
//! Adam step only runs and differentiates the layers after it.

use candle_core::{DType, Device, Tensor, Var, D};

use super::model::{Batch, LlamaModel};
use super::EditorError;

/// One training sequence: the templated question followed by its answer.
#[derive(Debug, Clone)]
pub struct TrainSequence {
    pub tokens: Vec<u32>,
    /// Index of the first answer token; the loss covers `answer_start..`.
    pub answer_start: usize,
    /// The edit's own question (true) or an anchor (false).
    pub is_target: bool,
}

#[derive(Debug, Clone)]
pub struct FtmSettings {
    pub layer: usize,
    pub rank: usize,
    pub max_steps: usize,
    pub learning_rate: f64,
    pub anchor_weight: f64,
    /// Stop once every target token is the argmax and the mean target loss is
    /// below this.
    pub stop_loss: f32,
    pub seed: u64,
}

#[derive(Debug, Clone)]
pub struct FtmResult {
    /// `[rank, n_ff]`, row-major, with the projector already applied.
    pub a: Vec<f32>,
    /// `[n_embd, rank]`, row-major.
    pub b: Vec<f32>,
    pub n_in: usize,
    pub n_out: usize,
    pub steps: usize,
    pub final_loss: f32,
    pub converged: bool,
}

/// Deterministic small-normal initialisation (Box–Muller over a splitmix
/// stream) so the same request gives the same edit.
fn init_normal(n: usize, std: f32, seed: u64) -> Vec<f32> {
    let mut state = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut next = || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    };
    (0..n)
        .map(|_| {
            let (u1, u2) = (next().max(1e-12), next());
            ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32 * std
        })
        .collect()
}

struct Adam {
    m: Tensor,
    v: Tensor,
    t: i32,
}

impl Adam {
    fn new(like: &Tensor) -> candle_core::Result<Self> {
        Ok(Self {
            m: like.zeros_like()?,
            v: like.zeros_like()?,
            t: 0,
        })
    }

    fn step(&mut self, var: &Var, grad: &Tensor, lr: f64) -> candle_core::Result<()> {
        let (b1, b2, eps) = (0.9, 0.999, 1e-8);
        self.t += 1;
        self.m = ((&self.m * b1)? + (grad * (1.0 - b1))?)?;
        self.v = ((&self.v * b2)? + (grad.sqr()? * (1.0 - b2))?)?;
        let m_hat = (&self.m / (1.0 - b1.powi(self.t)))?;
        let v_hat = (&self.v / (1.0 - b2.powi(self.t)))?;
        let update = (m_hat / (v_hat.sqrt()? + eps)?)?;
        var.set(&(var.as_tensor() - (update * lr)?)?)
    }
}

/// Trains the LoRA. `projector` is `[n_ff, n_ff]` (P = I − UUᵀ) or None.
pub fn train(
    model: &LlamaModel,
    sequences: &[TrainSequence],
    projector: Option<&Tensor>,
    settings: &FtmSettings,
    mut on_step: impl FnMut(usize, f32),
) -> Result<FtmResult, EditorError> {
    if !sequences.iter().any(|s| s.is_target) {
        return Err(EditorError::Invalid("no training question".into()));
    }
    let device = Device::Cpu;
    let cfg = &model.config;
    let (n_in, n_out, rank) = (cfg.n_ff, cfg.n_embd, settings.rank.max(1));

    let batch = Batch::new(sequences.iter().map(|s| s.tokens.clone()).collect());
    let prefix = model.prefix(&batch, settings.layer)?;
    let (b, t) = (sequences.len(), batch.max_len);

    // Loss rows: position p predicts token p+1.
    let mut rows = Vec::new();
    let mut labels = Vec::new();
    let mut weights = Vec::new();
    let mut target_rows = Vec::new();
    let n_target: usize = sequences
        .iter()
        .filter(|s| s.is_target)
        .map(|s| s.tokens.len() - s.answer_start)
        .sum();
    let n_anchor: usize = sequences
        .iter()
        .filter(|s| !s.is_target)
        .map(|s| s.tokens.len() - s.answer_start)
        .sum();
    for (i, s) in sequences.iter().enumerate() {
        for p in s.answer_start.max(1)..s.tokens.len() {
            if s.is_target {
                target_rows.push(rows.len());
            }
            rows.push((i * t + p - 1) as u32);
            labels.push(s.tokens[p]);
            weights.push(if s.is_target {
                1.0 / n_target.max(1) as f32
            } else {
                (settings.anchor_weight / n_anchor.max(1) as f64) as f32
            });
        }
    }
    let n_rows = rows.len();
    let rows_t = Tensor::from_vec(rows, n_rows, &device)?;
    let labels_t = Tensor::from_vec(labels.clone(), (n_rows, 1), &device)?;
    let weights_t = Tensor::from_vec(weights, n_rows, &device)?;
    let keys = prefix.keys.reshape((b * t, n_in))?;

    let a = Var::from_tensor(&Tensor::from_vec(
        init_normal(rank * n_in, 1.0 / (n_in as f32).sqrt(), settings.seed),
        (rank, n_in),
        &device,
    )?)?;
    let bm = Var::from_tensor(&Tensor::zeros((n_out, rank), DType::F32, &device)?)?;
    let mut adam_a = Adam::new(a.as_tensor())?;
    let mut adam_b = Adam::new(bm.as_tensor())?;

    let effective_a = |a: &Tensor| -> candle_core::Result<Tensor> {
        match projector {
            Some(p) => a.matmul(p),
            None => Ok(a.clone()),
        }
    };

    let mut final_loss = f32::INFINITY;
    let mut converged = false;
    let mut steps = 0;
    for step in 0..settings.max_steps {
        let a_eff = effective_a(a.as_tensor())?;
        let delta = keys
            .matmul(&a_eff.t()?)?
            .matmul(&bm.as_tensor().t()?)?
            .reshape((b, t, n_out))?;
        let logits = model.suffix_logits(&prefix, Some(&delta), &rows_t)?;
        let log_probs = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
        let picked = log_probs.gather(&labels_t, 1)?.squeeze(1)?;
        let loss = (picked * &weights_t)?.sum_all()?.neg()?;

        // Convergence is judged on this step's forward, before updating.
        let argmax = logits.argmax(D::Minus1)?.to_vec1::<u32>()?;
        let picked_vals = log_probs.gather(&labels_t, 1)?.squeeze(1)?.to_vec1::<f32>()?;
        let target_loss = -target_rows.iter().map(|&r| picked_vals[r]).sum::<f32>()
            / target_rows.len().max(1) as f32;
        final_loss = target_loss;
        on_step(step, target_loss);
        let all_right = target_rows.iter().all(|&r| argmax[r] == labels[r]);
        if all_right && target_loss < settings.stop_loss {
            converged = true;
            break;
        }
        let grads = loss.backward()?;
        let grad_a = grads
            .get(a.as_tensor())
            .ok_or_else(|| EditorError::Model("no gradient reached the LoRA's A".into()))?;
        let grad_b = grads
            .get(bm.as_tensor())
            .ok_or_else(|| EditorError::Model("no gradient reached the LoRA's B".into()))?;
        adam_a.step(&a, grad_a, settings.learning_rate)?;
        adam_b.step(&bm, grad_b, settings.learning_rate)?;
        steps = step + 1;
    }

    let a_eff = effective_a(a.as_tensor())?;
    Ok(FtmResult {
        a: a_eff.flatten_all()?.to_vec1()?,
        b: bm.as_tensor().flatten_all()?.to_vec1()?,
        n_in,
        n_out,
        steps,
        final_loss,
        converged,
    })
}
