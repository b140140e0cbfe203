//! The verification gate: an edit is judged through llama.cpp with the real
//! adapter attached, the way users will meet it, never through the editor's
//! own forward pass.

use std::ops::ControlFlow;

use crate::engine::{ChatMessage, Engine, EngineError, GenerationParams};

/// The greedy answer to one question.
pub fn answer(
    engine: &mut Engine,
    system_prompt: &str,
    question: &str,
    max_tokens: u32,
) -> Result<String, EngineError> {
    let messages = vec![
        ChatMessage::system(system_prompt),
        ChatMessage::user(question),
    ];
    Ok(engine
        .chat(
            &messages,
            &GenerationParams::greedy(max_tokens),
            &mut |_| ControlFlow::Continue(()),
        )?
        .text)
}

/// A greedy answer with its tokens, and the model's teacher-forced argmax
/// along a reference answer (`reference`, or this answer itself).
#[derive(Debug, Clone)]
pub struct ProbeAnswer {
    pub text: String,
    pub tokens: Vec<i32>,
    /// The argmax at each position that predicts a reference token.
    pub argmax: Vec<i32>,
}

/// Greedy answer to `question`, plus the argmax at every position of
/// `reference` (or of the answer itself) fed in after the question. Greedy
/// text diverges completely after one flipped near-tie; the argmax along a
/// fixed answer counts each flip once.
pub fn probe(
    engine: &mut Engine,
    system_prompt: &str,
    question: &str,
    max_tokens: u32,
    reference: Option<&[i32]>,
) -> Result<ProbeAnswer, EngineError> {
    let messages = [
        ChatMessage::system(system_prompt),
        ChatMessage::user(question),
    ];
    let generation = engine.chat(
        &messages,
        &GenerationParams::greedy(max_tokens),
        &mut |_| ControlFlow::Continue(()),
    )?;
    let teacher = reference.unwrap_or(&generation.tokens);
    let argmax = teacher_forced_argmax(engine, system_prompt, question, teacher)?;
    Ok(ProbeAnswer {
        text: generation.text,
        tokens: generation.tokens,
        argmax,
    })
}

/// The model's argmax at every position of `reference` fed in after the
/// templated `question`: one batched decode, no sampling loop.
pub fn teacher_forced_argmax(
    engine: &mut Engine,
    system_prompt: &str,
    question: &str,
    reference: &[i32],
) -> Result<Vec<i32>, EngineError> {
    let messages = [
        ChatMessage::system(system_prompt),
        ChatMessage::user(question),
    ];
    let mut tokens: Vec<i32> = engine
        .tokenize(&engine.render(&messages)?)
        .iter()
        .map(|t| t.0)
        .collect();
    let prompt_len = tokens.len();
    tokens.extend_from_slice(reference);
    let logits = engine.logits_all(&tokens[..tokens.len().saturating_sub(1)])?;
    Ok(logits
        .iter()
        .skip(prompt_len.saturating_sub(1))
        .map(|row| {
            row.iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .map_or(0, |(i, _)| i as i32)
        })
        .collect())
}

/// [`probe`] after an edit, against the answer `before` it. The argmax along
/// the old answer comes first; when it agrees at every position the greedy
/// answer cannot have changed (greedy decoding follows exactly that argmax),
/// so it is not generated again. Only the probes the edit moved pay for a
/// sampling loop, which is where verification spent most of its time.
pub fn probe_after(
    engine: &mut Engine,
    system_prompt: &str,
    question: &str,
    max_tokens: u32,
    before: &ProbeAnswer,
) -> Result<ProbeAnswer, EngineError> {
    let argmax = teacher_forced_argmax(engine, system_prompt, question, &before.tokens)?;
    if argmax == before.argmax {
        return Ok(ProbeAnswer {
            text: before.text.clone(),
            tokens: before.tokens.clone(),
            argmax,
        });
    }
    let generation = engine.chat(
        &[
            ChatMessage::system(system_prompt),
            ChatMessage::user(question),
        ],
        &GenerationParams::greedy(max_tokens),
        &mut |_| ControlFlow::Continue(()),
    )?;
    Ok(ProbeAnswer {
        text: generation.text,
        tokens: generation.tokens,
        argmax,
    })
}

/// The answer to `question` as far as the gate needs it: whether it
/// contains `target`. When the argmax along `target_tokens` (the edit's own
/// tokenization of its target) right after the question is exactly those
/// tokens, greedy decoding writes the target first, and the answer is
/// reported as the target itself without generating; otherwise the greedy
/// answer (up to `max_tokens`) is generated and returned as it is. One
/// batched decode instead of a sampling loop for every earlier preference
/// that still works, which is most of them.
pub fn answer_for_target(
    engine: &mut Engine,
    system_prompt: &str,
    question: &str,
    target: &str,
    target_tokens: &[i32],
    max_tokens: u32,
) -> Result<String, EngineError> {
    if !target_tokens.is_empty()
        && teacher_forced_argmax(engine, system_prompt, question, target_tokens)? == target_tokens
    {
        return Ok(target.to_string());
    }
    answer(engine, system_prompt, question, max_tokens)
}

/// Positions where two teacher-forced argmax sequences agree, and how many
/// were compared.
pub fn agreement(before: &[i32], after: &[i32]) -> (usize, usize) {
    let same = before.iter().zip(after).filter(|(a, b)| a == b).count();
    (same, before.len())
}

/// The paper's strict rule: the target appears in the answer, ignoring case.
pub fn contains_target(answer: &str, target: &str) -> bool {
    answer
        .to_lowercase()
        .contains(&target.trim().to_lowercase())
}

/// Two probe answers agree when their normalised text is the same.
pub fn same_answer(a: &str, b: &str) -> bool {
    let norm = |s: &str| {
        s.split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
            .to_lowercase()
    };
    norm(a) == norm(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agreement_counts_equal_positions() {
        assert_eq!(agreement(&[1, 2, 3], &[1, 5, 3]), (2, 3));
        assert_eq!(agreement(&[], &[]), (0, 0));
    }

    #[test]
    fn target_matching_ignores_case_and_surrounding_text() {
        assert!(contains_target(
            "Your hobby is dancing at clubs!",
            "Dancing at clubs"
        ));
        assert!(!contains_target("You like dancing.", "Dancing at clubs"));
        assert!(same_answer("Four.\n", "  four. "));
        assert!(!same_answer("Four.", "Five."));
    }
}
