//! Synonym clusters: the questions each preference is trained on.
//!
//! A cluster has k members, each an attribute synonym with a natural
//! question that contains it. Synonyms come from a lexicon shipped in
//! `assets/learn/attribute_lexicon.tsv` for common attribute types, and from
//! templates for the rest ("favorite sport" → "my favorite sport"). The
//! first member always asks about the attribute as the user named it.
//!
//! Not yet done (capture issue): synonyms proposed by the model, and the
//! embedding-similarity filter that keeps a cluster tight.

use std::collections::HashMap;
use std::sync::LazyLock;

use crate::profile::{ClusterMember, Polarity};

const LEXICON: &str = include_str!("../../assets/learn/attribute_lexicon.tsv");

static SYNONYMS: LazyLock<HashMap<String, Vec<String>>> = LazyLock::new(|| {
    LEXICON
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (attribute, synonyms) = l.split_once('\t')?;
            Some((
                attribute.trim().to_lowercase(),
                synonyms.split('|').map(|s| s.trim().to_string()).collect(),
            ))
        })
        .collect()
});

/// Question templates, cycled over the synonyms.
const TEMPLATES: &[&str] = &[
    "What is my {}?",
    "What's my {}?",
    "Do you remember my {}?",
    "Tell me my {}.",
    "Can you remind me of my {}?",
];

/// The synonyms for an attribute: the lexicon's, or the attribute itself
/// with and without "favorite".
pub fn synonyms(attribute: &str) -> Vec<String> {
    let key = attribute.trim().to_lowercase();
    let mut out = vec![key.clone()];
    if let Some(list) = SYNONYMS.get(&key) {
        out.extend(list.iter().cloned());
    } else if let Some(stripped) = key.strip_prefix("favorite ") {
        out.push(format!("favourite {stripped}"));
        out.push(format!("preferred {stripped}"));
    } else {
        out.push(format!("favorite {key}"));
        out.push(format!("preferred {key}"));
    }
    let mut seen = std::collections::HashSet::new();
    out.retain(|s| seen.insert(s.clone()));
    out
}

/// k cluster members for a preference. Dislikes are asked as such ("What
/// is something I dislike?") through the lexicon's "dislikes" entry.
pub fn build(attribute: &str, polarity: Polarity, k: usize) -> Vec<ClusterMember> {
    let attribute = match polarity {
        Polarity::Dislike if !attribute.contains("dislike") => "dislikes",
        _ => attribute,
    };
    synonyms(attribute)
        .into_iter()
        .take(k.max(1))
        .enumerate()
        .map(|(i, synonym)| ClusterMember {
            question: TEMPLATES[i % TEMPLATES.len()].replace("{}", &synonym),
            attribute: synonym,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clusters_contain_their_synonym_and_are_distinct() {
        for attribute in [
            "location",
            "hobby",
            "favorite sport",
            "sport",
            "unheard-of thing",
        ] {
            let c = build(attribute, Polarity::Is, 3);
            assert_eq!(c.len(), 3, "{attribute}: {c:?}");
            for m in &c {
                assert!(m.question.contains(&m.attribute), "{m:?}");
            }
            let questions: std::collections::HashSet<_> = c.iter().map(|m| &m.question).collect();
            assert_eq!(questions.len(), 3);
            assert!(c[0].attribute == attribute.to_lowercase());
        }
    }
}
