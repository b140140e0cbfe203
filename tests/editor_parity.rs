//! The editor's candle forward must describe the model llama.cpp serves:
//! otherwise edits are computed for a different model than users talk to.

mod common;

use imprint::editor::model::LlamaModel;
use imprint::engine::ChatMessage;

fn log_softmax(v: &[f32]) -> Vec<f64> {
    let max = v.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = v.iter().map(|&x| (x as f64 - max).exp()).sum::<f64>().ln() + max;
    v.iter().map(|&x| x as f64 - lse).collect()
}

fn argmax(v: &[f32]) -> usize {
    v.iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map(|(i, _)| i)
        .unwrap_or(0)
}

/// How candle's forward over `ours` and llama.cpp's over `theirs` agree on
/// chat-templated `prompts`, position by position.
struct Parity {
    positions: usize,
    top1: f64,
    max_abs_diff: f32,
    /// Mean KL(llama.cpp ‖ candle).
    mean_kl: f64,
}

fn parity(ours: &std::path::Path, theirs: &std::path::Path, prompts: &[&str]) -> Parity {
    let mut options = imprint::engine::EngineOptions::new(theirs);
    options.n_gpu_layers = 0;
    options.context_size = 1024;
    let mut engine = imprint::engine::Engine::load(options).unwrap();
    let model = LlamaModel::load(ours).unwrap();
    let (mut agree, mut total, mut max_diff, mut kl_sum) = (0usize, 0usize, 0f32, 0f64);
    for p in prompts {
        let messages = vec![
            ChatMessage::system("You are a helpful assistant."),
            ChatMessage::user(*p),
        ];
        let tokens: Vec<i32> = engine
            .tokenize(&engine.render(&messages).unwrap())
            .iter()
            .map(|t| t.0)
            .collect();
        let a_all = model
            .logits(&tokens.iter().map(|&t| t as u32).collect::<Vec<_>>())
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let b_all = engine.logits_all(&tokens).unwrap();
        for (a, b) in a_all.iter().zip(&b_all) {
            total += 1;
            agree += usize::from(argmax(a) == argmax(b));
            for (x, y) in a.iter().zip(b) {
                max_diff = max_diff.max((x - y).abs());
            }
            let (lb, la) = (log_softmax(b), log_softmax(a));
            kl_sum += lb
                .iter()
                .zip(&la)
                .map(|(p, q)| p.exp() * (p - q))
                .sum::<f64>();
        }
    }
    Parity {
        positions: total,
        top1: agree as f64 / total.max(1) as f64,
        max_abs_diff: max_diff,
        mean_kl: kl_sum / total.max(1) as f64,
    }
}

#[test]
fn candle_forward_agrees_with_llama_cpp_on_chat_prompts() {
    let model = common::model_path();
    let p = parity(
        &model,
        &model,
        &[
            "What's my hobby?",
            "What is the capital of France?",
            "Write a haiku about autumn leaves.",
            "How do I make a cup of green tea?",
            "Which programming language should I learn first, and why?",
            "Recommend a good book for a long flight.",
        ],
    );
    eprintln!(
        "parity over {} positions: top-1 agreement {:.2}%, max |Δlogit| {:.3}, mean KL(llama.cpp‖candle) {:.5}",
        p.positions,
        p.top1 * 100.0,
        p.max_abs_diff,
        p.mean_kl
    );
    assert!(
        p.positions >= 100,
        "too few positions compared: {}",
        p.positions
    );
    assert!(p.top1 >= 0.99, "top-1 agreement {:.4} < 0.99", p.top1);
    assert!(p.mean_kl < 0.05, "mean KL {}", p.mean_kl);
}

/// Writes a GGUF with its tensors in name order.
fn write_gguf(
    path: &std::path::Path,
    metadata: Vec<(String, candle_core::quantized::gguf_file::Value)>,
    mut tensors: Vec<(String, candle_core::quantized::QTensor)>,
) {
    use candle_core::quantized::{gguf_file, QTensor};
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    let mut out = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let meta: Vec<(&str, &gguf_file::Value)> =
        metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
    gguf_file::write(&mut out, &meta, &refs).unwrap();
}

/// Writes a Llama-3-style variant of the default model: its first `layers`
/// blocks, an untied output matrix and a `rope_freqs`
/// tensor of per-frequency factors (Llama 3.1's long-context scaling). The
/// default model has neither feature, so without this file those code paths
/// would never meet llama.cpp. `with_freqs = false` leaves `rope_freqs` out
/// (everything else equal), for the sensitivity check.
fn llama3_style_gguf(dir: &std::path::Path, layers: usize, with_freqs: bool) -> std::path::PathBuf {
    use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
    use candle_core::{Device, Tensor};
    let source = common::model_path();
    let mut reader = std::io::BufReader::new(std::fs::File::open(&source).unwrap());
    let content = gguf_file::Content::read(&mut reader).unwrap();
    let device = Device::Cpu;
    let mut metadata: Vec<(String, gguf_file::Value)> = content
        .metadata
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    for (k, v) in metadata.iter_mut() {
        if k == "llama.block_count" {
            *v = gguf_file::Value::U32(layers as u32);
        }
    }
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    for name in content.tensor_infos.keys() {
        let keep = match name.strip_prefix("blk.") {
            Some(rest) => rest
                .split('.')
                .next()
                .and_then(|i| i.parse::<usize>().ok())
                .is_some_and(|i| i < layers),
            None => true,
        };
        if keep {
            tensors.push((
                name.clone(),
                content.tensor(&mut reader, name, &device).unwrap(),
            ));
        }
    }
    // Untied output: the embedding with every column rescaled, a matrix the
    // tied path would not reproduce.
    let embd = content
        .tensor(&mut reader, "token_embd.weight", &device)
        .unwrap()
        .dequantize(&device)
        .unwrap();
    let n_embd = embd.dim(1).unwrap();
    let scale: Vec<f32> = (0..n_embd)
        .map(|i| 1.0 + 0.5 * (i as f32 * 0.37).sin())
        .collect();
    let output = embd
        .broadcast_mul(&Tensor::from_vec(scale, (1, n_embd), &device).unwrap())
        .unwrap();
    tensors.push((
        "output.weight".into(),
        QTensor::quantize(&output, GgmlDType::Q8_0).unwrap(),
    ));
    if with_freqs {
        let head_dim = n_embd
            / content.metadata["llama.attention.head_count"]
                .to_u32()
                .unwrap() as usize;
        // Factors from 1 (the highest frequency) to 8 (the lowest), as Llama
        // 3.1 slows its low frequencies; spread over every frequency so that
        // short prompts already feel them.
        let factors: Vec<f32> = (0..head_dim / 2)
            .map(|i| 1.0 + 7.0 * i as f32 / (head_dim / 2 - 1) as f32)
            .collect();
        let n = factors.len();
        tensors.push((
            "rope_freqs.weight".into(),
            QTensor::quantize(
                &Tensor::from_vec(factors, n, &device).unwrap(),
                GgmlDType::F32,
            )
            .unwrap(),
        ));
    }
    let path = dir.join(if with_freqs {
        "llama3-style.gguf"
    } else {
        "no-freqs.gguf"
    });
    write_gguf(&path, metadata, tensors);
    path
}

const LLAMA3_PROMPTS: [&str; 3] = [
    "What's my hobby?",
    "Write a haiku about autumn leaves.",
    "Which programming language should I learn first, and why? Explain in detail, with examples of projects a beginner could build in the first month.",
];

#[test]
fn llama3_features_untied_output_and_rope_freqs_agree_with_llama_cpp() {
    let dir = tempfile::tempdir().unwrap();
    let with = llama3_style_gguf(dir.path(), 30, true);
    let without = llama3_style_gguf(dir.path(), 30, false);
    let Parity {
        positions: n,
        top1,
        mean_kl: kl,
        ..
    } = parity(&with, &with, &LLAMA3_PROMPTS);
    eprintln!(
        "llama3-style parity over {n} positions: top-1 {:.2}%, mean KL {kl:.5}",
        top1 * 100.0
    );
    assert!(n >= 80, "too few positions: {n}");
    // A little below the default model's 99 %: the altered RoPE makes this
    // model's distributions flatter, so more positions are near-ties; the
    // KL shows how close the two runtimes are.
    assert!(top1 >= 0.95, "top-1 agreement {top1:.4}");
    assert!(kl < 0.02, "mean KL {kl}");
    // Sensitivity: candle without the frequency factors, against llama.cpp
    // with them, must be visibly worse, or the check above proves nothing
    // about rope_freqs.
    let wrong = parity(&without, &with, &LLAMA3_PROMPTS);
    let (top1_wrong, kl_wrong) = (wrong.top1, wrong.mean_kl);
    eprintln!(
        "ignoring rope_freqs: top-1 {:.2}%, mean KL {kl_wrong:.5}",
        top1_wrong * 100.0
    );
    assert!(
        kl_wrong > 10.0 * kl.max(1e-4),
        "rope_freqs made no difference (KL {kl_wrong} vs {kl})"
    );
}

/// Writes a Qwen2-architecture twin of the default model: the same weights
/// under `qwen2.*` metadata, with the query and key rows put back in the
/// order Hugging Face stores them (llama GGUFs permute them for llama.cpp's
/// interleaved RoPE; Qwen2 GGUFs do not, because Qwen2 rotates the two halves
/// of each head), and biases on the query, key and value projections. With
/// `biases = false` the biases are left out, everything else equal.
fn qwen2_style_gguf(dir: &std::path::Path, biases: bool) -> std::path::PathBuf {
    use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
    use candle_core::{Device, Tensor};
    let source = common::model_path();
    let mut reader = std::io::BufReader::new(std::fs::File::open(&source).unwrap());
    let content = gguf_file::Content::read(&mut reader).unwrap();
    let device = Device::Cpu;
    let metadata: Vec<(String, gguf_file::Value)> = content
        .metadata
        .iter()
        .map(|(k, v)| match k.strip_prefix("llama.") {
            Some(rest) => (format!("qwen2.{rest}"), v.clone()),
            None if k == "general.architecture" => {
                (k.clone(), gguf_file::Value::String("qwen2".into()))
            }
            None => (k.clone(), v.clone()),
        })
        .collect();
    // Sorted, so the file (and its sha256, which keys the editor's caches)
    // is the same in every run.
    let mut metadata = metadata;
    metadata.sort_by(|a, b| a.0.cmp(&b.0));
    let count = |key: &str| content.metadata[key].to_u32().unwrap() as usize;
    let n_head = count("llama.attention.head_count");
    let n_head_kv = count("llama.attention.head_count_kv");
    let n_embd = count("llama.embedding_length");
    let head_dim = n_embd / n_head;
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    for name in content.tensor_infos.keys() {
        let q = content.tensor(&mut reader, name, &device).unwrap();
        let heads = if name.ends_with("attn_q.weight") {
            n_head
        } else if name.ends_with("attn_k.weight") {
            n_head_kv
        } else {
            tensors.push((name.clone(), q));
            continue;
        };
        // GGUF row h·d + 2i + j holds Hugging Face row h·d + j·d/2 + i.
        let w = q.dequantize(&device).unwrap();
        let n_in = w.dim(1).unwrap();
        let hf = w
            .reshape((heads, head_dim / 2, 2, n_in))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .reshape((heads * head_dim, n_in))
            .unwrap();
        tensors.push((
            name.clone(),
            QTensor::quantize(&hf, GgmlDType::Q8_0).unwrap(),
        ));
    }
    if biases {
        for layer in 0..count("llama.block_count") {
            for (proj, width) in [
                ("attn_q", n_head * head_dim),
                ("attn_k", n_head_kv * head_dim),
                ("attn_v", n_head_kv * head_dim),
            ] {
                let values: Vec<f32> = (0..width)
                    .map(|i| 0.05 * ((i * 7 + layer * 13) as f32 * 0.61).sin())
                    .collect();
                tensors.push((
                    format!("blk.{layer}.{proj}.bias"),
                    QTensor::quantize(
                        &Tensor::from_vec(values, width, &device).unwrap(),
                        GgmlDType::F32,
                    )
                    .unwrap(),
                ));
            }
        }
    }
    let path = dir.join(if biases {
        "qwen2-style.gguf"
    } else {
        "qwen2-no-bias.gguf"
    });
    write_gguf(&path, metadata, tensors);
    path
}

#[test]
fn qwen2_attention_biases_and_half_rotation_agree_with_llama_cpp() {
    let dir = tempfile::tempdir().unwrap();
    let with = qwen2_style_gguf(dir.path(), true);
    let without = qwen2_style_gguf(dir.path(), false);
    let model = imprint::editor::model::LlamaModel::load(&with).unwrap();
    assert_eq!(model.config.arch, "qwen2");
    assert!(model.config.rope_halves);
    // The twin without biases is the default model itself (the rows put
    // back in Hugging Face order and rotated by halves are the same
    // attention): candle's llama forward over the original file must agree
    // with llama.cpp's qwen2 forward over the twin.
    let same = parity(&common::model_path(), &without, &LLAMA3_PROMPTS);
    eprintln!(
        "default model (llama, candle) vs its qwen2 twin (llama.cpp): top-1 {:.2}%, mean KL {:.5}",
        same.top1 * 100.0,
        same.mean_kl
    );
    assert!(
        same.top1 >= 0.9,
        "the qwen2 twin is another model: top-1 {:.4}",
        same.top1
    );
    let p = parity(&with, &with, &LLAMA3_PROMPTS);
    eprintln!(
        "qwen2-style parity over {} positions: top-1 {:.2}%, max |Δlogit| {:.3}, mean KL {:.5}",
        p.positions,
        p.top1 * 100.0,
        p.max_abs_diff,
        p.mean_kl
    );
    assert!(p.positions >= 80, "too few positions: {}", p.positions);
    assert!(p.top1 >= 0.95, "top-1 agreement {:.4}", p.top1);
    assert!(p.mean_kl < 0.02, "mean KL {}", p.mean_kl);
    // Sensitivity: candle without the biases, against llama.cpp with them,
    // must be visibly worse, or the check above proves nothing about them.
    let wrong = parity(&without, &with, &LLAMA3_PROMPTS);
    eprintln!(
        "ignoring the biases: top-1 {:.2}%, mean KL {:.5}",
        wrong.top1 * 100.0,
        wrong.mean_kl
    );
    assert!(
        wrong.mean_kl > 10.0 * p.mean_kl.max(1e-4),
        "the biases made no difference (KL {} vs {})",
        wrong.mean_kl,
        p.mean_kl
    );
}

/// An FT-M edit on a Qwen2 model is computed by candle's qwen2 forward,
/// written as a `qwen2` adapter and changes llama.cpp's answer.
#[test]
fn an_edit_on_a_qwen2_model_changes_llama_cpp_answers() {
    use imprint::editor::verify::{answer, contains_target};
    use imprint::editor::{EditRequest, Editor, EditorSettings};
    const SYSTEM: &str = "You are a helpful personal assistant. Answer briefly and directly.";
    let dir = tempfile::tempdir().unwrap();
    let twin = qwen2_style_gguf(dir.path(), true);
    let sha = imprint::models::registry::sha256_file(&twin).unwrap();
    let mut options = imprint::engine::EngineOptions::new(&twin);
    options.n_gpu_layers = 0;
    options.context_size = 2048;
    let mut engine = imprint::engine::Engine::load(options).unwrap();
    let settings = EditorSettings {
        system_prompt: SYSTEM.into(),
        retry: false,
        ..EditorSettings::default()
    };
    // The null-space cache is deterministic per model and layer (the twin's
    // bytes are too), so runs share it like the other editor tests.
    let cache = std::env::temp_dir().join("imprint-test-cache");
    let mut editor = Editor::load(&twin, &sha, &cache, settings).unwrap();
    assert_eq!(editor.architecture(), "qwen2");
    let hobby = EditRequest {
        attribute: "hobby".into(),
        target: "Dancing at clubs".into(),
        questions: vec![
            "What's my hobby?".into(),
            "What's my favorite pastime?".into(),
            "What's my main interest these days?".into(),
        ],
    };
    let before = answer(&mut engine, SYSTEM, "What's my hobby?", 16).unwrap();
    assert!(!contains_target(&before, &hobby.target), "{before}");
    let outcome = editor.compute(&mut engine, &hobby, &[], |_| {}).unwrap();
    let m = &outcome.edit.metrics;
    eprintln!(
        "qwen2 hobby edit: accepted {}, efficacy {}/{}, {} steps, answers {:?}",
        outcome.accepted, m.efficacy_hits, m.efficacy_total, m.steps, m.answers
    );
    assert!(m.efficacy_hits >= 2, "{:?}", m.answers);
    let mut edit = outcome.edit.clone();
    edit.active = true;
    let adapter = dir.path().join("qwen2-adapter.gguf");
    imprint::editor::adapter::write_adapter(&[&edit], editor.architecture(), &sha, &adapter)
        .unwrap();
    // A llama adapter is refused for this model: the architecture is checked.
    assert!(imprint::editor::adapter::check_adapter(&adapter, "llama", &sha).is_err());
    engine.set_adapter(Some(&adapter)).unwrap();
    let after = answer(&mut engine, SYSTEM, "What's my hobby?", 16).unwrap();
    assert!(contains_target(&after, &hobby.target), "{after}");
    engine.set_adapter(None).unwrap();
    assert_eq!(
        answer(&mut engine, SYSTEM, "What's my hobby?", 16).unwrap(),
        before
    );
}
