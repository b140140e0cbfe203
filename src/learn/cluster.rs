//! Synonym clusters: the questions each preference is trained on.
//!
//! A cluster has k members, each an attribute synonym with a natural
//! question that contains it. For common attribute types they come from a
//! lexicon shipped in `assets/learn/attribute_lexicon.tsv`, written as the
//! questions people actually ask ("Where do I live?"), because an edit
//! answers reliably only the questions it was trained on. Other attributes
//! get template questions ("favorite sport" → "What is my favorite
//! sport?", "Which sport do I like best?").
//!
//! Not yet done (capture issue): synonyms proposed by the model, and the
//! embedding-similarity filter that keeps a cluster tight.

use std::collections::HashMap;
use std::sync::LazyLock;

use crate::profile::{ClusterMember, Polarity};

const LEXICON: &str = include_str!("../../assets/learn/attribute_lexicon.tsv");

/// attribute → (synonym, question) pairs, in the lexicon's order.
static LEXICON_MEMBERS: LazyLock<HashMap<String, Vec<ClusterMember>>> = LazyLock::new(|| {
    LEXICON
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (attribute, members) = l.split_once('\t')?;
            let members = members
                .split('|')
                .filter_map(|m| {
                    let (synonym, question) = m.split_once(':')?;
                    Some(ClusterMember {
                        attribute: synonym.trim().to_string(),
                        question: question.trim().to_string(),
                    })
                })
                .collect();
            Some((attribute.trim().to_lowercase(), members))
        })
        .collect()
});

/// Templates for attributes the lexicon does not know; `{}` is the
/// attribute without "favorite".
const TEMPLATES: &[(&str, &str)] = &[
    ("favorite {}", "What is my favorite {}?"),
    ("{}", "Which {} do I like best?"),
    ("{} I love", "What is the {} I love most?"),
    ("{}", "Do you know my favourite {}?"),
    ("{}", "Tell me about my {}."),
];

/// k cluster members for a preference: the lexicon's, or templates.
/// Dislikes are asked as such ("What do I dislike?").
pub fn build(attribute: &str, polarity: Polarity, k: usize) -> Vec<ClusterMember> {
    let key = match polarity {
        Polarity::Dislike => "dislikes".to_string(),
        _ => attribute.trim().to_lowercase(),
    };
    let k = k.max(1);
    if let Some(members) = LEXICON_MEMBERS.get(&key) {
        return members.iter().take(k).cloned().collect();
    }
    let base = key
        .strip_prefix("favorite ")
        .or_else(|| key.strip_prefix("favourite "))
        .unwrap_or(&key)
        .to_string();
    TEMPLATES
        .iter()
        .take(k)
        .map(|(synonym, question)| ClusterMember {
            attribute: synonym.replace("{}", &base),
            question: question.replace("{}", &base),
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
        }
        // Every lexicon entry keeps the rule, and has at least three members.
        for (attribute, members) in LEXICON_MEMBERS.iter() {
            assert!(members.len() >= 3, "{attribute}");
            for m in members {
                assert!(m.question.contains(&m.attribute), "{attribute}: {m:?}");
            }
        }
        assert_eq!(
            build("city", Polarity::Dislike, 2)[0].question,
            "What do I dislike?"
        );
    }
}
