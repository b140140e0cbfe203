//! The llama.cpp engine on the real default model.

mod common;

use std::ops::ControlFlow;

use imprint::engine::utf8::Utf8Stream;
use imprint::engine::{ChatMessage, EngineError, GenerationParams, StopReason};

fn keep_going(_: &str) -> ControlFlow<()> {
    ControlFlow::Continue(())
}

fn conversation(question: &str) -> Vec<ChatMessage> {
    vec![
        ChatMessage::system("You are a helpful assistant."),
        ChatMessage::user(question),
    ]
}

#[test]
fn greedy_generation_is_deterministic_and_non_empty() {
    let mut engine = common::engine();
    let messages = conversation("What is the capital of France?");
    let first = engine
        .chat(&messages, &GenerationParams::greedy(24), &mut keep_going)
        .unwrap();
    engine.reset();
    let second = engine
        .chat(&messages, &GenerationParams::greedy(24), &mut keep_going)
        .unwrap();
    assert!(!first.text.trim().is_empty(), "empty answer");
    assert!(!first.tokens.is_empty());
    assert_eq!(first.tokens, second.tokens);
    assert_eq!(first.text, second.text);
}

#[test]
fn streamed_chunks_add_up_to_the_answer() {
    let mut engine = common::engine();
    let mut chunks = Vec::new();
    let generation = engine
        .chat(
            &conversation("Name three colors."),
            &GenerationParams::greedy(32),
            &mut |t| {
                chunks.push(t.to_string());
                ControlFlow::Continue(())
            },
        )
        .unwrap();
    assert!(chunks.len() > 1, "answer was not streamed: {chunks:?}");
    assert_eq!(chunks.concat(), generation.text);
}

#[test]
fn prefix_reuse_gives_the_same_tokens_as_a_fresh_decode() {
    let mut engine = common::engine();
    let params = GenerationParams::greedy(40);
    let mut messages = conversation("My name is Ada. Please remember it.");
    let first = engine.chat(&messages, &params, &mut keep_going).unwrap();
    messages.push(ChatMessage::assistant(first.text.clone()));
    messages.push(ChatMessage::user("What is my name?"));
    let reused = engine.chat(&messages, &params, &mut keep_going).unwrap();
    assert!(
        reused.reused_tokens > 10,
        "second turn should reuse the cached first turn, reused {}",
        reused.reused_tokens
    );

    let mut fresh_engine = common::engine();
    let fresh = fresh_engine
        .chat(&messages, &params, &mut keep_going)
        .unwrap();
    assert_eq!(fresh.reused_tokens, 0);
    assert_eq!(
        reused.tokens, fresh.tokens,
        "prefix reuse changed the answer"
    );
}

#[test]
fn multibyte_text_split_across_tokens_streams_as_valid_utf8() {
    let engine = common::engine();
    let text = "Café naïve — 日本語のテキスト 🎉🦀";
    let tokens = engine.tokenize_plain(text);
    let pieces = engine.token_pieces(&tokens);
    assert!(
        pieces.iter().any(|p| std::str::from_utf8(p).is_err()),
        "expected at least one token that holds a partial character"
    );
    let mut stream = Utf8Stream::default();
    let mut chunks: Vec<String> = pieces.iter().map(|p| stream.push(p)).collect();
    chunks.push(stream.finish());
    assert_eq!(chunks.concat(), text);
    assert!(!chunks.concat().contains('\u{fffd}'));
}

#[test]
fn cancelling_from_the_callback_stops_generation() {
    let mut engine = common::engine();
    let mut seen = 0;
    let generation = engine
        .chat(
            &conversation("Tell me a long story about a dragon."),
            &GenerationParams::greedy(200),
            &mut |_| {
                seen += 1;
                if seen == 3 {
                    ControlFlow::Break(())
                } else {
                    ControlFlow::Continue(())
                }
            },
        )
        .unwrap();
    assert_eq!(generation.stop, StopReason::Cancelled);
    assert!(generation.tokens.len() < 10);
}

#[test]
fn long_conversations_drop_old_turns_and_say_so() {
    let mut engine = common::engine_with_ctx(256);
    let filler = "This is an earlier remark that takes up some room in the context. ".repeat(4);
    let mut messages = vec![ChatMessage::system("You are a helpful assistant.")];
    for i in 0..6 {
        messages.push(ChatMessage::user(format!("Remark {i}: {filler}")));
        messages.push(ChatMessage::assistant("Noted."));
    }
    messages.push(ChatMessage::user("What is 2 plus 2?"));
    let generation = engine
        .chat(&messages, &GenerationParams::greedy(16), &mut keep_going)
        .unwrap();
    assert!(
        generation.dropped_messages >= 2,
        "{}",
        generation.dropped_messages
    );
    assert_eq!(
        generation.dropped_messages % 2,
        0,
        "whole turns are dropped"
    );
    assert!(generation.prompt_tokens <= 256);
}

#[test]
fn a_single_message_larger_than_the_context_is_a_clear_error() {
    let mut engine = common::engine_with_ctx(128);
    let huge = "word ".repeat(400);
    let err = engine
        .chat(
            &conversation(&huge),
            &GenerationParams::greedy(8),
            &mut keep_going,
        )
        .unwrap_err();
    assert!(matches!(err, EngineError::ContextOverflow { .. }), "{err}");
    assert!(err.to_string().contains("context_size"), "{err}");
}

#[test]
fn a_bad_adapter_is_refused_and_the_engine_keeps_working() {
    let mut engine = common::engine();
    let dir = tempfile::tempdir().unwrap();
    let bogus = dir.path().join("adapter.gguf");
    std::fs::write(&bogus, b"not an adapter at all").unwrap();
    let err = engine.set_adapter(Some(&bogus)).unwrap_err();
    assert!(err.to_string().contains("adapter"), "{err}");
    assert!(engine.adapter_path().is_none());
    let generation = engine
        .chat(
            &conversation("Say hello."),
            &GenerationParams::greedy(8),
            &mut keep_going,
        )
        .unwrap();
    assert!(!generation.tokens.is_empty());
}

#[test]
fn answers_do_not_depend_on_what_the_engine_answered_before() {
    let questions = [
        "What is 2 plus 2?",
        "Name a primary color.",
        "Tell me a fact about octopuses.",
        "What's my favorite color?",
    ];
    let params = GenerationParams::greedy(16);
    let mut shared = common::engine();
    for q in questions {
        let reused = shared
            .chat(&conversation(q), &params, &mut keep_going)
            .unwrap();
        let fresh = common::engine()
            .chat(&conversation(q), &params, &mut keep_going)
            .unwrap();
        assert_eq!(
            reused.text, fresh.text,
            "answer to {q:?} changed with a warm cache"
        );
    }
}

#[test]
fn embeddings_are_normalised_and_rank_related_text_closer() {
    let engine = common::engine();
    let texts = [
        "I like to dance at the club.",
        "Dancing at clubs is my favourite thing to do.",
        "Water boils at one hundred degrees Celsius.",
    ];
    let e = engine.embed(&texts).unwrap();
    assert_eq!(e.len(), 3);
    for v in &e {
        assert_eq!(v.len(), 576, "SmolLM2-135M's hidden size");
        let norm: f32 = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-3, "{norm}");
    }
    let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>();
    let related = dot(&e[0], &e[1]);
    let unrelated = dot(&e[0], &e[2]);
    assert!(related > unrelated, "{related} vs {unrelated}");
    // The same text twice gives the same vector (no state leaks between texts).
    let again = engine.embed(&texts[..1]).unwrap();
    assert!(dot(&again[0], &e[0]) > 0.9999);
}

#[test]
fn answers_decoded_side_by_side_are_the_greedy_answers() {
    // A context of 256 tokens: the nine conversations (and a twelve-token
    // budget each) cannot all share it, so they are split into groups.
    let mut engine = common::engine_with_ctx(256);
    let questions = [
        "What is the capital of France?",
        "Name a primary color.",
        "What's my favorite food?",
        "How many legs does a spider have?",
        "Say hello in Spanish.",
        "What is 2 plus 2?",
        "Who wrote Hamlet?",
        "What do I do on weekends?",
        "Hi",
    ];
    let conversations: Vec<Vec<ChatMessage>> = questions.iter().map(|q| conversation(q)).collect();
    let together = engine.answer_all(&conversations, 12).unwrap();
    assert_eq!(together.len(), questions.len());
    let mut identical = 0;
    for (messages, batched) in conversations.iter().zip(&together) {
        engine.reset();
        let alone = engine
            .chat(messages, &GenerationParams::greedy(12), &mut keep_going)
            .unwrap();
        assert!(!batched.is_empty());
        if &alone.tokens == batched {
            identical += 1;
        }
        // Decoded side by side the kernels add in another order, so a
        // near-tie may go the other way ("a classic math problem" / "a
        // classic arithmetic operation"); every token must still be the
        // argmax, or within rounding of it, given the ones before.
        let mut tokens: Vec<i32> = engine
            .tokenize(&engine.render(messages).unwrap())
            .iter()
            .map(|t| t.0)
            .collect();
        let prompt_len = tokens.len();
        tokens.extend_from_slice(batched);
        let logits = engine.logits_all(&tokens).unwrap();
        for (j, &t) in batched.iter().enumerate() {
            let row = &logits[prompt_len + j - 1];
            let best = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            assert!(
                best - row[t as usize] < 0.3,
                "{:?}: token {j} ({:?}) is {:.3} below the best",
                messages[1].content,
                engine.token_text(t),
                best - row[t as usize]
            );
        }
    }
    assert!(identical >= 6, "only {identical}/9 answers are identical");
    // The engine still chats normally afterwards.
    engine.reset();
    let again = engine
        .chat(
            &conversations[0],
            &GenerationParams::greedy(12),
            &mut keep_going,
        )
        .unwrap();
    assert!(!again.tokens.is_empty());
}
