//! A differentiable llama forward pass over the same GGUF that llama.cpp
//! serves, dequantized to f32.
//!
//! It reads like the architecture: RMSNorm → attention with interleaved RoPE
//! and grouped-query heads → residual → RMSNorm → SwiGLU MLP → residual,
//! then a final norm and the (possibly tied) output projection. Qwen2 is the
//! same block with biases on the query, key and value projections and RoPE
//! applied to the two halves of each head (llama.cpp's "NEOX" rotation)
//! instead of to interleaved pairs.
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
use candle_nn::rotary_emb::{rope_i_slow, rope_slow};

use super::EditorError;

/// A linear layer whose weight never trains. candle's own matmul backward
/// also computes the weight's gradient, which doubles the cost of every
/// backward pass here for a result that is thrown away; this op's backward
/// computes only the input's gradient.
struct FrozenLinear {
    w: Tensor,
}

impl candle_core::CustomOp1 for FrozenLinear {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    fn cpu_fwd(
        &self,
        storage: &candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let candle_core::CpuStorage::F32(data) = storage else {
            candle_core::bail!("frozen-linear expects f32 input");
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("frozen-linear expects a contiguous input");
        };
        let x = data[start..end].to_vec();
        let dims = layout.shape().dims();
        let n_in = dims.last().copied().unwrap_or(1);
        let rows = x.len() / n_in.max(1);
        let y = Tensor::from_vec(x, (rows, n_in), &Device::Cpu)?.matmul(&self.w.t()?)?;
        let n_out = y.dim(1)?;
        let mut out_dims = dims[..dims.len() - 1].to_vec();
        out_dims.push(n_out);
        Ok((
            candle_core::CpuStorage::F32(y.flatten_all()?.to_vec1::<f32>()?),
            candle_core::Shape::from(out_dims),
        ))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let n_out = grad_res.dims().last().copied().unwrap_or(1);
        let rows = grad_res.elem_count() / n_out.max(1);
        let grad = grad_res.reshape((rows, n_out))?.matmul(&self.w)?;
        Ok(Some(grad.reshape(arg.shape())?))
    }
}

/// Hyper-parameters read from the GGUF metadata.
#[derive(Debug, Clone)]
pub struct LlamaConfig {
    /// `general.architecture`: "llama" or "qwen2".
    pub arch: String,
    /// Rotate the two halves of each head (Qwen2) instead of adjacent pairs.
    pub rope_halves: bool,
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
    /// Qwen2's projection biases.
    bq: Option<Tensor>,
    bk: Option<Tensor>,
    bv: Option<Tensor>,
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
    /// The shared prefix never grows past this many tokens (positions whose
    /// hidden state the loss reads must stay in the continuations).
    pub shared_limit: usize,
}

impl Batch {
    pub fn new(sequences: Vec<Vec<u32>>) -> Self {
        let max_len = sequences.iter().map(Vec::len).max().unwrap_or(0);
        Self {
            sequences,
            max_len,
            shared_limit: usize::MAX,
        }
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

/// LoRA factors on one layer's query and value projections.
pub struct QvLora {
    pub a_q: Tensor,
    pub b_q: Tensor,
    pub a_v: Tensor,
    pub b_v: Tensor,
}

/// A batch split into the tokens every sequence starts with and the
/// right-padded continuations.
pub struct SplitBatch {
    pub shared: Vec<u32>,
    pub continuations: Vec<Vec<u32>>,
    /// Length of the longest continuation.
    pub width: usize,
}

impl SplitBatch {
    fn continuation_ids(&self) -> Vec<u32> {
        let mut flat = Vec::with_capacity(self.continuations.len() * self.width);
        for c in &self.continuations {
            flat.extend_from_slice(c);
            flat.extend(std::iter::repeat_n(0u32, self.width - c.len()));
        }
        flat
    }
}

impl Batch {
    /// Splits off the longest common prefix (leaving every sequence at least
    /// one token of its own).
    pub fn split(&self) -> SplitBatch {
        let min_len = self.sequences.iter().map(Vec::len).min().unwrap_or(0);
        let first = self.sequences.first().cloned().unwrap_or_default();
        let mut shared = 0;
        while shared + 1 < min_len.min(self.shared_limit.saturating_add(1))
            && self.sequences.iter().all(|s| s[shared] == first[shared])
        {
            shared += 1;
        }
        // The shared part must be non-empty for the tensors; one token of
        // BOS-or-template is always common in practice, and when it is not,
        // the first token is simply repeated per sequence below.
        let shared = shared.max(1).min(min_len.saturating_sub(1)).max(1);
        let continuations: Vec<Vec<u32>> = self
            .sequences
            .iter()
            .map(|s| s.get(shared..).map(<[u32]>::to_vec).unwrap_or_default())
            .collect();
        let width = continuations.iter().map(Vec::len).max().unwrap_or(0);
        SplitBatch {
            shared: first.get(..shared).map(<[u32]>::to_vec).unwrap_or_default(),
            continuations,
            width,
        }
    }
}

/// Additive attention masks for a split batch.
pub struct SplitMasks {
    /// `[P, P]`: causal within the shared prefix.
    shared: Tensor,
    /// `[S, P + S]`: all of the prefix, causal within the continuation.
    continuation: Tensor,
}

impl SplitMasks {
    fn new(p: usize, s: usize) -> candle_core::Result<Self> {
        let shared = LlamaModel::causal_mask(p, &Device::Cpu)?;
        let cont: Vec<f32> = (0..s)
            .flat_map(|i| {
                (0..p + s).map(move |j| {
                    if j >= p && j - p > i {
                        f32::NEG_INFINITY
                    } else {
                        0.0
                    }
                })
            })
            .collect();
        Ok(Self {
            shared,
            continuation: Tensor::from_vec(cont, (s, p + s), &Device::Cpu)?,
        })
    }
}

/// The shared prefix's rotated keys and values at each layer after an
/// edit's layer (see [`LlamaModel::frozen_shared`]).
pub struct FrozenShared {
    kv: Vec<(Tensor, Tensor)>,
}

/// Layer L's state for a batch, computed once per edit.
pub struct Prefix {
    /// Layer L's output without the edit, shared part: `[1, P, n_embd]`.
    pub base_shared: Tensor,
    /// ... and continuations: `[B, S, n_embd]`.
    pub base: Tensor,
    /// The down-projection's input (the MLP "keys"): `[1, P, n_ff]`.
    pub keys_shared: Tensor,
    /// ... and `[B, S, n_ff]`.
    pub keys: Tensor,
    pub layer: usize,
    masks: SplitMasks,
    /// S: continuation width (flat row index = b * width + s).
    pub width: usize,
    /// P.
    pub shared_len: usize,
}

/// `general.architecture`, checked against the ones this forward implements.
fn architecture(ct: &gguf_file::Content, path: &Path) -> Result<String, EditorError> {
    let arch = ct
        .metadata
        .get("general.architecture")
        .and_then(|v| v.to_string().ok())
        .cloned()
        .unwrap_or_default();
    if crate::models::gguf::SUPPORTED_ARCHITECTURES.contains(&arch.as_str()) {
        Ok(arch)
    } else {
        Err(EditorError::Model(format!(
            "the editor supports {} models; {} is {arch:?}",
            crate::models::gguf::SUPPORTED_ARCHITECTURES.join(", "),
            path.display()
        )))
    }
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
    /// The MLP width of a llama GGUF, read from its header only.
    pub fn n_ff_of(path: &Path) -> Result<usize, EditorError> {
        let content = crate::models::gguf::read_header(path)?;
        let arch = architecture(&content, path)?;
        Ok(meta_u32(&content, &format!("{arch}.feed_forward_length"))? as usize)
    }

    /// Loads and dequantizes every tensor of a llama GGUF.
    pub fn load(path: &Path) -> Result<Self, EditorError> {
        let content = crate::models::gguf::read_header(path)?;
        let arch = architecture(&content, path)?;
        let key = |k: &str| format!("{arch}.{k}");
        let n_layer = meta_u32(&content, &key("block_count"))? as usize;
        let n_embd = meta_u32(&content, &key("embedding_length"))? as usize;
        let n_head = meta_u32(&content, &key("attention.head_count"))? as usize;
        let n_head_kv = content
            .metadata
            .get(&key("attention.head_count_kv"))
            .and_then(|v| v.to_u32().ok())
            .map_or(n_head, |v| v as usize);
        let n_ff = meta_u32(&content, &key("feed_forward_length"))? as usize;
        let rope_theta = meta_f32(&content, &key("rope.freq_base")).unwrap_or(10_000.0);
        let rms_eps = meta_f32(&content, &key("attention.layer_norm_rms_epsilon")).unwrap_or(1e-5);
        let head_dim = n_embd / n_head;
        let rope_dims = content
            .metadata
            .get(&key("rope.dimension_count"))
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
            let mut bias = |name: &str| -> Result<Option<Tensor>, EditorError> {
                let name = format!("{p}.{name}.bias");
                if content.tensor_infos.contains_key(&name) {
                    get(&name).map(Some)
                } else {
                    Ok(None)
                }
            };
            let (bq, bk, bv) = (bias("attn_q")?, bias("attn_k")?, bias("attn_v")?);
            layers.push(Layer {
                attn_norm: get(&format!("{p}.attn_norm.weight"))?,
                wq: get(&format!("{p}.attn_q.weight"))?,
                wk: get(&format!("{p}.attn_k.weight"))?,
                wv: get(&format!("{p}.attn_v.weight"))?,
                wo: get(&format!("{p}.attn_output.weight"))?,
                bq,
                bk,
                bv,
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
                rope_halves: arch == "qwen2",
                arch,
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

    /// `x @ wᵀ` for a frozen weight `w` (`[out, in]`), x `[B, T, in]`.
    fn linear(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
        x.contiguous()?.apply_op1(FrozenLinear { w: w.clone() })
    }

    /// Queries, keys and values of `h` (`[B, T, n_embd]`), rotated for
    /// positions `offset..offset + T`. Keys and values keep their n_head_kv
    /// heads; [`Self::attend`] shares them across query heads.
    fn qkv(
        &self,
        l: &Layer,
        h: &Tensor,
        offset: usize,
        lora: Option<&QvLora>,
    ) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
        let c = &self.config;
        let (b, t, d) = h.dims3()?;
        let heads = |x: Tensor, n: usize| -> candle_core::Result<Tensor> {
            x.reshape((b, t, n, c.head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let low_rank = |a: &Tensor, bm: &Tensor| -> candle_core::Result<Tensor> {
            h.reshape((b * t, d))?
                .matmul(&a.t()?)?
                .matmul(&bm.t()?)?
                .reshape((b, t, ()))
        };
        let project = |w: &Tensor, bias: &Option<Tensor>| -> candle_core::Result<Tensor> {
            let y = Self::linear(h, w)?;
            match bias {
                Some(b) => y.broadcast_add(b),
                None => Ok(y),
            }
        };
        let (mut q, mut v) = (project(&l.wq, &l.bq)?, project(&l.wv, &l.bv)?);
        if let Some(lora) = lora {
            q = (q + low_rank(&lora.a_q, &lora.b_q)?)?;
            v = (v + low_rank(&lora.a_v, &lora.b_v)?)?;
        }
        let cos = self.cos.narrow(0, offset, t)?;
        let sin = self.sin.narrow(0, offset, t)?;
        // Both are the slow (differentiable) kernels: the fused ones drop
        // gradients.
        let rotate = |x: &Tensor| {
            if c.rope_halves {
                rope_slow(x, &cos, &sin)
            } else {
                rope_i_slow(x, &cos, &sin)
            }
        };
        let q = rotate(&heads(q, c.n_head)?)?;
        let k = rotate(&heads(project(&l.wk, &l.bk)?, c.n_head_kv)?)?;
        Ok((q, k, heads(v, c.n_head_kv)?))
    }

    /// Scaled dot-product attention of `q` (`[B, H, Tq, d]`) over `k`, `v`
    /// (`[B, Hkv, Tk, d]`) with an additive `mask` (`[Tq, Tk]`), projected
    /// back to `[B, Tq, n_embd]`.
    fn attend(
        &self,
        l: &Layer,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: &Tensor,
    ) -> candle_core::Result<Tensor> {
        let c = &self.config;
        let (b, _, tq, _) = q.dims4()?;
        let tk = k.dim(2)?;
        // Grouped-query attention: each key/value head serves n_rep query heads.
        let n_rep = c.n_head / c.n_head_kv;
        let rep = |x: &Tensor| -> candle_core::Result<Tensor> {
            if n_rep == 1 {
                x.contiguous()
            } else {
                x.unsqueeze(2)?
                    .broadcast_as((b, c.n_head_kv, n_rep, tk, c.head_dim))?
                    .reshape((b, c.n_head, tk, c.head_dim))
            }
        };
        let (k, v) = (rep(k)?, rep(v)?);
        let scale = 1.0 / (c.head_dim as f64).sqrt();
        let att = (q.matmul(&k.t()?)? * scale)?.broadcast_add(mask)?;
        let att = softmax(&att, D::Minus1)?;
        let y = att
            .matmul(&v)?
            .transpose(1, 2)?
            .reshape((b, tq, c.n_embd))?;
        Self::linear(&y, &l.wo)
    }

    fn attention(&self, l: &Layer, x: &Tensor, mask: &Tensor) -> candle_core::Result<Tensor> {
        let h = rms_norm_slow(x, &l.attn_norm, self.config.rms_eps)?;
        let (q, k, v) = self.qkv(l, &h, 0, None)?;
        self.attend(l, &q, &k, &v, mask)
    }

    /// Attention for a shared prefix `xs` (`[1, P, n_embd]`) and the batch of
    /// continuations `xq` (`[B, S, n_embd]`) that all follow it. The prefix is
    /// computed once instead of once per sequence; each continuation sees all
    /// of it plus its own earlier tokens.
    fn attention_split(
        &self,
        l: &Layer,
        xs: &Tensor,
        xq: &Tensor,
        masks: &SplitMasks,
        lora: Option<&QvLora>,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let eps = self.config.rms_eps;
        let (qs, ks, vs) = self.qkv(l, &rms_norm_slow(xs, &l.attn_norm, eps)?, 0, lora)?;
        let ys = self.attend(l, &qs, &ks, &vs, &masks.shared)?;
        let yq = self.attention_continuation(l, xq, &ks, &vs, masks, lora)?;
        Ok((ys, yq))
    }

    /// Attention of the continuations `xq` (`[B, S, n_embd]`) over the shared
    /// prefix's rotated keys and values `ks`, `vs` (`[1, Hkv, P, d]`) and
    /// their own earlier tokens.
    fn attention_continuation(
        &self,
        l: &Layer,
        xq: &Tensor,
        ks: &Tensor,
        vs: &Tensor,
        masks: &SplitMasks,
        lora: Option<&QvLora>,
    ) -> candle_core::Result<Tensor> {
        let eps = self.config.rms_eps;
        let p = ks.dim(2)?;
        let b = xq.dim(0)?;
        let (qq, kq, vq) = self.qkv(l, &rms_norm_slow(xq, &l.attn_norm, eps)?, p, lora)?;
        let widen = |shared: &Tensor, own: &Tensor| -> candle_core::Result<Tensor> {
            let (_, h, _, d) = shared.dims4()?;
            Tensor::cat(&[&shared.broadcast_as((b, h, p, d))?, own], 2)
        };
        self.attend(
            l,
            &qq,
            &widen(ks, &kq)?,
            &widen(vs, &vq)?,
            &masks.continuation,
        )
    }

    /// The shared prefix's keys and values at every layer after the prefix's
    /// layer, for edits that add nothing at the shared positions (their keys
    /// are projected out): those states then never change, so they are
    /// computed once per edit instead of once per step.
    pub fn frozen_shared(&self, prefix: &Prefix) -> Result<FrozenShared, EditorError> {
        let eps = self.config.rms_eps;
        let mut xs = prefix.base_shared.clone();
        let mut kv = Vec::new();
        for l in &self.layers[prefix.layer + 1..] {
            let (qs, ks, vs) = self.qkv(l, &rms_norm_slow(&xs, &l.attn_norm, eps)?, 0, None)?;
            let ys = self.attend(l, &qs, &ks, &vs, &prefix.masks.shared)?;
            xs = (&xs + ys)?;
            xs = (&xs + Self::linear(&self.mlp_keys(l, &xs)?, &l.w_down)?)?;
            kv.push((ks, vs));
        }
        Ok(FrozenShared { kv })
    }

    /// [`Self::suffix_hidden`] for an edit that leaves the shared prefix
    /// untouched: only the continuations run, attending to `frozen`.
    pub fn suffix_hidden_frozen_shared(
        &self,
        prefix: &Prefix,
        frozen: &FrozenShared,
        delta: Option<&Tensor>,
        rows: &Tensor,
    ) -> Result<Tensor, EditorError> {
        let mut xq = match delta {
            Some(dq) => (&prefix.base + dq)?,
            None => prefix.base.clone(),
        };
        for (l, (ks, vs)) in self.layers[prefix.layer + 1..].iter().zip(&frozen.kv) {
            let yq = self.attention_continuation(l, &xq, ks, vs, &prefix.masks, None)?;
            xq = (&xq + yq)?;
            xq = (&xq + Self::linear(&self.mlp_keys(l, &xq)?, &l.w_down)?)?;
        }
        self.normed_rows(&xq, rows)
    }

    /// The MLP's down-projection input for the post-attention residual `x`.
    fn mlp_keys(&self, l: &Layer, x: &Tensor) -> candle_core::Result<Tensor> {
        let h = rms_norm_slow(x, &l.ffn_norm, self.config.rms_eps)?;
        Self::linear(&h, &l.w_gate)?.silu()? * Self::linear(&h, &l.w_up)?
    }

    /// One transformer block on an ordinary causal batch.
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

    /// Splits `batch` and embeds both parts: (split, masks, shared `[1, P, d]`,
    /// continuations `[B, S, d]`).
    fn embed_split(
        &self,
        batch: &Batch,
    ) -> candle_core::Result<(SplitBatch, SplitMasks, Tensor, Tensor)> {
        let split = batch.split();
        let masks = SplitMasks::new(split.shared.len(), split.width)?;
        let xs = self.embed_ids(&split.shared, 1, split.shared.len())?;
        let xq = self.embed_ids(
            &split.continuation_ids(),
            split.continuations.len(),
            split.width,
        )?;
        Ok((split, masks, xs, xq))
    }

    /// The final-normed hidden states of continuations `xq` at flat `rows`.
    fn normed_rows(&self, xq: &Tensor, rows: &Tensor) -> Result<Tensor, EditorError> {
        let (b, s, d) = xq.dims3()?;
        let picked = xq.reshape((b * s, d))?.index_select(rows, 0)?;
        Ok(rms_norm_slow(&picked, &self.out_norm, self.config.rms_eps)?)
    }

    fn embed_ids(&self, ids: &[u32], rows: usize, cols: usize) -> candle_core::Result<Tensor> {
        let ids = Tensor::from_slice(ids, rows * cols, &Device::Cpu)?;
        self.tok_embd
            .index_select(&ids, 0)?
            .reshape((rows, cols, self.config.n_embd))
    }

    /// Runs layers `0..=layer` and returns layer `layer`'s unedited output and
    /// its MLP keys, for the shared prefix and for the continuations. No
    /// tensor here is a variable, so no graph is recorded.
    pub fn prefix(&self, batch: &Batch, layer: usize) -> Result<Prefix, EditorError> {
        if layer >= self.config.n_layer {
            return Err(EditorError::Model(format!(
                "layer {layer} does not exist (the model has {})",
                self.config.n_layer
            )));
        }
        let (split, masks, mut xs, mut xq) = self.embed_split(batch)?;
        for l in &self.layers[..layer] {
            (xs, xq) = self.block_split(l, &xs, &xq, &masks, None)?;
        }
        let l = &self.layers[layer];
        let (ys, yq) = self.attention_split(l, &xs, &xq, &masks, None)?;
        let (mid_s, mid_q) = ((&xs + ys)?, (&xq + yq)?);
        let (keys_s, keys_q) = (self.mlp_keys(l, &mid_s)?, self.mlp_keys(l, &mid_q)?);
        Ok(Prefix {
            base_shared: (&mid_s + Self::linear(&keys_s, &l.w_down)?)?,
            base: (&mid_q + Self::linear(&keys_q, &l.w_down)?)?,
            keys_shared: keys_s,
            keys: keys_q,
            layer,
            masks,
            width: split.width,
            shared_len: split.shared.len(),
        })
    }

    fn block_split(
        &self,
        l: &Layer,
        xs: &Tensor,
        xq: &Tensor,
        masks: &SplitMasks,
        lora: Option<&QvLora>,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let (ys, yq) = self.attention_split(l, xs, xq, masks, lora)?;
        let (xs, xq) = ((xs + ys)?, (xq + yq)?);
        let ds = Self::linear(&self.mlp_keys(l, &xs)?, &l.w_down)?;
        let dq = Self::linear(&self.mlp_keys(l, &xq)?, &l.w_down)?;
        Ok(((xs + ds)?, (xq + dq)?))
    }

    /// Runs the layers after the prefix with the edit's output added to layer
    /// L (`delta_shared` `[1, P, n_embd]`, `delta` `[B, S, n_embd]`) and
    /// returns the final-normed hidden states at `rows`, flat indices
    /// `b * width + s` into the continuations: `[rows.len(), n_embd]`.
    pub fn suffix_hidden(
        &self,
        prefix: &Prefix,
        delta: Option<(&Tensor, &Tensor)>,
        rows: &Tensor,
    ) -> Result<Tensor, EditorError> {
        let (mut xs, mut xq) = match delta {
            Some((ds, dq)) => ((&prefix.base_shared + ds)?, (&prefix.base + dq)?),
            None => (prefix.base_shared.clone(), prefix.base.clone()),
        };
        for l in &self.layers[prefix.layer + 1..] {
            (xs, xq) = self.block_split(l, &xs, &xq, &prefix.masks, None)?;
        }
        self.normed_rows(&xq, rows)
    }

    /// The whole forward with a LoRA on every layer's query and value
    /// projections (the paper's LoRA baseline, used only to time it):
    /// final-normed hidden states at `rows` of the continuations.
    pub fn hidden_with_qv_lora(
        &self,
        batch: &Batch,
        loras: &[QvLora],
        rows: &Tensor,
    ) -> Result<Tensor, EditorError> {
        let (_, masks, mut xs, mut xq) = self.embed_split(batch)?;
        for (l, lora) in self.layers.iter().zip(loras) {
            (xs, xq) = self.block_split(l, &xs, &xq, &masks, Some(lora))?;
        }
        self.normed_rows(&xq, rows)
    }

    /// The output projection restricted to vocabulary entries `ids`
    /// (`[ids.len(), n_embd]`).
    pub fn output_rows(&self, ids: &Tensor) -> Result<Tensor, EditorError> {
        Ok(self.output.index_select(ids, 0)?)
    }

    /// Logits over the whole vocabulary for rows of final hidden states
    /// (`[rows, n_embd]`, already normed), differentiable in `hidden` only:
    /// a plain matmul's backward would also compute the
    /// `[n_embd, n_vocab]` gradient of the output projection at every step.
    pub fn vocab_logits(&self, hidden: &Tensor) -> Result<Tensor, EditorError> {
        Ok(Self::linear(hidden, &self.output)?)
    }

    /// The full output projection (`[n_vocab, n_embd]`).
    pub fn output(&self) -> &Tensor {
        &self.output
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

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .and_then(|d| d.abs())
            .and_then(|d| d.max_all())
            .and_then(|d| d.to_scalar::<f32>())
            .unwrap()
    }

    #[test]
    fn frozen_linear_matches_matmul_forward_and_input_gradient() {
        let dev = Device::Cpu;
        let w: Vec<f32> = (0..12).map(|i| (i as f32 * 0.37).sin()).collect();
        let w = Tensor::from_vec(w, (4, 3), &dev).unwrap();
        let x0: Vec<f32> = (0..18).map(|i| (i as f32 * 0.11).cos()).collect();
        let x = Var::from_tensor(&Tensor::from_vec(x0, (2, 3, 3), &dev).unwrap()).unwrap();
        let ours = LlamaModel::linear(x.as_tensor(), &w).unwrap();
        let reference = x
            .as_tensor()
            .reshape((6, 3))
            .and_then(|x| x.matmul(&w.t()?))
            .and_then(|y| y.reshape((2, 3, 4)))
            .unwrap();
        assert!(max_abs_diff(&ours, &reference) < 1e-6);
        let backward = |y: &Tensor| {
            y.sqr()
                .and_then(|y| y.sum_all())
                .and_then(|y| y.backward())
                .unwrap()
        };
        let (g_ours, g_ref) = (backward(&ours), backward(&reference));
        let (a, b) = (
            g_ours.get(x.as_tensor()).unwrap(),
            g_ref.get(x.as_tensor()).unwrap(),
        );
        assert!(max_abs_diff(a, b) < 1e-5, "input gradients differ");
    }
}
