//! Capture on real profile files: messages in, preferences out, with the
//! privacy filter, dedupe, supersession and contradictions.

mod common;

use imprint::learn::capture::{capture_message, CaptureSettings};
use imprint::paths::Paths;
use imprint::profile::{
    KeyChoice, PassphraseSource, PreferenceStatus, Profile, ProfileError, SourceRef,
};
use zeroize::Zeroizing;

struct Fixed;
impl PassphraseSource for Fixed {
    fn passphrase(&self, _confirm: bool) -> Result<Zeroizing<String>, ProfileError> {
        Ok(Zeroizing::new("capture test".into()))
    }
}

fn settings() -> CaptureSettings {
    CaptureSettings {
        auto_apply_threshold: 0.85,
        cluster_size: 3,
    }
}

#[test]
fn a_conversation_yields_exactly_the_planted_preferences() {
    let dir = tempfile::tempdir().unwrap();
    let (mut profile, _) =
        Profile::create(&Paths::under(dir.path()), KeyChoice::Passphrase, &Fixed).unwrap();
    let conv = profile.create_conversation("planted").unwrap();
    let say = |profile: &mut Profile, text: &str| {
        let id = profile.add_message(conv, "user", text).unwrap();
        (
            id,
            capture_message(profile, id, text, &settings(), Some("m"), None).unwrap(),
        )
    };

    let (m1, r) = say(
        &mut profile,
        "Hi! I live in Lisbon. My brother loves golf. If I were rich I'd buy a boat. \
         What's the weather like? My password is hunter2. I love sushi.",
    );
    assert_eq!(r.learned.len(), 1, "{r:?}");
    assert_eq!(r.pending.len(), 1, "{r:?}");
    assert_eq!(r.jobs.len(), 1);
    assert_eq!(r.secrets_skipped.total(), 1);
    let prefs = profile.preferences(None).unwrap();
    let targets: Vec<&str> = prefs.iter().map(|p| p.target.as_str()).collect();
    assert_eq!(targets, vec!["Lisbon", "sushi"]);
    assert!(prefs
        .iter()
        .all(|p| !p.target.contains("hunter2") && !p.statement.contains("hunter2")));
    let lisbon = &prefs[0];
    assert_eq!(lisbon.status, PreferenceStatus::Active);
    assert_eq!(
        lisbon.sources[0].reference,
        SourceRef::Message { message_id: m1 }
    );
    assert_eq!(lisbon.cluster.len(), 3);
    assert!(lisbon
        .cluster
        .iter()
        .all(|m| m.question.contains(&m.attribute)));
    assert_eq!(
        prefs[1].status,
        PreferenceStatus::Pending,
        "0.8 confidence waits for review"
    );
    // The assistant's own words are never captured: only user messages
    // reach capture_message, and the message is stored as the assistant's.
    profile
        .add_message(conv, "assistant", "I love Lisbon too!")
        .unwrap();

    // Said again: one preference, two sources.
    let (_, r) = say(&mut profile, "I live in Lisbon.");
    assert_eq!(r.reinforced, vec![lisbon.id]);
    assert_eq!(profile.preference(lisbon.id).unwrap().sources.len(), 2);

    // A changed value supersedes the old one.
    let (_, r) = say(&mut profile, "I moved to Porto.");
    assert_eq!(r.superseded.len(), 1, "{r:?}");
    let (old, new) = r.superseded[0];
    assert_eq!(old, lisbon.id);
    assert_eq!(
        profile.preference(old).unwrap().status,
        PreferenceStatus::Superseded
    );
    let porto = profile.preference(new).unwrap();
    assert_eq!(
        (porto.target.as_str(), porto.supersedes),
        ("Porto", Some(old))
    );

    // The opposite of a known preference goes to review, with the audit
    // log naming both.
    let (_, r) = say(&mut profile, "I can't stand sushi.");
    assert_eq!(r.pending.len(), 1);
    let log = profile.audit_log(100).unwrap();
    assert!(log.iter().any(|e| e
        .detail
        .contains(&format!("contradicts preference {}", prefs[1].id))));
}

/// llama.cpp's grammar sampler holds the real model to the given shape,
/// and the LLM extractor's answers on the real model pass its own checks
/// (or are dropped), never anything in between.
#[test]
fn the_grammar_holds_the_real_model_to_its_shape() {
    let mut engine = common::engine();
    let params = imprint::engine::GenerationParams {
        max_tokens: 8,
        sampling: imprint::engine::Sampling::Greedy,
        grammar: Some(r#"root ::= "yes" | "no""#.into()),
    };
    let reply = engine
        .chat(
            &[imprint::engine::ChatMessage::user(
                "Is Paris in France? Answer yes or no.",
            )],
            &params,
            &mut |_| std::ops::ControlFlow::Continue(()),
        )
        .unwrap();
    assert!(
        reply.text == "yes" || reply.text == "no",
        "{:?}",
        reply.text
    );

    for sentence in [
        "I never finished high school.",
        "In my spare time i sew.",
        "She loves Italian food.",
    ] {
        if let Some(c) =
            imprint::learn::llm_extract::extract_sentence(&mut engine, sentence).unwrap()
        {
            assert!(sentence.contains(&c.evidence), "{c:?}");
            assert!(c.confidence <= imprint::learn::llm_extract::MAX_CONFIDENCE);
            assert_ne!(
                sentence, "She loves Italian food.",
                "not first person: {c:?}"
            );
        }
    }
}

/// With the model as second extractor, what only the model finds waits for
/// review: it never becomes active or queues an edit on its own.
#[test]
fn model_only_finds_wait_for_review() {
    let dir = tempfile::tempdir().unwrap();
    let (mut profile, _) =
        Profile::create(&Paths::under(dir.path()), KeyChoice::Passphrase, &Fixed).unwrap();
    let conv = profile.create_conversation("llm").unwrap();
    let mut engine = common::engine();
    let text = "I never finished high school. In my spare time i sew.";
    let id = profile.add_message(conv, "user", text).unwrap();
    let report = capture_message(
        &mut profile,
        id,
        text,
        &settings(),
        Some("m"),
        Some(&mut engine),
    )
    .unwrap();
    // "In my spare time i sew" is a rule match (active); anything else came
    // from the model and must be pending.
    for pid in &report.learned {
        let p = profile.preference(*pid).unwrap();
        assert!(
            p.confidence > imprint::learn::llm_extract::MAX_CONFIDENCE,
            "{p:?}"
        );
    }
    for pid in &report.pending {
        let p = profile.preference(*pid).unwrap();
        assert!(text.contains(&p.statement), "{p:?}");
    }
    assert_eq!(report.jobs.len(), report.learned.len());
}
