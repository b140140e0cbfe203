//! Scoring rules, as in the paper: an answer is correct when the target
//! appears in it (case-insensitive substring). There is no LLM judge, so a
//! token-overlap F1 is reported beside the strict score.

pub use crate::editor::verify::contains_target;

/// Lower-cased alphanumeric words.
fn words(text: &str) -> Vec<String> {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .collect()
}

/// SQuAD-style token F1 between an answer and the target (bag of words).
pub fn token_f1(answer: &str, target: &str) -> f64 {
    let (a, t) = (words(answer), words(target));
    if a.is_empty() && t.is_empty() {
        return 1.0;
    }
    crate::learn::extract::bag_f1(&a, &t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strict_score_is_a_case_insensitive_substring() {
        assert!(contains_target(
            "I think you'd enjoy DANCING AT CLUBS tonight",
            "Dancing at clubs"
        ));
        assert!(!contains_target("Dancing", "Dancing at clubs"));
    }

    #[test]
    fn token_f1_counts_overlap_both_ways() {
        assert_eq!(token_f1("Dancing at clubs", "dancing at clubs"), 1.0);
        assert_eq!(token_f1("cooking", "Dancing at clubs"), 0.0);
        // 2 of 3 target words in a 4-word answer: P = 1/2, R = 2/3.
        let f1 = token_f1("I love dancing clubs", "Dancing at clubs");
        assert!((f1 - 2.0 * 0.5 * (2.0 / 3.0) / (0.5 + 2.0 / 3.0)).abs() < 1e-9);
        // Repeated words are not double counted.
        assert!(token_f1("clubs clubs clubs", "clubs") < 1.0);
    }
}
