//! A differentiable llama forward pass over the same GGUF that llama.cpp
//! serves, dequantized to f32.
//!
//! It reads like the architecture: RMSNorm → attention with interleaved RoPE
//! and grouped-query heads → residual → RMSNorm → SwiGLU MLP → residual,
//! then a final norm and the (possibly tied) output projection.
//!
//! The editor only ever trains a low-rank delta on one layer's MLP
//! down-projection, so the pass is split at that point:
//! [`LlamaModel::prefix`] runs everything up to and including layer L's
//! unedited output once, with no autograd graph, and
//! [`LlamaModel::suffix_logits`] runs the rest with the trainable delta added.
//! Only ops with gradients are used downstream of the delta: candle's fused
//! `rms_norm`, `softmax_last_dim` and `rope_i` silently drop gradients.

use std::collections::HashMap;
use std::fs::File;
use std::io::BufReader;
use std::path::Path;

use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, IndexOp, Tensor, D};
use candle_nn::ops::{rms_norm_slow, softmax};
use candle_nn::rotary_emb::rope_i_slow;

use super::EditorError;

/// Hyper-parameters read from the GGUF metadata.
#[derive(Debug, Clone)]
pub struct LlamaConfig {
    pub n_layer: usize,
    pub n_embd: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
    pub n_ff: usize,
    pub n_vocab: usize,
    pub rope_theta: f32,
    pub rms_eps: f32,
}

struct Layer {
    attn_norm: Tensor,
    wq: Tensor,
    wk: Tensor,
    wv: Tensor,
    wo: Tensor,
    ffn_norm: Tensor,
    w_gate: Tensor,
    w_up: Tensor,
    /// `[n_embd, n_ff]`; may carry already-applied edits (sequential editing).
    w_down: Tensor,
}

pub struct LlamaModel {
    pub config: LlamaConfig,
    tok_embd: Tensor,
    layers: Vec<Layer>,
    out_norm: Tensor,
    /// `[n_vocab, n_embd]`; the embedding matrix when the model ties them.
    output: Tensor,
    /// RoPE tables `[max_positions, head_dim / 2]`, computed once.
    cos: Tensor,
    sin: Tensor,
}

/// A right-padded batch of token sequences. Right padding needs no mask beyond
/// the causal one: real tokens never look ahead at the padding.
#[derive(Debug, Clone)]
pub struct Batch {
    pub sequences: Vec<Vec<u32>>,
    pub max_len: usize,
}

impl Batch {
    pub fn new(sequences: Vec<Vec<u32>>) -> Self {
        let max_len = sequences.iter().map(Vec::len).max().unwrap_or(0);
        Self { sequences, max_len }
    }

    fn ids(&self, device: &Device) -> candle_core::Result<Tensor> {
        let mut flat = Vec::with_capacity(self.sequences.len() * self.max_len);
        for s in &self.sequences {
            flat.extend_from_slice(s);
            flat.extend(std::iter::repeat_n(0u32, self.max_len - s.len()));
        }
        Tensor::from_vec(flat, (self.sequences.len(), self.max_len), device)
    }
}

/// Layer L's state for a batch, computed once per edit.
pub struct Prefix {
    /// Layer L's output without the edit: `[B, T, n_embd]`.
    pub base_out: Tensor,
    /// The down-projection's input (the MLP "keys"): `[B, T, n_ff]`.
    pub keys: Tensor,
    pub layer: usize,
    pub max_len: usize,
}

fn meta_u32(ct: &gguf_file::Content, key: &str) -> Result<u32, EditorError> {
    ct.metadata
        .get(key)
        .and_then(|v| v.to_u32().ok())
        .ok_or_else(|| EditorError::Model(format!("GGUF metadata {key} is missing")))
}

fn meta_f32(ct: &gguf_file::Content, key: &str) -> Option<f32> {
    ct.metadata.get(key).and_then(|v| v.to_f32().ok())
}

impl LlamaModel {
    /// Loads and dequantizes every tensor of a llama GGUF.
    pub fn load(path: &Path) -> Result<Self, EditorError> {
        let content = crate::models::gguf::read_header(path)?;
        let arch = content
            .metadata
            .get("general.architecture")
            .and_then(|v| v.to_string().ok())
            .cloned()
            .unwrap_or_default();
        if arch != "llama" {
            return Err(EditorError::Model(format!(
                "the editor supports llama-architecture models; {} is {arch:?}",
                path.display()
            )));
        }
        let n_layer = meta_u32(&content, "llama.block_count")? as usize;
        let n_embd = meta_u32(&content, "llama.embedding_length")? as usize;
        let n_head = meta_u32(&content, "llama.attention.head_count")? as usize;
        let n_head_kv = content
            .metadata
            .get("llama.attention.head_count_kv")
            .and_then(|v| v.to_u32().ok())
            .map_or(n_head, |v| v as usize);
        let n_ff = meta_u32(&content, "llama.feed_forward_length")? as usize;
        let rope_theta = meta_f32(&content, "llama.rope.freq_base").unwrap_or(10_000.0);
        let rms_eps = meta_f32(&content, "llama.attention.layer_norm_rms_epsilon").unwrap_or(1e-5);
        let head_dim = n_embd / n_head;
        let rope_dims = content
            .metadata
            .get("llama.rope.dimension_count")
            .and_then(|v| v.to_u32().ok())
            .map_or(head_dim, |v| v as usize);
        if rope_dims != head_dim {
            return Err(EditorError::Model(format!(
                "partial RoPE ({rope_dims} of {head_dim} dims) is not supported"
            )));
        }

        let device = Device::Cpu;
        let mut reader = BufReader::new(File::open(path).map_err(|e| EditorError::Io {
            path: path.to_path_buf(),
            source: e,
        })?);
        let mut cache: HashMap<String, Tensor> = HashMap::new();
        let mut get = |name: &str| -> Result<Tensor, EditorError> {
            if let Some(t) = cache.get(name) {
                return Ok(t.clone());
            }
            let q = content
                .tensor(&mut reader, name, &device)
                .map_err(|e| EditorError::Model(format!("tensor {name}: {e}")))?;
            let t = q.dequantize(&device)?.to_dtype(DType::F32)?;
            cache.insert(name.to_string(), t.clone());
            Ok(t)
        };
        let tok_embd = get("token_embd.weight")?;
        let n_vocab = tok_embd.dim(0)?;
        let output = if content.tensor_infos.contains_key("output.weight") {
            get("output.weight")?
        } else {
            tok_embd.clone()
        };
        let out_norm = get("output_norm.weight")?;
        let mut layers = Vec::with_capacity(n_layer);
        for i in 0..n_layer {
            let p = format!("blk.{i}");
            layers.push(Layer {
                attn_norm: get(&format!("{p}.attn_norm.weight"))?,
                wq: get(&format!("{p}.attn_q.weight"))?,
                wk: get(&format!("{p}.attn_k.weight"))?,
                wv: get(&format!("{p}.attn_v.weight"))?,
                wo: get(&format!("{p}.attn_output.weight"))?,
                ffn_norm: get(&format!("{p}.ffn_norm.weight"))?,
                w_gate: get(&format!("{p}.ffn_gate.weight"))?,
                w_up: get(&format!("{p}.ffn_up.weight"))?,
                w_down: get(&format!("{p}.ffn_down.weight"))?,
            });
        }
        let freq_factors = if content.tensor_infos.contains_key("rope_freqs.weight") {
            Some(get("rope_freqs.weight")?.to_vec1::<f32>()?)
        } else {
            None
        };

        // Llama 3 scales each frequency by a factor stored in the GGUF.
        let max_positions = 4096;
        let inv_freq: Vec<f32> = (0..head_dim / 2)
            .map(|i| {
                let base = 1.0 / rope_theta.powf(2.0 * i as f32 / head_dim as f32);
                match &freq_factors {
                    Some(f) => base / f.get(i).copied().unwrap_or(1.0),
                    None => base,
                }
            })
            .collect();
        let inv_freq = Tensor::from_vec(inv_freq, (1, head_dim / 2), &device)?;
        let positions = Tensor::arange(0u32, max_positions as u32, &device)?
            .to_dtype(DType::F32)?
            .reshape((max_positions, 1))?;
        let angles = positions.broadcast_mul(&inv_freq)?;

        Ok(Self {
            config: LlamaConfig {
                n_layer,
                n_embd,
                n_head,
                n_head_kv,
                head_dim,
                n_ff,
                n_vocab,
                rope_theta,
                rms_eps,
            },
            tok_embd,
            layers,
            out_norm,
            output,
            cos: angles.cos()?,
            sin: angles.sin()?,
        })
    }

    /// Adds `delta` (`[n_embd, n_ff]`) to layer `layer`'s down-projection:
    /// how already-active edits are applied before computing a new one.
    pub fn add_to_down_proj(&mut self, layer: usize, delta: &Tensor) -> Result<(), EditorError> {
        let l = self
            .layers
            .get_mut(layer)
            .ok_or_else(|| EditorError::Model(format!("no layer {layer}")))?;
        l.w_down = (&l.w_down + delta)?;
        Ok(())
    }

    fn causal_mask(t: usize, device: &Device) -> candle_core::Result<Tensor> {
        let mask: Vec<f32> = (0..t)
            .flat_map(|i| (0..t).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
            .collect();
        Tensor::from_vec(mask, (t, t), device)
    }

    fn linear(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
        // x: [B, T, in], w: [out, in]
        let (b, t, d) = x.dims3()?;
        x.reshape((b * t, d))?.matmul(&w.t()?)?.reshape((b, t, ()))
    }

    fn attention(&self, l: &Layer, x: &Tensor, mask: &Tensor) -> candle_core::Result<Tensor> {
        let c = &self.config;
        let (b, t, _) = x.dims3()?;
        let h = rms_norm_slow(x, &l.attn_norm, c.rms_eps)?;
        let q = Self::linear(&h, &l.wq)?
            .reshape((b, t, c.n_head, c.head_dim))?
            .transpose(1, 2)?
            .contiguous()?;
        let k = Self::linear(&h, &l.wk)?
            .reshape((b, t, c.n_head_kv, c.head_dim))?
            .transpose(1, 2)?
            .contiguous()?;
        let v = Self::linear(&h, &l.wv)?
            .reshape((b, t, c.n_head_kv, c.head_dim))?
            .transpose(1, 2)?;
        let cos = self.cos.narrow(0, 0, t)?;
        let sin = self.sin.narrow(0, 0, t)?;
        let q = rope_i_slow(&q, &cos, &sin)?;
        let k = rope_i_slow(&k, &cos, &sin)?;
        // Grouped-query attention: each key/value head serves n_rep query heads.
        let n_rep = c.n_head / c.n_head_kv;
        let (k, v) = if n_rep == 1 {
            (k, v.contiguous()?)
        } else {
            let rep = |x: Tensor| -> candle_core::Result<Tensor> {
                x.unsqueeze(2)?
                    .broadcast_as((b, c.n_head_kv, n_rep, t, c.head_dim))?
                    .reshape((b, c.n_head, t, c.head_dim))
            };
            (rep(k)?, rep(v)?)
        };
        let scale = 1.0 / (c.head_dim as f64).sqrt();
        let att = (q.matmul(&k.t()?)? * scale)?.broadcast_add(mask)?;
        let att = softmax(&att, D::Minus1)?;
        let y = att.matmul(&v)?.transpose(1, 2)?.reshape((b, t, c.n_embd))?;
        Self::linear(&y, &l.wo)
    }

    /// The MLP's down-projection input for the post-attention residual `x`.
    fn mlp_keys(&self, l: &Layer, x: &Tensor) -> candle_core::Result<Tensor> {
        let h = rms_norm_slow(x, &l.ffn_norm, self.config.rms_eps)?;
        Self::linear(&h, &l.w_gate)?.silu()? * Self::linear(&h, &l.w_up)?
    }

    fn block(&self, l: &Layer, x: &Tensor, mask: &Tensor) -> candle_core::Result<Tensor> {
        let x = (x + self.attention(l, x, mask)?)?;
        let keys = self.mlp_keys(l, &x)?;
        &x + Self::linear(&keys, &l.w_down)?
    }

    fn embed(&self, batch: &Batch) -> candle_core::Result<Tensor> {
        let ids = batch.ids(&Device::Cpu)?;
        let (b, t) = ids.dims2()?;
        self.tok_embd
            .index_select(&ids.flatten_all()?, 0)?
            .reshape((b, t, self.config.n_embd))
    }

    /// Runs layers `0..=layer` and returns layer `layer`'s unedited output and
    /// its MLP keys. No tensor here is a variable, so no graph is recorded.
    pub fn prefix(&self, batch: &Batch, layer: usize) -> Result<Prefix, EditorError> {
        if layer >= self.config.n_layer {
            return Err(EditorError::Model(format!(
                "layer {layer} does not exist (the model has {})",
                self.config.n_layer
            )));
        }
        let mask = Self::causal_mask(batch.max_len, &Device::Cpu)?;
        let mut x = self.embed(batch)?;
        for l in &self.layers[..layer] {
            x = self.block(l, &x, &mask)?;
        }
        let l = &self.layers[layer];
        let mid = (&x + self.attention(l, &x, &mask)?)?;
        let keys = self.mlp_keys(l, &mid)?;
        let base_out = (&mid + Self::linear(&keys, &l.w_down)?)?;
        Ok(Prefix {
            base_out,
            keys,
            layer,
            max_len: batch.max_len,
        })
    }

    /// Runs the layers after the prefix with `delta` (`[B, T, n_embd]`) added
    /// to layer L's output, and returns the logits at the flat positions
    /// `rows` (`b * max_len + t`): `[rows.len(), n_vocab]`.
    pub fn suffix_logits(
        &self,
        prefix: &Prefix,
        delta: Option<&Tensor>,
        rows: &Tensor,
    ) -> Result<Tensor, EditorError> {
        let mask = Self::causal_mask(prefix.max_len, &Device::Cpu)?;
        let mut x = match delta {
            Some(d) => (&prefix.base_out + d)?,
            None => prefix.base_out.clone(),
        };
        for l in &self.layers[prefix.layer + 1..] {
            x = self.block(l, &x, &mask)?;
        }
        let (b, t, d) = x.dims3()?;
        let picked = x.reshape((b * t, d))?.index_select(rows, 0)?;
        let normed = rms_norm_slow(&picked, &self.out_norm, self.config.rms_eps)?;
        Ok(normed.matmul(&self.output.t()?)?)
    }

    /// Logits at every position of one sequence (parity checks).
    pub fn logits(&self, tokens: &[u32]) -> Result<Tensor, EditorError> {
        let batch = Batch::new(vec![tokens.to_vec()]);
        let mask = Self::causal_mask(batch.max_len, &Device::Cpu)?;
        let mut x = self.embed(&batch)?;
        for l in &self.layers {
            x = self.block(l, &x, &mask)?;
        }
        let x = x.i(0)?;
        let normed = rms_norm_slow(&x, &self.out_norm, self.config.rms_eps)?;
        Ok(normed.matmul(&self.output.t()?)?)
    }

    /// The down-projection weight of `layer` as currently applied.
    pub fn down_proj(&self, layer: usize) -> Option<&Tensor> {
        self.layers.get(layer).map(|l| &l.w_down)
    }
}
