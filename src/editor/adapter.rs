//! Writing the active edits as one GGUF LoRA adapter for llama.cpp.
//!
//! llama.cpp applies y += scale · B(A·x) per tensor, with
//! scale = alpha / rank when `adapter.lora.alpha` is non-zero and 1 when it is
//! zero. Edits on the same tensor are stacked along the rank axis
//! (A = [A₁; A₂], B = [B₁ B₂]), which adds their deltas exactly. We write
//! alpha = 0 (as F32: llama.cpp aborts on any other type) so the scale is 1
//! whatever the stacked rank, and each edit's own scale is already folded
//! into its B. The factors themselves are F16 ([`FACTOR_TYPE`]), each rank
//! component balanced between A and B first so neither side underflows.
//!
//! The adapter also records the base model's sha256 under
//! `imprint.model_sha256`, so an adapter is never attached to another model.

use std::collections::BTreeMap;
use std::io::BufWriter;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};

use super::{Edit, EditorError, LoraFactors};

pub const FINGERPRINT_KEY: &str = "imprint.model_sha256";

/// Stacks the factors of `edits` per tensor, in the order given.
pub fn stack(edits: &[&Edit]) -> Result<Vec<LoraFactors>, EditorError> {
    let mut by_tensor: BTreeMap<String, LoraFactors> = BTreeMap::new();
    for edit in edits {
        for f in &edit.factors {
            let entry = by_tensor
                .entry(f.tensor.clone())
                .or_insert_with(|| LoraFactors {
                    tensor: f.tensor.clone(),
                    rank: 0,
                    n_in: f.n_in,
                    n_out: f.n_out,
                    a: Vec::new(),
                    b: Vec::new(),
                });
            if entry.n_in != f.n_in || entry.n_out != f.n_out {
                return Err(EditorError::Invalid(format!(
                    "edit {} has a different shape for {}",
                    edit.id, f.tensor
                )));
            }
            // A is [rank, n_in] row-major: stacking rows is appending.
            entry.a.extend_from_slice(&f.a);
            // B is [n_out, rank] row-major: interleave each output row.
            let old_rank = entry.rank;
            let new_rank = old_rank + f.rank;
            let mut b = Vec::with_capacity(f.n_out * new_rank);
            for row in 0..f.n_out {
                b.extend_from_slice(&entry.b[row * old_rank..(row + 1) * old_rank]);
                b.extend_from_slice(&f.b[row * f.rank..(row + 1) * f.rank]);
            }
            entry.b = b;
            entry.rank = new_rank;
        }
    }
    Ok(by_tensor.into_values().collect())
}

/// The factors' type in the adapter file. Generation reads every factor
/// once per token, so their bytes are its cost: a 100-edit adapter
/// (rank 400 on one down-projection) is 3.4 MB in F32 against the model's
/// 98 MB; F16 makes it 1.7 MB. In alternating rounds on 2 cores F32 ran at
/// 0.983× the base speed and F16 at 0.995× (docs/RESULTS.md, "Decode
/// speed"): a gain inside the noise, but half the bytes to read. Its 11-bit
/// mantissa is far finer than the 8-bit activations llama.cpp multiplies
/// the model's own weights with, and [`balanced`] keeps both factors in
/// its range. The profile keeps the edits' f32 factors.
pub const FACTOR_TYPE: GgmlDType = GgmlDType::F16;

/// The factors with each rank component's scale shared evenly between A's
/// row and B's column (A_i·s, B_i/s with s = √(‖B_i‖/‖A_i‖)): the product
/// is unchanged, and neither factor holds values so small or large that
/// F16 loses them. ROME's a = C⁻¹k*/(k*ᵀC⁻¹k*) is tiny and its δ large.
fn balanced(f: &LoraFactors) -> (Vec<f32>, Vec<f32>) {
    let (mut a, mut b) = (f.a.clone(), f.b.clone());
    for i in 0..f.rank {
        let row = &mut a[i * f.n_in..(i + 1) * f.n_in];
        let a_norm = row
            .iter()
            .map(|v| f64::from(*v).powi(2))
            .sum::<f64>()
            .sqrt();
        let b_norm = (0..f.n_out)
            .map(|o| f64::from(f.b[o * f.rank + i]).powi(2))
            .sum::<f64>()
            .sqrt();
        if a_norm <= 0.0 || b_norm <= 0.0 || !(a_norm * b_norm).is_finite() {
            continue;
        }
        let s = (b_norm / a_norm).sqrt();
        row.iter_mut().for_each(|v| *v = (f64::from(*v) * s) as f32);
        for o in 0..f.n_out {
            let v = &mut b[o * f.rank + i];
            *v = (f64::from(*v) / s) as f32;
        }
    }
    (a, b)
}

/// Writes `edits` as one adapter at `path` (atomically). Returns false and
/// writes nothing when there are no edits: the engine then runs the base
/// model.
pub fn write_adapter(
    edits: &[&Edit],
    architecture: &str,
    model_sha256: &str,
    path: &Path,
) -> Result<bool, EditorError> {
    let stacked = stack(edits)?;
    if stacked.is_empty() {
        return Ok(false);
    }
    let device = Device::Cpu;
    let mut owned: Vec<(String, QTensor)> = Vec::new();
    for f in &stacked {
        let (a, b) = balanced(f);
        let a = Tensor::from_vec(a, (f.rank, f.n_in), &device)?;
        let b = Tensor::from_vec(b, (f.n_out, f.rank), &device)?;
        owned.push((
            format!("{}.lora_a", f.tensor),
            QTensor::quantize(&a, FACTOR_TYPE)?,
        ));
        owned.push((
            format!("{}.lora_b", f.tensor),
            QTensor::quantize(&b, FACTOR_TYPE)?,
        ));
    }
    let tensors: Vec<(&str, &QTensor)> = owned.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let general_type = Value::String("adapter".into());
    let adapter_type = Value::String("lora".into());
    let arch = Value::String(architecture.into());
    let alpha = Value::F32(0.0);
    let fingerprint = Value::String(model_sha256.into());
    let metadata: Vec<(&str, &Value)> = vec![
        ("general.type", &general_type),
        ("general.architecture", &arch),
        ("adapter.type", &adapter_type),
        ("adapter.lora.alpha", &alpha),
        (FINGERPRINT_KEY, &fingerprint),
    ];
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    let io = |source| EditorError::Io {
        path: path.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(io)?;
    let tmp = tempfile::NamedTempFile::new_in(dir).map_err(io)?;
    {
        let mut w = BufWriter::new(tmp.as_file());
        gguf_file::write(&mut w, &metadata, &tensors)?;
        std::io::Write::flush(&mut w).map_err(io)?;
    }
    tmp.persist(path).map_err(|e| io(e.error))?;
    Ok(true)
}

/// Checks that the adapter at `path` was built for the model with
/// `architecture` and `model_sha256` before llama.cpp sees it.
pub fn check_adapter(
    path: &Path,
    architecture: &str,
    model_sha256: &str,
) -> Result<(), EditorError> {
    let wrong = |reason: String| EditorError::WrongModel {
        path: PathBuf::from(path),
        reason,
    };
    let mut file = std::fs::File::open(path).map_err(|source| EditorError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let content = gguf_file::Content::read(&mut file).map_err(|e| {
        EditorError::Invalid(format!("{} is not a GGUF adapter: {e}", path.display()))
    })?;
    let text = |k: &str| {
        content
            .metadata
            .get(k)
            .and_then(|v| v.to_string().ok())
            .cloned()
            .unwrap_or_default()
    };
    if text("general.type") != "adapter" || text("adapter.type") != "lora" {
        return Err(EditorError::Invalid(format!(
            "{} is not a LoRA adapter",
            path.display()
        )));
    }
    let arch = text("general.architecture");
    if arch != architecture {
        return Err(wrong(format!(
            "it is for a {arch:?} model, this one is {architecture:?}"
        )));
    }
    let fp = text(FINGERPRINT_KEY);
    if fp != model_sha256 {
        return Err(wrong(format!(
            "it was computed for model sha256 {}…, this model is {}…",
            fp.get(..12).unwrap_or(&fp),
            model_sha256.get(..12).unwrap_or(model_sha256)
        )));
    }
    Ok(())
}

/// `count` edits with deterministic pseudo-random rank-4 factors on one
/// down-projection of shape `[n_out, n_in]`: for benchmarking adapter
/// overhead (`imprint bench decode --edits N`) and adapter tests, never for
/// users.
pub fn synthetic_edits(
    count: usize,
    layer: usize,
    n_in: usize,
    n_out: usize,
    seed: u32,
) -> Vec<Edit> {
    let rank = 4;
    let mut x = seed.wrapping_mul(2_654_435_761).max(1);
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        (x as f32 / u32::MAX as f32 - 0.5) * 0.2
    };
    (0..count)
        .map(|i| Edit {
            id: format!("synthetic-{seed}-{i}"),
            request: super::EditRequest {
                attribute: "synthetic".into(),
                target: String::new(),
                questions: Vec::new(),
            },
            method: super::Method::Ftm,
            model_sha256: String::new(),
            layer,
            factors: vec![LoraFactors {
                tensor: format!("blk.{layer}.ffn_down.weight"),
                rank,
                n_in,
                n_out,
                a: (0..rank * n_in).map(|_| next()).collect(),
                b: (0..n_out * rank)
                    .map(|_| next() / count.max(1) as f32)
                    .collect(),
            }],
            metrics: super::EditMetrics::default(),
            active: true,
            rejection: None,
            created: 0,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::editor::{EditMetrics, EditRequest, Method};

    fn edit(id: &str, rank: usize, seed: f32) -> Edit {
        let (n_in, n_out) = (3, 2);
        Edit {
            id: id.into(),
            request: EditRequest {
                attribute: "a".into(),
                target: "t".into(),
                questions: vec!["q".into()],
            },
            method: Method::Ftm,
            model_sha256: "x".into(),
            layer: 0,
            factors: vec![LoraFactors {
                tensor: "blk.0.ffn_down.weight".into(),
                rank,
                n_in,
                n_out,
                a: (0..rank * n_in).map(|i| seed + i as f32).collect(),
                b: (0..n_out * rank).map(|i| seed * 2.0 - i as f32).collect(),
            }],
            metrics: EditMetrics::default(),
            active: true,
            rejection: None,
            created: 0,
        }
    }

    fn delta(f: &LoraFactors) -> Vec<f32> {
        let mut out = vec![0.0; f.n_out * f.n_in];
        for o in 0..f.n_out {
            for i in 0..f.n_in {
                for r in 0..f.rank {
                    out[o * f.n_in + i] += f.b[o * f.rank + r] * f.a[r * f.n_in + i];
                }
            }
        }
        out
    }

    #[test]
    fn stacking_adds_the_deltas_exactly() {
        let (e1, e2) = (edit("1", 2, 0.5), edit("2", 1, -1.0));
        let stacked = stack(&[&e1, &e2]).unwrap();
        assert_eq!(stacked.len(), 1);
        assert_eq!(stacked[0].rank, 3);
        let sum: Vec<f32> = delta(&e1.factors[0])
            .iter()
            .zip(delta(&e2.factors[0]))
            .map(|(a, b)| a + b)
            .collect();
        assert_eq!(delta(&stacked[0]), sum);
    }

    #[test]
    fn adapters_are_refused_for_another_model() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.gguf");
        let e = edit("1", 2, 0.5);
        assert!(write_adapter(&[&e], "llama", "abc", &path).unwrap());
        check_adapter(&path, "llama", "abc").unwrap();
        let err = check_adapter(&path, "llama", "def").unwrap_err();
        assert!(matches!(err, EditorError::WrongModel { .. }), "{err}");
        let err = check_adapter(&path, "qwen2", "abc").unwrap_err();
        assert!(err.to_string().contains("qwen2"), "{err}");
        assert!(!write_adapter(&[], "llama", "abc", &dir.path().join("none.gguf")).unwrap());
    }
    #[test]
    fn balancing_keeps_the_product_and_evens_out_the_factors() {
        // A ROME-like component: a tiny input side, a large output side.
        let mut e = edit("1", 2, 0.5);
        let f = &mut e.factors[0];
        f.a.iter_mut().for_each(|v| *v *= 1e-6);
        f.b.iter_mut().for_each(|v| *v *= 1e3);
        let (a, b) = balanced(f);
        let balanced_f = LoraFactors {
            a: a.clone(),
            b: b.clone(),
            ..f.clone()
        };
        for (x, y) in delta(f).iter().zip(delta(&balanced_f)) {
            assert!((x - y).abs() <= 1e-5 * x.abs().max(1e-9), "{x} vs {y}");
        }
        for r in 0..f.rank {
            let a_norm: f32 = a[r * f.n_in..(r + 1) * f.n_in]
                .iter()
                .map(|v| v * v)
                .sum::<f32>()
                .sqrt();
            let b_norm: f32 = (0..f.n_out)
                .map(|o| b[o * f.rank + r].powi(2))
                .sum::<f32>()
                .sqrt();
            assert!((a_norm / b_norm - 1.0).abs() < 1e-4, "{a_norm} vs {b_norm}");
        }
        // A component that is zero on one side stays as it was.
        let mut zero = edit("2", 1, 0.5);
        zero.factors[0].b.iter_mut().for_each(|v| *v = 0.0);
        let (a, b) = balanced(&zero.factors[0]);
        assert_eq!(
            (a, b),
            (zero.factors[0].a.clone(), zero.factors[0].b.clone())
        );
    }
}
