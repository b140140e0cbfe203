//! The editor's fixed prompt sets, shipped in `assets/editor/`: training
//! anchors, locality probes (never trained on) and the null-space corpus.

/// A question, tagged with the attribute it asks about (`general` when it is
/// not about the user).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaggedQuestion {
    pub attribute: String,
    pub question: String,
}

const ANCHOR_GENERAL: &str = include_str!("../../assets/editor/anchor_general.txt");
const ANCHOR_PERSONAL: &str = include_str!("../../assets/editor/anchor_personal.txt");
const PROBES: &str = include_str!("../../assets/editor/probes.txt");
const CORPUS: &str = include_str!("../../assets/editor/corpus_prompts.txt");

fn lines(text: &str) -> impl Iterator<Item = &str> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
}

fn tagged(text: &str) -> Vec<TaggedQuestion> {
    lines(text)
        .map(|l| match l.split_once('\t') {
            Some((a, q)) => TaggedQuestion {
                attribute: a.trim().to_string(),
                question: q.trim().to_string(),
            },
            None => TaggedQuestion {
                attribute: "general".into(),
                question: l.to_string(),
            },
        })
        .collect()
}

pub fn general_anchors() -> Vec<TaggedQuestion> {
    tagged(ANCHOR_GENERAL)
}

pub fn personal_anchors() -> Vec<TaggedQuestion> {
    tagged(ANCHOR_PERSONAL)
}

pub fn locality_probes() -> Vec<TaggedQuestion> {
    tagged(PROBES)
}

pub fn corpus_prompts() -> Vec<String> {
    lines(CORPUS).map(str::to_string).collect()
}

/// Loose attribute match, so "favorite color" and "color" count as one. A
/// name may list aliases separated by `|` ("job|profession|work"): any
/// pair that matches makes the two the same attribute.
pub fn same_attribute(a: &str, b: &str) -> bool {
    let norm = |s: &str| s.trim().to_ascii_lowercase().replace(['_', '-'], " ");
    let names = |s: &str| {
        s.split('|')
            .map(norm)
            .filter(|n| !n.is_empty())
            .collect::<Vec<_>>()
    };
    let (a, b) = (names(a), names(b));
    a.iter()
        .any(|a| b.iter().any(|b| a == b || a.contains(b) || b.contains(a)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attribute_names_match_loosely_and_through_aliases() {
        assert!(same_attribute("color", "favorite color"));
        assert!(same_attribute("Music_Preference", "music"));
        assert!(same_attribute("job|profession|work", "profession"));
        assert!(same_attribute("career goal", "goal|ambition"));
        assert!(!same_attribute("job|profession", "hobby"));
        assert!(!same_attribute("pet", "food preference"));
        // An empty alias ("a||b") must not match everything.
        assert!(!same_attribute("pet||dog", "music"));
    }

    #[test]
    fn every_personal_anchor_names_its_attribute() {
        let anchors = personal_anchors();
        assert!(anchors.len() >= 40, "{} personal anchors", anchors.len());
        for a in &anchors {
            assert_ne!(
                a.attribute, "general",
                "{:?} has no attribute tag",
                a.question
            );
        }
    }

    #[test]
    fn probes_never_overlap_training_anchors_or_corpus() {
        let probes: Vec<String> = locality_probes().into_iter().map(|p| p.question).collect();
        let mut trained: Vec<String> = general_anchors()
            .into_iter()
            .chain(personal_anchors())
            .map(|p| p.question)
            .collect();
        trained.extend(corpus_prompts());
        for p in &probes {
            assert!(!trained.contains(p), "probe {p:?} is also used in training");
        }
        assert!(probes.len() >= 10);
        assert!(corpus_prompts().len() >= 40);
    }
}
