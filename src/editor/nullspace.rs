//! The null-space projector (after AlphaEdit, arXiv 2410.02355).
//!
//! Ordinary conversation drives layer L's MLP keys through a subspace of the
//! n_ff-dimensional key space. An edit whose input side A is replaced by A·P,
//! with P = I − UUᵀ projecting out the top directions of the key covariance
//! (those holding 95% of its energy by default), barely responds to ordinary inputs, so
//! unrelated answers stay as they were.
//!
//! The corpus is self-generated: the model's own greedy answers to the
//! shipped `corpus_prompts.txt`, rendered through its chat template. Both the
//! corpus and each layer's projector are cached per model fingerprint.

use std::io::{Read, Write};
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};

use super::model::{Batch, LlamaModel};
use super::EditorError;
use crate::engine::{ChatMessage, Engine, GenerationParams};

/// Share of the key covariance's energy that the projector removes: 0.95
/// (515 of SmolLM2's 1,536 key directions at layer 20). AlphaEdit's 0.99
/// (962 directions) left too few for an edit to act through: it accepted 16
/// of 30 UPQA edits in three profiles where 0.95 accepted 25, with unrelated
/// answers kept about as well (docs/RESULTS.md, "The null-space energy,
/// session 18").
pub const ENERGY: f64 = 0.95;

/// The share the one retry of an edit uses when the gate refused the first
/// attempt for locality (it hijacked unrelated questions or broke earlier
/// preferences); an edit refused for not learning its questions retries at
/// the first share. The same as [`ENERGY`] by default: a 0.99 retry (fewer
/// ordinary keys left to fire on) rescued none of the five locality
/// refusals in three UPQA personas (docs/RESULTS.md, "A stricter retry,
/// session 19"). Kept as a setting for experiments.
pub const RETRY_ENERGY: f64 = ENERGY;
const ANSWER_TOKENS: u32 = 48;

pub struct NullSpace {
    /// `[n_ff, n_ff]`.
    pub projector: Tensor,
    /// Directions removed (the rank of UUᵀ).
    pub removed: usize,
    pub corpus_tokens: usize,
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> EditorError + '_ {
    move |source| EditorError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The corpus as token sequences, generated once per model and cached.
pub fn corpus(
    engine: &mut Engine,
    system_prompt: &str,
    cache_dir: &Path,
    model_sha256: &str,
) -> Result<Vec<Vec<u32>>, EditorError> {
    let path = cache_dir.join(format!("{model_sha256}.corpus.json"));
    if let Ok(text) = std::fs::read_to_string(&path) {
        if let Ok(seqs) = serde_json::from_str::<Vec<Vec<u32>>>(&text) {
            return Ok(seqs);
        }
    }
    let mut seqs = Vec::new();
    for prompt in super::prompts::corpus_prompts() {
        let messages = vec![
            ChatMessage::system(system_prompt),
            ChatMessage::user(&prompt),
        ];
        let generation = engine.chat(
            &messages,
            &GenerationParams::greedy(ANSWER_TOKENS),
            &mut |_| ControlFlow::Continue(()),
        )?;
        let mut tokens: Vec<u32> = engine
            .tokenize(&engine.render(&messages)?)
            .iter()
            .map(|t| t.0 as u32)
            .collect();
        tokens.extend(generation.tokens.iter().map(|&t| t as u32));
        seqs.push(tokens);
    }
    std::fs::create_dir_all(cache_dir).map_err(io(cache_dir))?;
    let text = serde_json::to_string(&seqs).map_err(|e| EditorError::Invalid(e.to_string()))?;
    std::fs::write(&path, text).map_err(io(&path))?;
    Ok(seqs)
}

/// The energy of the projectors cached before the file name carried it:
/// 0.99, the first default. Pinned here rather than read from [`ENERGY`], so
/// changing the default cannot load an old 0.99 projector as the new share.
const UNSUFFIXED_ENERGY: f64 = 0.99;

fn projector_path(cache_dir: &Path, model_sha256: &str, layer: usize, energy: f64) -> PathBuf {
    if energy == UNSUFFIXED_ENERGY {
        cache_dir.join(format!("{model_sha256}.layer{layer}.projector"))
    } else {
        cache_dir.join(format!(
            "{model_sha256}.layer{layer}.energy{energy}.projector"
        ))
    }
}

/// Loads the cached projector for `layer` that removes `energy` (a share,
/// 0–1) of the key covariance, or computes and caches it.
pub fn load_or_compute(
    model: &LlamaModel,
    corpus: &[Vec<u32>],
    cache_dir: &Path,
    model_sha256: &str,
    layer: usize,
    energy: f64,
) -> Result<NullSpace, EditorError> {
    if !(0.0..1.0).contains(&energy) {
        return Err(EditorError::Invalid(format!(
            "the null-space energy must be at least 0 and below 1, not {energy}"
        )));
    }
    let n = model.config.n_ff;
    let path = projector_path(cache_dir, model_sha256, layer, energy);
    if let Some(cached) = read_cached(&path, n)? {
        return Ok(cached);
    }
    let (cov, count) = covariance(model, corpus, layer)?;
    let matrix = nalgebra::DMatrix::from_fn(n, n, |r, c| cov[r * n + c]);
    let eig = nalgebra::SymmetricEigen::new(matrix);
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&x, &y| eig.eigenvalues[y].total_cmp(&eig.eigenvalues[x]));
    let total: f64 = eig.eigenvalues.iter().map(|v| v.max(0.0)).sum();
    let mut acc = 0.0;
    let mut removed = 0;
    for &i in &order {
        if acc >= energy * total {
            break;
        }
        acc += eig.eigenvalues[i].max(0.0);
        removed += 1;
    }
    let mut p = vec![0f32; n * n];
    for r in 0..n {
        p[r * n + r] = 1.0;
    }
    for &k in &order[..removed] {
        let u = eig.eigenvectors.column(k);
        for r in 0..n {
            let ur = u[r];
            for c in 0..n {
                p[r * n + c] -= (ur * u[c]) as f32;
            }
        }
    }
    write_cached(&path, n, removed, count, &p)?;
    Ok(NullSpace {
        projector: Tensor::from_vec(p, (n, n), &Device::Cpu)?,
        removed,
        corpus_tokens: count,
    })
}

/// C = KᵀK / N over every real (non-padding) position of the corpus, in f64,
/// row-major `[n_ff, n_ff]`, and N.
fn covariance(
    model: &LlamaModel,
    corpus: &[Vec<u32>],
    layer: usize,
) -> Result<(Vec<f64>, usize), EditorError> {
    let n = model.config.n_ff;
    let mut cov = vec![0f64; n * n];
    let mut count = 0usize;
    // A few sequences at a time.
    for chunk in corpus.chunks(8) {
        let (shared_keys, own_keys) = chunk_keys(model, chunk, layer)?;
        for (seq, own) in chunk.iter().zip(own_keys) {
            // Every sequence contains the shared prefix: count it for each.
            let keys = Tensor::cat(&[&shared_keys, &own], 0)?.contiguous()?;
            let kk = keys.t()?.matmul(&keys)?.flatten_all()?.to_vec1::<f32>()?;
            for (c, v) in cov.iter_mut().zip(kk) {
                *c += f64::from(v);
            }
            count += seq.len();
        }
    }
    for c in &mut cov {
        *c /= count.max(1) as f64;
    }
    Ok((cov, count))
}

/// Ridge added to C before inverting it, relative to its mean eigenvalue:
/// a few thousand corpus tokens leave C ill-conditioned in some directions.
const COVARIANCE_RIDGE: f64 = 1e-2;

/// (C + λI)⁻¹ of layer `layer`'s keys over the corpus, for ROME; cached per
/// model and layer like the projector.
pub fn load_or_compute_inverse_covariance(
    model: &LlamaModel,
    corpus: &[Vec<u32>],
    cache_dir: &Path,
    model_sha256: &str,
    layer: usize,
) -> Result<Tensor, EditorError> {
    let n = model.config.n_ff;
    let path = cache_dir.join(format!("{model_sha256}.layer{layer}.cinv"));
    if let Some(cached) = read_cached(&path, n)? {
        return Ok(cached.projector);
    }
    let (cov, count) = covariance(model, corpus, layer)?;
    let trace: f64 = (0..n).map(|i| cov[i * n + i]).sum();
    let ridge = COVARIANCE_RIDGE * trace / n as f64;
    let matrix = nalgebra::DMatrix::from_fn(n, n, |r, c| {
        cov[r * n + c] + if r == c { ridge } else { 0.0 }
    });
    let inverse = matrix
        .cholesky()
        .ok_or_else(|| {
            EditorError::Model(format!(
                "key covariance at layer {layer} is not positive definite"
            ))
        })?
        .inverse();
    // nalgebra is column-major; C⁻¹ is symmetric, so the order is moot.
    let values: Vec<f32> = inverse.iter().map(|&v| v as f32).collect();
    write_cached(&path, n, 0, count, &values)?;
    Ok(Tensor::from_vec(values, (n, n), &Device::Cpu)?)
}

/// Layer `layer`'s MLP keys for a batch of sequences: those of the prefix the
/// sequences share (`[P, n_ff]`) and each sequence's own (`[len - P, n_ff]`).
fn chunk_keys(
    model: &LlamaModel,
    sequences: &[Vec<u32>],
    layer: usize,
) -> Result<(Tensor, Vec<Tensor>), EditorError> {
    let prefix = model.prefix(&Batch::new(sequences.to_vec()), layer)?;
    let shared = prefix.shared_len;
    let own = sequences
        .iter()
        .enumerate()
        .map(|(i, seq)| prefix.keys.get(i)?.narrow(0, 0, seq.len() - shared))
        .collect::<candle_core::Result<Vec<_>>>()?;
    Ok((prefix.keys_shared.get(0)?, own))
}

/// Relative eigenvalue below which a direction of the excluded keys counts
/// as already removed (numerical noise, or a repeat of another key).
const EXCLUDE_TOLERANCE: f64 = 1e-6;

/// Narrows `projector` (or the identity) so that it also removes every key
/// that `sequences` produce at `layer`: an edit trained as A·P then adds
/// exactly nothing at any position of those sequences, so the model's greedy
/// answers to them cannot change. Returns the narrowed projector and how many
/// directions it removed beyond `projector`.
///
/// The basis comes from the Gram matrix of the projected keys (m × m, with m
/// the number of key rows) rather than from an n_ff × n_ff eigenproblem,
/// which keeps this cheap enough to run for every edit.
pub fn exclude_keys(
    model: &LlamaModel,
    projector: Option<&Tensor>,
    sequences: &[Vec<u32>],
    layer: usize,
) -> Result<(Tensor, usize), EditorError> {
    let n = model.config.n_ff;
    let base = match projector {
        Some(p) => p.clone(),
        None => Tensor::eye(n, candle_core::DType::F32, &Device::Cpu)?,
    };
    if sequences.is_empty() {
        return Ok((base, 0));
    }
    exclude_key_rows(&base, &sequence_keys(model, sequences, layer)?)
}

/// Every key `sequences` produce at `layer`, one row per position (the
/// shared prefix's once): `[positions, n_ff]`.
pub fn sequence_keys(
    model: &LlamaModel,
    sequences: &[Vec<u32>],
    layer: usize,
) -> Result<Tensor, EditorError> {
    let (shared, own) = chunk_keys(model, sequences, layer)?;
    let mut rows = vec![shared];
    rows.extend(own);
    Ok(Tensor::cat(&rows, 0)?.contiguous()?)
}

/// Narrows `base` (a projector, `[n_ff, n_ff]`) so that it also removes the
/// span of `keys` (`[m, n_ff]`). See [`exclude_keys`].
pub fn exclude_key_rows(base: &Tensor, keys: &Tensor) -> Result<(Tensor, usize), EditorError> {
    let base = base.clone();
    // P is symmetric, so K·P projects every key row.
    let keys = keys.contiguous()?.matmul(&base)?;
    let m = keys.dim(0)?;
    let gram = keys.matmul(&keys.t()?)?.to_vec2::<f32>()?;
    let eig = nalgebra::SymmetricEigen::new(nalgebra::DMatrix::from_fn(m, m, |r, c| {
        f64::from(gram[r][c])
    }));
    let top = eig.eigenvalues.iter().cloned().fold(0.0f64, f64::max);
    let kept: Vec<usize> = (0..m)
        .filter(|&i| eig.eigenvalues[i] > EXCLUDE_TOLERANCE * top && top > 0.0)
        .collect();
    if kept.is_empty() {
        return Ok((base, 0));
    }
    // Orthonormal rows Q = Λ^-1/2 Vᵀ K spanning the projected keys.
    let mut mix = vec![0f32; kept.len() * m];
    for (r, &i) in kept.iter().enumerate() {
        let scale = 1.0 / eig.eigenvalues[i].sqrt();
        for c in 0..m {
            mix[r * m + c] = (eig.eigenvectors[(c, i)] * scale) as f32;
        }
    }
    let q = Tensor::from_vec(mix, (kept.len(), m), &Device::Cpu)?.matmul(&keys)?;
    let narrowed = (base - q.t()?.matmul(&q)?)?;
    Ok((narrowed, kept.len()))
}

const MAGIC: &[u8; 8] = b"IMPRNSP1";

fn write_cached(
    path: &Path,
    n: usize,
    removed: usize,
    count: usize,
    p: &[f32],
) -> Result<(), EditorError> {
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(io(dir))?;
    let mut bytes = Vec::with_capacity(32 + p.len() * 4);
    bytes.extend_from_slice(MAGIC);
    for v in [n as u64, removed as u64, count as u64] {
        bytes.extend_from_slice(&v.to_le_bytes());
    }
    for v in p {
        bytes.extend_from_slice(&v.to_le_bytes());
    }
    tmp.write_all(&bytes).map_err(io(path))?;
    tmp.persist(path).map_err(|e| io(path)(e.error))?;
    Ok(())
}

/// A damaged or foreign cache file is ignored and recomputed.
fn read_cached(path: &Path, n: usize) -> Result<Option<NullSpace>, EditorError> {
    let Ok(mut file) = std::fs::File::open(path) else {
        return Ok(None);
    };
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes).map_err(io(path))?;
    if bytes.len() != 32 + n * n * 4 || &bytes[..8] != MAGIC {
        tracing::warn!(path = %path.display(), "ignoring a damaged null-space cache");
        return Ok(None);
    }
    let word =
        |i: usize| u64::from_le_bytes(bytes[8 + i * 8..16 + i * 8].try_into().unwrap_or([0; 8]));
    if word(0) as usize != n {
        return Ok(None);
    }
    let p: Vec<f32> = bytes[32..]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    Ok(Some(NullSpace {
        projector: Tensor::from_vec(p, (n, n), &Device::Cpu)?,
        removed: word(1) as usize,
        corpus_tokens: word(2) as usize,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_energy_has_its_own_cache_file_whatever_the_default() {
        let dir = Path::new("/cache");
        let at = |energy| projector_path(dir, "sha", 20, energy);
        // Files written before the name carried the energy hold 0.99.
        assert_eq!(at(0.99), dir.join("sha.layer20.projector"));
        assert_ne!(at(0.95), at(0.99));
        assert_ne!(at(0.9), at(0.95));
        assert_ne!(at(ENERGY), projector_path(dir, "sha", 21, ENERGY));
    }
}
