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
