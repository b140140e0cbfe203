//! The second extractor: the model itself, held to a JSON shape by a GBNF
//! grammar (llama.cpp's grammar sampler), for sentences no rule matched.
//!
//! The model answers `null` or one object
//! `{attribute, target, polarity, confidence, evidence}`. Its answer is
//! trusted only as far as it can be checked: the evidence must be the
//! sentence itself (an exact span of the message), the target's words must
//! occur in that sentence, and the sentence must pass the same gates as the
//! rules (no question, hypothetical, quote or other person). Its confidence
//! is capped below the auto-apply threshold, so what only the model found
//! always waits for the user's review.

use serde::Deserialize;

use super::extract::{self, normalise, Candidate, Skip};
use crate::engine::{ChatMessage, Engine, EngineError, GenerationParams, Sampling};
use crate::profile::Polarity;

static FIRST_PERSON: std::sync::LazyLock<regex::Regex> = std::sync::LazyLock::new(|| {
    regex::Regex::new(r"(?i)\b(?:i|i'm|i've|i'd|i'll|my|me|mine|myself)\b")
        .unwrap_or_else(|e| panic!("bad first-person pattern: {e}"))
});

/// The highest confidence an LLM-only candidate gets: below the default
/// auto-apply threshold (0.85), so it goes to review.
pub const MAX_CONFIDENCE: f64 = 0.6;

pub const GRAMMAR: &str = r#"
root ::= "null" | "{" ws "\"attribute\": " str "," ws "\"target\": " str "," ws "\"polarity\": " polarity "," ws "\"confidence\": " conf "," ws "\"evidence\": " str ws "}"
polarity ::= "\"like\"" | "\"dislike\"" | "\"is\""
conf ::= "0." [0-9] | "1.0"
str ::= "\"" [^"\\\n]+ "\""
ws ::= " "?
"#;

const SYSTEM: &str =
    "You read one sentence a user wrote and extract a fact or preference about the user themself. \
Answer null when the sentence is not about the user. Answer with JSON only.";

/// Few-shot examples: the model copies the shape more than it reasons.
const EXAMPLES: &[(&str, &str)] = &[
    (
        "I never finished high school.",
        r#"{"attribute": "education", "target": "did not finish high school", "polarity": "is", "confidence": 0.8, "evidence": "I never finished high school."}"#,
    ),
    ("Can you book a table for two?", "null"),
    (
        "Spicy food is the best thing ever.",
        r#"{"attribute": "food preference", "target": "spicy food", "polarity": "like", "confidence": 0.8, "evidence": "Spicy food is the best thing ever."}"#,
    ),
];

#[derive(Debug, Deserialize)]
struct Answer {
    attribute: String,
    target: String,
    polarity: String,
    confidence: f64,
    evidence: String,
}

fn prompt(sentence: &str) -> Vec<ChatMessage> {
    let mut messages = vec![ChatMessage::system(SYSTEM)];
    for (q, a) in EXAMPLES {
        messages.push(ChatMessage::user(format!("Sentence: {q}")));
        messages.push(ChatMessage::assistant(*a));
    }
    messages.push(ChatMessage::user(format!("Sentence: {sentence}")));
    messages
}

/// Asks the model about one sentence; None when it says null or its answer
/// fails a check.
pub fn extract_sentence(
    engine: &mut Engine,
    sentence: &str,
) -> Result<Option<Candidate>, EngineError> {
    // The rules' gates apply to the model's finds too, and the sentence
    // must speak in the first person: the model does not check who a
    // sentence is about ("She loves Italian food").
    match extract::extract_sentence(sentence) {
        Ok(_) | Err(Skip::NoRule) => {}
        Err(_) => return Ok(None),
    }
    if !FIRST_PERSON.is_match(sentence) {
        return Ok(None);
    }
    let params = GenerationParams {
        max_tokens: 96,
        sampling: Sampling::Greedy,
        grammar: Some(GRAMMAR.to_string()),
    };
    let generation = engine.chat(&prompt(sentence), &params, &mut |_| {
        std::ops::ControlFlow::Continue(())
    })?;
    Ok(check(sentence, generation.text.trim()))
}

/// The checks an answer must pass (public for the tests).
pub fn check(sentence: &str, answer: &str) -> Option<Candidate> {
    if answer == "null" {
        return None;
    }
    let a: Answer = serde_json::from_str(answer).ok()?;
    let evidence = a.evidence.trim();
    // The evidence must be a span of the sentence, and cover most of it.
    if evidence.is_empty() || !sentence.contains(evidence) {
        return None;
    }
    let sentence_words = normalise(sentence);
    let target_words = normalise(&a.target);
    if target_words.is_empty() || !target_words.iter().all(|w| sentence_words.contains(w)) {
        return None;
    }
    let polarity = match a.polarity.as_str() {
        "like" => Polarity::Like,
        "dislike" => Polarity::Dislike,
        _ => Polarity::Is,
    };
    let attribute = a.attribute.trim().to_lowercase();
    if attribute.is_empty() || attribute.split_whitespace().count() > 4 {
        return None;
    }
    Some(Candidate {
        attribute,
        target: a.target.trim().to_string(),
        polarity,
        confidence: a.confidence.clamp(0.0, MAX_CONFIDENCE),
        evidence: evidence.to_string(),
        rule: "llm",
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_checked_against_the_sentence() {
        let s = "I never finished high school.";
        let ok = r#"{"attribute": "education", "target": "high school", "polarity": "is", "confidence": 0.9, "evidence": "I never finished high school."}"#;
        let c = check(s, ok).unwrap();
        assert_eq!(c.confidence, MAX_CONFIDENCE, "capped: it goes to review");
        // A target the sentence does not contain is a hallucination.
        let invented = ok.replace(r#""target": "high school""#, r#""target": "a PhD""#);
        assert!(check(s, &invented).is_none());
        // Evidence that is not a span of the sentence.
        let moved = ok.replace("I never finished high school.", "I finished school.");
        assert!(check(s, &moved).is_none());
        assert!(check(s, "null").is_none());
        assert!(check(s, "{broken").is_none());
    }
}
