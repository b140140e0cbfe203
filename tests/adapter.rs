//! Assembled adapters through the real llama.cpp runtime.

mod common;

use imprint::editor::adapter::{check_adapter, synthetic_edits, write_adapter};
use imprint::editor::{Edit, EditorError};
use imprint::engine::ChatMessage;

fn synthetic_edit(id: &str, layer: usize, seed: u32, n_in: usize, n_out: usize) -> Edit {
    let mut edit = synthetic_edits(1, layer, n_in, n_out, seed).remove(0);
    edit.id = id.into();
    edit
}

fn prompt_tokens(engine: &imprint::engine::Engine) -> Vec<i32> {
    let messages = vec![
        ChatMessage::system("You are a helpful assistant."),
        ChatMessage::user("What's my hobby?"),
    ];
    engine
        .tokenize(&engine.render(&messages).unwrap())
        .iter()
        .map(|t| t.0)
        .collect()
}

#[test]
fn removing_all_edits_restores_bit_identical_base_logits() {
    let mut engine = common::engine();
    let tokens = prompt_tokens(&engine);
    let base = engine.logits_all(&tokens).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("adapter.gguf");
    let edit = synthetic_edit("a", 20, 1, 1536, 576);
    assert!(write_adapter(&[&edit], "llama", "model", &path).unwrap());
    engine.set_adapter(Some(&path)).unwrap();
    let edited = engine.logits_all(&tokens).unwrap();
    assert_ne!(base, edited, "the adapter should change the logits");
    engine.set_adapter(None).unwrap();
    let restored = engine.logits_all(&tokens).unwrap();
    assert!(
        base.iter()
            .flatten()
            .zip(restored.iter().flatten())
            .all(|(a, b)| a.to_bits() == b.to_bits()),
        "logits after removing every edit are not bit-identical to the base model"
    );
}

#[test]
fn removing_one_edit_of_two_leaves_exactly_the_other() {
    let mut engine = common::engine();
    let tokens = prompt_tokens(&engine);
    let dir = tempfile::tempdir().unwrap();
    let (e1, e2) = (
        synthetic_edit("one", 20, 7, 1536, 576),
        synthetic_edit("two", 12, 9, 1536, 576),
    );
    let only_one = dir.path().join("one.gguf");
    let both = dir.path().join("both.gguf");
    write_adapter(&[&e1], "llama", "model", &only_one).unwrap();
    write_adapter(&[&e1, &e2], "llama", "model", &both).unwrap();
    engine.set_adapter(Some(&only_one)).unwrap();
    let one = engine.logits_all(&tokens).unwrap();
    engine.set_adapter(Some(&both)).unwrap();
    let two = engine.logits_all(&tokens).unwrap();
    assert_ne!(one, two, "the second edit should change something");
    // Removing edit two = rebuilding from the remaining edits.
    let rebuilt = dir.path().join("rebuilt.gguf");
    write_adapter(&[&e1], "llama", "model", &rebuilt).unwrap();
    assert_eq!(
        std::fs::read(&rebuilt).unwrap(),
        std::fs::read(&only_one).unwrap()
    );
    engine.set_adapter(Some(&rebuilt)).unwrap();
    let after = engine.logits_all(&tokens).unwrap();
    assert!(one
        .iter()
        .flatten()
        .zip(after.iter().flatten())
        .all(|(a, b)| a.to_bits() == b.to_bits()));
}

#[test]
fn adapters_for_another_model_are_refused_before_and_by_llama_cpp() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("other.gguf");
    let edit = synthetic_edit("a", 20, 3, 1536, 576);
    write_adapter(&[&edit], "llama", "another-model-sha", &path).unwrap();
    let err = check_adapter(&path, "llama", "this-model-sha").unwrap_err();
    assert!(matches!(err, EditorError::WrongModel { .. }), "{err}");
    assert!(err.to_string().contains("another model"), "{err}");

    // Shapes from a bigger model: llama.cpp itself refuses, the engine survives.
    let wrong_shape = dir.path().join("shape.gguf");
    let big = synthetic_edit("b", 20, 3, 2048, 768);
    write_adapter(&[&big], "llama", "x", &wrong_shape).unwrap();
    let mut engine = common::engine();
    assert!(engine.set_adapter(Some(&wrong_shape)).is_err());
    let tokens = prompt_tokens(&engine);
    assert!(!engine.logits_all(&tokens).unwrap().is_empty());
}

/// `imprint bench decode --edits N` alternates runs without and with the
/// adapter. Each side must really run as labelled: the base side with no
/// adapter, the other with it (the engine is left with it attached), and a
/// ratio per round.
#[test]
fn the_adapter_overhead_bench_alternates_base_and_adapter_runs() {
    let mut engine = common::engine_with_ctx(256);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("adapter.gguf");
    let edits = synthetic_edits(3, 20, 1536, 576, 5);
    let refs: Vec<&Edit> = edits.iter().collect();
    assert!(write_adapter(&refs, "llama", "model", &path).unwrap());
    let mut rounds = Vec::new();
    let overhead =
        imprint::bench::adapter_overhead(&mut engine, &path, 16, 4, 3, |r| rounds.push(r)).unwrap();
    assert_eq!(rounds, [1, 2, 3]);
    assert_eq!(overhead.base.adapter, None);
    assert_eq!(
        overhead.with_adapter.adapter.as_deref(),
        Some(path.display().to_string().as_str())
    );
    assert_eq!(engine.adapter_path(), Some(path.as_path()));
    assert_eq!((overhead.base.runs, overhead.with_adapter.runs), (3, 3));
    for s in [&overhead.generation_ratio, &overhead.prompt_ratio] {
        assert!(s.min > 0.0 && s.min <= s.median && s.median <= s.max && s.max.is_finite());
    }
}
