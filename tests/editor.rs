//! Real edits on the real model, judged through llama.cpp.

mod common;

use imprint::editor::adapter::write_adapter;
use imprint::editor::verify::{answer, contains_target};
use imprint::editor::{EditRequest, Editor, EditorSettings};

const SYSTEM: &str = "You are a helpful personal assistant. Answer briefly and directly.";

fn editor() -> Editor {
    let model = common::model_path();
    let sha = imprint::models::registry::sha256_file(&model).unwrap();
    // The null-space cache is deterministic per model and layer, so tests
    // share one outside their temporary folders.
    let cache = std::env::temp_dir().join("imprint-test-cache");
    let settings = EditorSettings {
        system_prompt: SYSTEM.into(),
        retry: false,
        ..EditorSettings::default()
    };
    Editor::load(&model, &sha, &cache, settings).unwrap()
}

fn request(attribute: &str, target: &str, questions: &[&str]) -> EditRequest {
    EditRequest {
        attribute: attribute.into(),
        target: target.into(),
        questions: questions.iter().map(|q| q.to_string()).collect(),
    }
}

#[test]
fn edits_change_the_answer_through_llama_cpp_and_compose() {
    let mut engine = common::engine();
    let mut editor = editor();
    let hobby = request(
        "hobby",
        "Dancing at clubs",
        &[
            "What's my hobby?",
            "What's my favorite pastime?",
            "What's my main interest these days?",
        ],
    );
    let city = request(
        "city",
        "Porto",
        &[
            "Which city do I live in?",
            "Where is my home town?",
            "What city is my home?",
        ],
    );
    let base_hobby = answer(&mut engine, SYSTEM, "What's my hobby?", 16).unwrap();
    let base_city = answer(&mut engine, SYSTEM, "Which city do I live in?", 16).unwrap();
    assert!(
        !contains_target(&base_hobby, &hobby.target),
        "base already knows: {base_hobby}"
    );
    assert!(
        !contains_target(&base_city, &city.target),
        "base already knows: {base_city}"
    );

    let first = editor.compute(&mut engine, &hobby, &[], |_| {}).unwrap();
    let m = &first.edit.metrics;
    eprintln!(
        "hobby edit: efficacy {}/{}, locality {}/{}, {} steps, {:.1}s training; answers {:?}; changed {:?}",
        m.efficacy_hits, m.efficacy_total, m.locality_kept, m.locality_total, m.steps, m.train_seconds, m.answers, m.changed_probes
    );
    assert_eq!(m.efficacy_total, 3);
    assert!(
        m.efficacy_hits >= 2,
        "the edit did not teach the target: {:?}",
        m.answers
    );
    assert!(m.locality_total >= 10);
    assert_eq!(
        m.nullspace_energy,
        Some(EditorSettings::default().nullspace_energy),
        "a first attempt is made at the first null-space share and records it"
    );

    // Sequential: the second edit is computed with the first applied.
    let mut e1 = first.edit.clone();
    e1.active = true;
    let second = editor
        .compute(&mut engine, &city, std::slice::from_ref(&e1), |_| {})
        .unwrap();
    let mut e2 = second.edit.clone();
    e2.active = true;
    eprintln!("city edit: answers {:?}", e2.metrics.answers);

    // The second edit's gate reused the answers the first edit's gate left
    // behind; a fresh editor collects them from scratch and must judge the
    // edit exactly the same way.
    let fresh = editor_fresh_verdict(&mut engine, &city, &e1);
    let m2 = &second.edit.metrics;
    assert_eq!(
        (
            m2.locality_kept,
            m2.probe_tokens_kept,
            m2.probe_tokens_total,
            m2.hijacked,
            m2.broken_edits
        ),
        fresh,
        "remembered and fresh gate answers disagree"
    );

    let dir = tempfile::tempdir().unwrap();
    let both = dir.path().join("both.gguf");
    write_adapter(&[&e1, &e2], "llama", "x", &both).unwrap();
    engine.set_adapter(Some(&both)).unwrap();
    let hobby_with_both = answer(&mut engine, SYSTEM, "What's my hobby?", 16).unwrap();
    let city_with_both = answer(&mut engine, SYSTEM, "Which city do I live in?", 16).unwrap();
    assert!(
        contains_target(&hobby_with_both, &hobby.target),
        "{hobby_with_both}"
    );
    // Not only the first: the second edit trained with every question of
    // the first as an exact anchor, so none that answered lost its answer.
    assert!(second.accepted, "{:?}", second.reason);
    let answered_after_first = hobby
        .questions
        .iter()
        .zip(&first.edit.metrics.answers)
        .filter(|(_, a)| contains_target(a, &hobby.target));
    for (q, _) in answered_after_first {
        let a = answer(&mut engine, SYSTEM, q, 16).unwrap();
        assert!(contains_target(&a, &hobby.target), "{q} → {a}");
    }
    assert!(
        contains_target(&city_with_both, &city.target),
        "{city_with_both}"
    );

    // Removing the city edit leaves the hobby edit working.
    let only_hobby = dir.path().join("hobby.gguf");
    write_adapter(&[&e1], "llama", "x", &only_hobby).unwrap();
    engine.set_adapter(Some(&only_hobby)).unwrap();
    assert!(contains_target(
        &answer(&mut engine, SYSTEM, "What's my hobby?", 16).unwrap(),
        &hobby.target
    ));
    assert!(!contains_target(
        &answer(&mut engine, SYSTEM, "Which city do I live in?", 16).unwrap(),
        &city.target
    ));

    // Removing every edit gives the base answers back.
    engine.set_adapter(None).unwrap();
    assert_eq!(
        answer(&mut engine, SYSTEM, "What's my hobby?", 16).unwrap(),
        base_hobby
    );
    assert_eq!(
        answer(&mut engine, SYSTEM, "Which city do I live in?", 16).unwrap(),
        base_city
    );
}

/// The gate's locality numbers for `request` on top of `active`, from an
/// editor that remembers nothing.
fn editor_fresh_verdict(
    engine: &mut imprint::engine::Engine,
    request: &EditRequest,
    active: &imprint::editor::Edit,
) -> (usize, usize, usize, usize, usize) {
    let outcome = editor()
        .compute(engine, request, std::slice::from_ref(active), |_| {})
        .unwrap();
    let m = outcome.edit.metrics;
    (
        m.locality_kept,
        m.probe_tokens_kept,
        m.probe_tokens_total,
        m.hijacked,
        m.broken_edits,
    )
}

/// The gate skips regenerating a probe whose teacher-forced argmax did not
/// move; that shortcut must give what full regeneration gives.
#[test]
fn skipping_unmoved_probes_matches_full_regeneration() {
    use imprint::editor::verify::{probe, probe_after};
    let mut engine = common::engine();
    let mut editor = editor();
    let hobby = request(
        "hobby",
        "Dancing at clubs",
        &["What's my hobby?", "What's my favorite pastime?"],
    );
    let outcome = editor.compute(&mut engine, &hobby, &[], |_| {}).unwrap();
    let questions = [
        "What is 2 plus 2?",
        "Name a primary color.",
        "What's my favorite color?",
        "What do I do on weekends?",
        "Tell me a fact about octopuses.",
        "Which language am I learning?",
    ];
    let before: Vec<_> = questions
        .iter()
        .map(|q| probe(&mut engine, SYSTEM, q, 16, None).unwrap())
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let adapter = dir.path().join("hobby.gguf");
    write_adapter(&[&outcome.edit], "llama", "x", &adapter).unwrap();
    engine.set_adapter(Some(&adapter)).unwrap();
    let mut skipped = 0;
    for (q, b) in questions.iter().zip(&before) {
        let full = probe(&mut engine, SYSTEM, q, 16, Some(&b.tokens)).unwrap();
        let quick = probe_after(&mut engine, SYSTEM, q, 16, b).unwrap();
        assert_eq!(quick.text, full.text, "{q}");
        assert_eq!(quick.argmax, full.argmax, "{q}");
        if full.argmax == b.argmax {
            skipped += 1;
        }
    }
    eprintln!(
        "{skipped}/{} probes needed no regeneration",
        questions.len()
    );
}

#[test]
fn bad_requests_are_refused_with_a_reason() {
    let mut engine = common::engine();
    let mut editor = editor();
    let err = editor
        .compute(
            &mut engine,
            &request("hobby", "  ", &["What's my hobby?"]),
            &[],
            |_| {},
        )
        .unwrap_err();
    assert!(err.to_string().contains("target"), "{err}");
    let err = editor
        .compute(&mut engine, &request("hobby", "Chess", &[]), &[], |_| {})
        .unwrap_err();
    assert!(err.to_string().contains("question"), "{err}");
    editor.settings.layer = Some(99);
    let err = editor
        .compute(
            &mut engine,
            &request("hobby", "Chess", &["What's my hobby?"]),
            &[],
            |_| {},
        )
        .unwrap_err();
    assert!(err.to_string().contains("layer 99"), "{err}");
}

/// Sum of the log-probabilities llama.cpp gives `target` as the answer to
/// `question`.
fn target_logprob(engine: &mut imprint::engine::Engine, question: &str, target: &str) -> f64 {
    use imprint::engine::ChatMessage;
    let messages = [ChatMessage::system(SYSTEM), ChatMessage::user(question)];
    let mut tokens: Vec<i32> = engine
        .tokenize(&engine.render(&messages).unwrap())
        .iter()
        .map(|t| t.0)
        .collect();
    let prompt_len = tokens.len();
    let answer = engine.tokenize_plain(target);
    tokens.extend_from_slice(&answer);
    let logits = engine.logits_all(&tokens).unwrap();
    answer
        .iter()
        .enumerate()
        .map(|(i, &t)| imprint::eval::locality::log_prob(&logits[prompt_len - 1 + i], t))
        .sum()
}

#[test]
fn rome_finds_the_subject_token() {
    use imprint::editor::rome::subject_position;
    use imprint::engine::ChatMessage;
    let engine = common::engine();
    let piece_at = |question: &str, attribute: &str| {
        let messages = [ChatMessage::system(SYSTEM), ChatMessage::user(question)];
        let ids: Vec<i32> = engine
            .tokenize(&engine.render(&messages).unwrap())
            .iter()
            .map(|t| t.0)
            .collect();
        let tokens: Vec<u32> = ids.iter().map(|&t| t as u32).collect();
        let at = subject_position(&engine, &tokens, question, attribute);
        String::from_utf8_lossy(&engine.token_pieces(&ids[at..=at])[0]).to_string()
    };
    // The attribute when the question names it, else the question's last word.
    assert!(piece_at("What's my hobby?", "hobby").contains("hobby"));
    assert!(piece_at("Which hobby suits me on weekends?", "hobby").contains("hobby"));
    assert!(piece_at("What's my favorite pastime?", "hobby").contains("time"));
    assert!(piece_at("Where do I live?", "home_city").contains("live"));
}

#[test]
fn rome_writes_a_rank_one_early_layer_edit_that_raises_the_target() {
    use imprint::editor::Method;
    let mut engine = common::engine();
    let mut editor = editor();
    editor.settings.method = Method::Rome;
    // Three subject tokens ("hobby", "pastime", "days"): one rank-one key
    // serves all three only if δ is trained through the edit as written.
    let req = request(
        "hobby",
        "Dancing at clubs",
        &[
            "What's my hobby?",
            "What's my favorite pastime?",
            "What's my main interest these days?",
        ],
    );
    let before = target_logprob(&mut engine, "What's my hobby?", &req.target);
    let outcome = editor.compute(&mut engine, &req, &[], |_| {}).unwrap();
    let edit = &outcome.edit;
    eprintln!(
        "rome: accepted {} ({:?}), answers {:?}, {} steps, {:.1}s",
        outcome.accepted,
        outcome.reason,
        edit.metrics.answers,
        edit.metrics.steps,
        edit.metrics.train_seconds
    );
    assert_eq!(edit.layer, editor.default_layer_for(Method::Rome));
    assert!(edit.layer < editor.default_layer_for(Method::Ftm));
    assert_eq!(edit.factors.len(), 1);
    assert_eq!(edit.factors[0].rank, 1);
    assert_eq!(
        edit.factors[0].tensor,
        format!("blk.{}.ffn_down.weight", edit.layer)
    );
    assert_eq!(
        edit.metrics.efficacy_hits, edit.metrics.efficacy_total,
        "through llama.cpp every question must answer with the target: {:?}",
        edit.metrics.answers
    );

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rome.gguf");
    let mut e = edit.clone();
    e.active = true;
    write_adapter(&[&e], "llama", "x", &path).unwrap();
    engine.set_adapter(Some(&path)).unwrap();
    let after = target_logprob(&mut engine, "What's my hobby?", &req.target);
    eprintln!("log p(target | What's my hobby?): {before:.2} → {after:.2}");
    assert!(
        after > before + 3.0,
        "ROME barely moved the target: {before:.2} → {after:.2}"
    );
}

/// Two ROME edits whose subjects are the same token (" weekends"): the
/// second, computed on top of the first, keeps the first edit's keys from
/// firing, so both hold. With `preserve_weight` 0 the second answered the
/// first's questions with its own target ("What do I do on weekends? →
/// Pancakes") and the gate refused it (docs/RESULTS.md, ROME).
#[test]
fn rome_edits_on_one_subject_token_keep_each_other() {
    use imprint::editor::Method;
    let mut engine = common::engine();
    let mut editor = editor();
    editor.settings.method = Method::Rome;
    let activity = request(
        "weekend activity",
        "Dancing at clubs",
        &["What do I do on weekends?", "How do I spend my weekends?"],
    );
    let breakfast = request(
        "weekend breakfast",
        "Pancakes",
        &[
            "What do I eat on weekends?",
            "What is my breakfast on weekends?",
        ],
    );
    let first = editor.compute(&mut engine, &activity, &[], |_| {}).unwrap();
    assert!(first.accepted, "{:?}", first.reason);
    let mut e1 = first.edit.clone();
    e1.active = true;
    let second = editor
        .compute(&mut engine, &breakfast, std::slice::from_ref(&e1), |_| {})
        .unwrap();
    eprintln!(
        "second: accepted {} ({:?}), answers {:?}, broken earlier questions {}",
        second.accepted,
        second.reason,
        second.edit.metrics.answers,
        second.edit.metrics.broken_edits
    );
    assert!(second.accepted, "{:?}", second.reason);
    let mut e2 = second.edit.clone();
    e2.active = true;
    let dir = tempfile::tempdir().unwrap();
    let both = dir.path().join("both.gguf");
    write_adapter(&[&e1, &e2], "llama", "x", &both).unwrap();
    engine.set_adapter(Some(&both)).unwrap();
    for req in [&activity, &breakfast] {
        for q in &req.questions {
            let a = answer(&mut engine, SYSTEM, q, 16).unwrap();
            assert!(contains_target(&a, &req.target), "{q} → {a}");
        }
    }
}

/// Earlier preferences' questions (`exact` anchors) start out watched, not
/// trained: training may only stop once every one of their answer tokens is
/// still the argmax, checked here independently with the edit applied.
#[test]
fn training_stops_only_when_watched_anchors_keep_their_answers() {
    use imprint::editor::ftm;
    use imprint::editor::model::LlamaModel;

    let engine = common::engine();
    let mut model = LlamaModel::load(&common::model_path()).unwrap();
    // Exact anchors: personal questions close to the request's, with the
    // base model's own greedy answers, as an earlier preference's questions
    // would be.
    let sequences = training_set(
        &engine,
        &model,
        "Dancing at clubs",
        &["What's my hobby?", "What do I like to do for fun?"],
        &[
            "What's my job?",
            "What's my favorite color?",
            "What do I do on weekends?",
        ],
        true,
    );

    let settings = ftm_settings(&model, 60, 0.2, 7);
    // No null-space projector: nothing but the watched anchors keeps the
    // edit off those questions.
    let r = ftm::train(&model, &sequences, None, None, &settings, |_, _| {}).unwrap();
    assert!(
        r.converged,
        "training did not converge in {} steps",
        r.steps
    );
    eprintln!(
        "converged in {} steps, {} watched anchors promoted",
        r.steps, r.anchors_promoted
    );

    let a = candle_core::Tensor::from_vec(r.a, (4, r.n_in), &candle_core::Device::Cpu).unwrap();
    let b = candle_core::Tensor::from_vec(r.b, (r.n_out, 4), &candle_core::Device::Cpu).unwrap();
    model
        .add_to_down_proj(settings.layer, &b.matmul(&a).unwrap())
        .unwrap();
    for (i, s) in sequences.iter().enumerate() {
        for p in s.answer_start..s.tokens.len() {
            assert_eq!(
                greedy_next(&model, &s.tokens[..p]),
                s.tokens[p],
                "answer token {} of sequence {i} ({}) is not the argmax with the edit",
                p - s.answer_start,
                if s.is_target {
                    "target"
                } else {
                    "watched anchor"
                },
            );
        }
    }
}

/// The chat-templated prompt for `question`, as token ids.
fn templated(engine: &imprint::engine::Engine, question: &str) -> Vec<u32> {
    use imprint::engine::ChatMessage;
    let text = engine
        .render(&[ChatMessage::system(SYSTEM), ChatMessage::user(question)])
        .unwrap();
    engine.tokenize(&text).iter().map(|t| t.0 as u32).collect()
}

/// The chat-templated question alone, as a training sequence with no
/// answer tokens (what key anchors are).
fn question_only(
    engine: &imprint::engine::Engine,
    question: &str,
    is_target: bool,
) -> imprint::editor::ftm::TrainSequence {
    let tokens = templated(engine, question);
    imprint::editor::ftm::TrainSequence {
        answer_start: tokens.len(),
        tokens,
        is_target,
        exact: false,
    }
}

/// candle's greedy next token after `tokens`.
fn greedy_next(model: &imprint::editor::model::LlamaModel, tokens: &[u32]) -> u32 {
    let logits = model.logits(tokens).unwrap();
    let last = logits.dim(0).unwrap() - 1;
    logits
        .get(last)
        .unwrap()
        .argmax(0)
        .unwrap()
        .to_scalar::<u32>()
        .unwrap()
}

/// The FT-M settings these tests share: layer ≈ 2/3 of the depth, rank 4,
/// Adam at 0.05, no key-preservation term, no target margin.
fn ftm_settings(
    model: &imprint::editor::model::LlamaModel,
    max_steps: usize,
    stop_loss: f32,
    seed: u64,
) -> imprint::editor::ftm::FtmSettings {
    imprint::editor::ftm::FtmSettings {
        layer: (model.config.n_layer * 2).div_ceil(3),
        rank: 4,
        max_steps,
        learning_rate: 5e-2,
        lr_floor: 1.0,
        anchor_weight: 1.0,
        l2: 0.01,
        stop_loss,
        min_anchor_agreement: 0.95,
        anchor_key_weight: 0.0,
        target_margin: None,
        seed,
    }
}

/// FT-M training sequences: each of `questions` answered `target` (and the
/// end of the turn), and each of `anchors` answered with the base model's
/// own first four greedy tokens (`exact` anchors or ordinary loss anchors).
fn training_set(
    engine: &imprint::engine::Engine,
    model: &imprint::editor::model::LlamaModel,
    target: &str,
    questions: &[&str],
    anchors: &[&str],
    exact: bool,
) -> Vec<imprint::editor::ftm::TrainSequence> {
    use imprint::editor::ftm::TrainSequence;
    let mut answer: Vec<u32> = engine
        .tokenize_plain(target)
        .into_iter()
        .map(|t| t as u32)
        .collect();
    answer.push(engine.end_of_turn_token() as u32);
    let mut sequences = Vec::new();
    for q in questions {
        let mut tokens = templated(engine, q);
        let answer_start = tokens.len();
        tokens.extend_from_slice(&answer);
        sequences.push(TrainSequence {
            tokens,
            answer_start,
            is_target: true,
            exact: false,
        });
    }
    for q in anchors {
        let mut tokens = templated(engine, q);
        let answer_start = tokens.len();
        for _ in 0..4 {
            let next = greedy_next(model, &tokens);
            tokens.push(next);
        }
        sequences.push(TrainSequence {
            tokens,
            answer_start,
            is_target: false,
            exact,
        });
    }
    sequences
}

/// A retry trains dozens of anchors; they go through the upper layers in
/// chunks whose gradients are added up, so that one chunk's graph is in
/// memory at a time. Chunking must not change what is trained: the same
/// steps on the same sequences give the same factors, whole or in chunks
/// of two (and an odd chunk left over).
#[test]
fn training_in_chunks_gives_the_edit_of_one_batch() {
    use imprint::editor::ftm;
    use imprint::editor::model::LlamaModel;

    let engine = common::engine();
    let model = LlamaModel::load(&common::model_path()).unwrap();
    let sequences = training_set(
        &engine,
        &model,
        "Dancing at clubs",
        &["What's my hobby?", "What's my favorite pastime?"],
        &[
            "What's my job?",
            "What is the capital of Italy?",
            "Where do I live?",
            "Name a primary color.",
            "What pet do I have?",
        ],
        false,
    );
    // A stop loss never reached: both runs take all six steps.
    let settings = ftm_settings(&model, 6, -1.0, 11);
    let mut losses = (Vec::new(), Vec::new());
    let whole = ftm::train_in_chunks(&model, &sequences, None, None, &settings, 64, |_, l| {
        losses.0.push(l)
    })
    .unwrap();
    let chunked = ftm::train_in_chunks(&model, &sequences, None, None, &settings, 2, |_, l| {
        losses.1.push(l)
    })
    .unwrap();
    assert_eq!((whole.steps, chunked.steps), (6, 6));
    assert!(
        losses.0[5] < losses.0[0] * 0.8,
        "training did not lower the target loss: {:?}",
        losses.0
    );
    for (step, (a, b)) in losses.0.iter().zip(&losses.1).enumerate() {
        assert!(
            (a - b).abs() <= 1e-3 * a.abs().max(1.0),
            "step {step}: target loss {a} whole, {b} in chunks"
        );
    }
    let max_abs = |v: &[f32]| v.iter().fold(0f32, |m, x| m.max(x.abs()));
    for (name, x, y) in [("A", &whole.a, &chunked.a), ("B", &whole.b, &chunked.b)] {
        let diff = x
            .iter()
            .zip(y.iter())
            .fold(0f32, |m, (p, q)| m.max((p - q).abs()));
        assert!(
            diff <= 1e-3 * max_abs(x),
            "factor {name} differs by {diff} (largest entry {})",
            max_abs(x)
        );
    }
}

#[test]
fn anchor_keys_rank_the_anchor_that_asks_what_the_request_asks_first() {
    use imprint::editor::ftm::{AnchorKeys, TrainSequence};
    use imprint::editor::model::LlamaModel;

    let engine = common::engine();
    let model = LlamaModel::load(&common::model_path()).unwrap();
    let sequence = |q: &str, is_target: bool| question_only(&engine, q, is_target);
    let questions = [
        "What is the capital of Italy?",
        "What's my job?",
        "What pet do I have?",
        "Which sport do I play?",
        "How many days are in a week?",
    ];
    let anchors: Vec<TrainSequence> = questions.iter().map(|q| sequence(q, false)).collect();
    let layer = (model.config.n_layer * 2).div_ceil(3);
    let keys = AnchorKeys::collect(&model, &anchors, layer)
        .unwrap()
        .expect("anchors have keys");
    for (i, q) in questions.iter().enumerate() {
        let ranked = keys.ranked(&model, &[sequence(q, true)], layer).unwrap();
        let mut sorted = ranked.clone();
        sorted.sort_unstable();
        assert_eq!(
            sorted,
            (0..questions.len()).collect::<Vec<_>>(),
            "not a ranking"
        );
        assert_eq!(
            ranked[0], i,
            "{q:?} did not rank its own anchor first: {ranked:?}"
        );
    }
}

/// The editor keeps the shipped anchors' keys between edits and takes, for
/// each edit, the rows of the anchors it keeps, joined to the keys of the
/// profile's own anchors. That must give the key term the same rows,
/// owners and energy as collecting those anchors in one batch.
#[test]
fn remembered_anchor_keys_give_the_rows_of_a_fresh_collection() {
    use imprint::editor::ftm::{AnchorKeys, TrainSequence};
    use imprint::editor::model::LlamaModel;

    let engine = common::engine();
    let model = LlamaModel::load(&common::model_path()).unwrap();
    let sequence = |q: &str| question_only(&engine, q, false);
    let shipped: Vec<TrainSequence> = [
        "What is the capital of Italy?",
        "What's my job?",
        "What pet do I have?",
        "Which sport do I play?",
        "How many days are in a week?",
    ]
    .iter()
    .map(|q| sequence(q))
    .collect();
    let profile = vec![sequence("Do I have a favorite season?")];
    let layer = (model.config.n_layer * 2).div_ceil(3);

    let all = AnchorKeys::collect(&model, &shipped, layer)
        .unwrap()
        .expect("anchors have keys");
    let keep = [3, 1];
    let picked = all
        .subset(&model, &keep, layer)
        .unwrap()
        .expect("rows kept");
    let own = AnchorKeys::collect_after(&model, &profile, layer, picked.shared_len)
        .unwrap()
        .expect("the profile anchor has keys");
    let joined = picked.join(own, keep.len()).unwrap();

    let together: Vec<TrainSequence> = keep
        .iter()
        .map(|&i| shipped[i].clone())
        .chain(profile.iter().cloned())
        .collect();
    let fresh = AnchorKeys::collect(&model, &together, layer)
        .unwrap()
        .expect("anchors have keys");

    assert_eq!(joined.shared_len, fresh.shared_len);
    assert_eq!(joined.owners, fresh.owners, "rows belong to other anchors");
    let (a, b) = (
        joined.keys.to_vec2::<f32>().unwrap(),
        fresh.keys.to_vec2::<f32>().unwrap(),
    );
    assert_eq!(a.len(), b.len(), "row counts differ");
    let scale = b.iter().flatten().fold(0f32, |m, x| m.max(x.abs()));
    let diff = a
        .iter()
        .flatten()
        .zip(b.iter().flatten())
        .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    assert!(
        diff <= 1e-4 * scale,
        "keys differ by {diff} (largest {scale})"
    );
    let rel = (joined.base_energy - fresh.base_energy).abs() / fresh.base_energy;
    assert!(
        rel <= 1e-4,
        "energy {} joined, {} fresh",
        joined.base_energy,
        fresh.base_energy
    );
}

/// The Porto request without anchors or projector, and settings for it.
fn porto_training(
    engine: &imprint::engine::Engine,
    model: &imprint::editor::model::LlamaModel,
) -> (
    Vec<imprint::editor::ftm::TrainSequence>,
    imprint::editor::ftm::FtmSettings,
) {
    let sequences = training_set(
        engine,
        model,
        "Porto",
        &[
            "What is my location?",
            "Where do I live?",
            "Which city do I live in?",
        ],
        &[],
        false,
    );
    let settings = ftm_settings(model, 40, 0.2, 5);
    (sequences, settings)
}

/// The weakest lead of a target token over the whole vocabulary, from
/// candle's whole-sequence forward with `edit` added to the down-projection
/// (`model` is left as it was).
fn least_target_lead_with(
    model: &mut imprint::editor::model::LlamaModel,
    sequences: &[imprint::editor::ftm::TrainSequence],
    settings: &imprint::editor::ftm::FtmSettings,
    edit: &imprint::editor::ftm::FtmResult,
) -> f32 {
    use candle_core::{Device, Tensor};
    let (rank, n_in, n_out) = (settings.rank, edit.n_in, edit.n_out);
    let a = Tensor::from_vec(edit.a.clone(), (rank, n_in), &Device::Cpu).unwrap();
    let b = Tensor::from_vec(edit.b.clone(), (n_out, rank), &Device::Cpu).unwrap();
    let delta = b.matmul(&a).unwrap();
    model.add_to_down_proj(settings.layer, &delta).unwrap();
    let mut least = f32::INFINITY;
    for s in sequences.iter().filter(|s| s.is_target) {
        let logits = model.logits(&s.tokens).unwrap().to_vec2::<f32>().unwrap();
        for p in s.answer_start..s.tokens.len() {
            let row = &logits[p - 1];
            let label = s.tokens[p] as usize;
            let rival = row
                .iter()
                .enumerate()
                .filter(|&(t, _)| t != label)
                .map(|(_, &v)| v)
                .fold(f32::NEG_INFINITY, f32::max);
            least = least.min(row[label] - rival);
        }
    }
    model
        .add_to_down_proj(settings.layer, &delta.neg().unwrap())
        .unwrap();
    least
}

/// Training judges its target tokens on a candidate vocabulary (the labels
/// and the base model's top tokens), and llama.cpp's logits lie up to ≈ 1.3
/// from candle's. An edit that training calls converged must therefore lead
/// the *whole* vocabulary by its target margin at every target token when
/// one is set: the Porto request once stopped with one question answering
/// "Estándor…" through llama.cpp, its first token never a candidate.
#[test]
fn a_converged_edit_leads_the_whole_vocabulary_at_every_target_token() {
    use imprint::editor::ftm::{self, FtmSettings, TARGET_MARGIN};
    use imprint::editor::model::LlamaModel;

    let engine = common::engine();
    let mut model = LlamaModel::load(&common::model_path()).unwrap();
    let (sequences, settings) = porto_training(&engine, &model);
    let settings = FtmSettings {
        target_margin: Some(TARGET_MARGIN),
        ..settings
    };
    let edit = ftm::train(&model, &sequences, None, None, &settings, |_, _| {}).unwrap();
    assert!(
        edit.converged,
        "no convergence in 40 steps ({} taken)",
        edit.steps
    );
    let lead = least_target_lead_with(&mut model, &sequences, &settings, &edit);
    // The whole-sequence forward adds in another order than training's
    // prefix/suffix split: a small tolerance.
    assert!(
        lead >= TARGET_MARGIN - 0.05,
        "the weakest target token leads by {lead} after {} steps",
        edit.steps
    );
    assert!((lead - edit.least_target_lead).abs() < 0.05);
}

/// With a constant learning rate Adam circles the optimum, and the last
/// step can be one where a target token has just lost. An edit that does
/// not converge returns the best iterate it judged instead: its reported
/// lead is that of the factors it returns, and more steps never give a
/// weaker edit.
#[test]
fn an_edit_that_never_converges_returns_its_best_iterate() {
    use imprint::editor::ftm::{self, FtmSettings};
    use imprint::editor::model::LlamaModel;

    let engine = common::engine();
    let mut model = LlamaModel::load(&common::model_path()).unwrap();
    let (sequences, settings) = porto_training(&engine, &model);
    // A loss no edit reaches: training never stops early. A high learning
    // rate makes the trajectory circle.
    let never = |max_steps| FtmSettings {
        max_steps,
        stop_loss: 0.0,
        learning_rate: 0.15,
        ..settings.clone()
    };
    let mut leads = Vec::new();
    for max_steps in [12, 24] {
        let s = never(max_steps);
        let edit = ftm::train(&model, &sequences, None, None, &s, |_, _| {}).unwrap();
        assert!(!edit.converged);
        assert_eq!(edit.steps, max_steps);
        let lead = least_target_lead_with(&mut model, &sequences, &s, &edit);
        assert!(
            (lead - edit.least_target_lead).abs() < 0.05,
            "reported {} but the returned factors lead by {lead}",
            edit.least_target_lead
        );
        leads.push(edit.least_target_lead);
    }
    assert!(
        leads[1] >= leads[0],
        "24 steps gave a weaker edit than 12: {leads:?}"
    );
}

/// A retry trains on dozens of cross-entropy anchors, and it can happen that
/// no iterate which answers the targets keeps the required share of their
/// tokens: every step that learns moves some of them. Training used to
/// return the untrained start then (the best iterate that kept the
/// anchors), an edit of norm zero that the gate reports as "0/3 learned".
/// It now returns the iterate that learned and kept the most anchor
/// tokens, so the gate can judge a real edit. Here the anchors ask about
/// places too, two of them in nearly the request's words, and all of their
/// tokens must be kept: in ten steps the Porto edit cannot do that, yet
/// what comes back answers every target.
#[test]
fn a_run_that_cannot_keep_every_anchor_still_returns_an_edit_that_learned() {
    use imprint::editor::ftm::{self, FtmSettings};
    use imprint::editor::model::LlamaModel;

    let engine = common::engine();
    let mut model = LlamaModel::load(&common::model_path()).unwrap();
    let sequences = training_set(
        &engine,
        &model,
        "Porto",
        &[
            "What is my location?",
            "Where do I live?",
            "Which city do I live in?",
        ],
        &[
            "Where do I live now?",
            "What is my current location?",
            "Which city do I work in?",
            "Where do my parents live?",
            "What's my hometown?",
            "Where did I grow up?",
        ],
        false,
    );
    // Ten steps: given thirty, cross-entropy learns the anchors back (by
    // step 14 on this request every anchor token is kept again), and the
    // case this test is about never arises.
    let settings = FtmSettings {
        min_anchor_agreement: 1.0,
        ..ftm_settings(&model, 10, 0.0, 5)
    };
    let edit = ftm::train(&model, &sequences, None, None, &settings, |_, _| {}).unwrap();
    assert!(!edit.converged, "stop loss 0 is never reached");
    let lead = least_target_lead_with(&mut model, &sequences, &settings, &edit);
    assert!(
        (lead - edit.least_target_lead).abs() < 0.05,
        "reported {} but the returned factors lead by {lead}",
        edit.least_target_lead
    );
    assert!(
        lead > 0.0,
        "the returned edit does not answer every target (weakest lead {lead})"
    );
}
