//! The paper's LoRA baseline (rank 8 on the query and value projections of
//! every layer, trained for 70 steps), implemented only to time it against
//! FT-M (`imprint bench edit`). It shares the editor's forward and its speed
//! levers (shared prefix, frozen weights), but no prefix can be cached:
//! every layer is trained.

use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var, D};

use super::ftm::{Adam, TrainSequence};
use super::model::{Batch, LlamaModel, QvLora};
use super::EditorError;

/// Runs `steps` Adam steps and returns the mean seconds per step.
pub fn seconds_per_step(
    model: &LlamaModel,
    sequences: &[TrainSequence],
    rank: usize,
    steps: usize,
    learning_rate: f64,
) -> Result<f64, EditorError> {
    let device = Device::Cpu;
    let c = &model.config;
    let kv_dim = c.n_head_kv * c.head_dim;
    let targets: Vec<&TrainSequence> = sequences.iter().filter(|s| s.is_target).collect();
    let mut batch = Batch::new(targets.iter().map(|s| s.tokens.clone()).collect());
    batch.shared_limit = targets
        .iter()
        .map(|s| s.answer_start.saturating_sub(1))
        .min()
        .unwrap_or(0);
    let split = batch.split();
    let (shared, width) = (split.shared.len(), split.width);
    let mut rows = Vec::new();
    let mut labels = Vec::new();
    for (i, s) in targets.iter().enumerate() {
        for p in s.answer_start.max(shared + 1)..s.tokens.len() {
            rows.push((i * width + p - 1 - shared) as u32);
            labels.push(s.tokens[p]);
        }
    }
    let n_rows = rows.len();
    let rows = Tensor::from_vec(rows, n_rows, &device)?;
    let labels = Tensor::from_vec(labels, (n_rows, 1), &device)?;

    let small = |n: usize| Tensor::randn(0f32, 0.02, n, &device);
    let mut vars = Vec::new();
    for _ in 0..c.n_layer {
        vars.push([
            Var::from_tensor(&small(rank * c.n_embd)?.reshape((rank, c.n_embd))?)?,
            Var::from_tensor(&Tensor::zeros((c.n_embd, rank), DType::F32, &device)?)?,
            Var::from_tensor(&small(rank * c.n_embd)?.reshape((rank, c.n_embd))?)?,
            Var::from_tensor(&Tensor::zeros((kv_dim, rank), DType::F32, &device)?)?,
        ]);
    }
    let mut optimizers = vars
        .iter()
        .map(|v| {
            v.iter()
                .map(|var| Adam::new(var.as_tensor()))
                .collect::<Result<Vec<_>, _>>()
        })
        .collect::<Result<Vec<_>, _>>()?;
    let started = Instant::now();
    for _ in 0..steps.max(1) {
        let loras: Vec<QvLora> = vars
            .iter()
            .map(|[a_q, b_q, a_v, b_v]| QvLora {
                a_q: a_q.as_tensor().clone(),
                b_q: b_q.as_tensor().clone(),
                a_v: a_v.as_tensor().clone(),
                b_v: b_v.as_tensor().clone(),
            })
            .collect();
        let hidden = model.hidden_with_qv_lora(&batch, &loras, &rows)?;
        let log_probs = candle_nn::ops::log_softmax(&model.vocab_logits(&hidden)?, D::Minus1)?;
        let loss = log_probs.gather(&labels, 1)?.mean_all()?.neg()?;
        let grads = loss.backward()?;
        for (layer_vars, layer_opts) in vars.iter().zip(optimizers.iter_mut()) {
            for (var, opt) in layer_vars.iter().zip(layer_opts.iter_mut()) {
                if let Some(g) = grads.get(var.as_tensor()) {
                    opt.step(var, g, learning_rate)?;
                }
            }
        }
    }
    Ok(started.elapsed().as_secs_f64() / steps.max(1) as f64)
}
