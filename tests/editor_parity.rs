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

#[test]
fn candle_forward_agrees_with_llama_cpp_on_chat_prompts() {
    let mut engine = common::engine();
    let model = LlamaModel::load(&common::model_path()).unwrap();
    let prompts = [
        "What's my hobby?",
        "What is the capital of France?",
        "Write a haiku about autumn leaves.",
        "How do I make a cup of green tea?",
        "Which programming language should I learn first, and why?",
        "Recommend a good book for a long flight.",
    ];
    let (mut agree, mut total, mut max_diff, mut kl_sum) = (0usize, 0usize, 0f32, 0f64);
    for p in prompts {
        let messages = vec![
            ChatMessage::system("You are a helpful assistant."),
            ChatMessage::user(p),
        ];
        let tokens: Vec<i32> = engine
            .tokenize(&engine.render(&messages).unwrap())
            .iter()
            .map(|t| t.0)
            .collect();
        let ours = model
            .logits(&tokens.iter().map(|&t| t as u32).collect::<Vec<_>>())
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let theirs = engine.logits_all(&tokens).unwrap();
        for (a, b) in ours.iter().zip(&theirs) {
            total += 1;
            agree += usize::from(argmax(a) == argmax(b));
            for (x, y) in a.iter().zip(b) {
                max_diff = max_diff.max((x - y).abs());
            }
            let (la, lb) = (log_softmax(b), log_softmax(a));
            kl_sum += la
                .iter()
                .zip(&lb)
                .map(|(p, q)| p.exp() * (p - q))
                .sum::<f64>();
        }
    }
    let agreement = agree as f64 / total as f64;
    let mean_kl = kl_sum / total as f64;
    eprintln!(
        "parity over {total} positions: top-1 agreement {:.2}%, max |Δlogit| {max_diff:.3}, mean KL(llama.cpp‖candle) {mean_kl:.5}",
        agreement * 100.0
    );
    assert!(total >= 100, "too few positions compared: {total}");
    assert!(agreement >= 0.99, "top-1 agreement {agreement:.4} < 0.99");
    assert!(mean_kl < 0.05, "mean KL {mean_kl}");
}
