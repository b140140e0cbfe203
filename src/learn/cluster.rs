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
//! For attributes the lexicon does not know, the edit job first asks the
//! model for synonyms ([`refine_with_model`]): a GBNF grammar holds it to a
//! JSON list, and an embedding filter ([`SynonymFilter`]) drops proposals
//! that are not closer to the attribute than to most of the lexicon's other
//! attributes. The filter is weak on the default model: its embeddings
//! barely tell attributes apart (docs/RESULTS.md, "Synonym clusters"), so
//! the hand-written lexicon stays the main source.

use std::collections::HashMap;
use std::sync::LazyLock;

use crate::engine::{ChatMessage, Engine, EngineError, GenerationParams, Sampling};
use crate::profile::{ClusterMember, Polarity, Preference};

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
    let key = lexicon_key(attribute, polarity);
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

/// The lexicon's attributes (sorted) with their members.
pub fn lexicon() -> Vec<(String, Vec<ClusterMember>)> {
    let mut all: Vec<_> = LEXICON_MEMBERS
        .iter()
        .map(|(a, m)| (a.clone(), m.clone()))
        .collect();
    all.sort_by(|a, b| a.0.cmp(&b.0));
    all
}

/// The lexicon entry a preference is looked up under: dislikes share one.
fn lexicon_key(attribute: &str, polarity: Polarity) -> String {
    match polarity {
        Polarity::Dislike => "dislikes".to_string(),
        _ => attribute.trim().to_lowercase(),
    }
}

/// Whether the lexicon has hand-written questions for this preference.
pub fn in_lexicon(attribute: &str, polarity: Polarity) -> bool {
    LEXICON_MEMBERS.contains_key(&lexicon_key(attribute, polarity))
}

/// Whether a stored preference's cluster is still the plain template one,
/// so the model may improve it (a cluster already refined, edited by hand
/// or taken from the lexicon is left alone).
pub fn is_template_cluster(p: &Preference) -> bool {
    !in_lexicon(&p.attribute, p.polarity)
        && !p.cluster.is_empty()
        && p.cluster == build(&p.attribute, p.polarity, p.cluster.len())
}

/// The model's answer: a JSON list of short lowercase phrases.
pub const SYNONYM_GRAMMAR: &str = r#"
root ::= "[" item ("," " " item)* "]"
item ::= "\"" [a-z] [a-z' -]* "\""
"#;

const SYNONYM_SYSTEM: &str =
    "You list synonyms: other words or short phrases people use for the same \
personal attribute. Answer with a JSON list only.";

/// Few-shot examples: the small model copies the shape more than it reasons.
const SYNONYM_EXAMPLES: &[(&str, &str)] = &[
    (
        "hobby",
        r#"["pastime", "leisure activity", "free-time activity"]"#,
    ),
    ("job", r#"["occupation", "profession", "line of work"]"#),
];

/// Up to `n` synonyms of `attribute` proposed by the model (greedy, so the
/// same attribute always gets the same proposals), cleaned: one to four
/// words, letters only, not the attribute itself, no repeats.
pub fn propose_synonyms(
    engine: &mut Engine,
    attribute: &str,
    n: usize,
) -> Result<Vec<String>, EngineError> {
    let mut messages = vec![ChatMessage::system(SYNONYM_SYSTEM)];
    for (a, list) in SYNONYM_EXAMPLES {
        messages.push(ChatMessage::user(format!("Attribute: {a}")));
        messages.push(ChatMessage::assistant(*list));
    }
    messages.push(ChatMessage::user(format!(
        "Attribute: {}",
        attribute.trim()
    )));
    let params = GenerationParams {
        max_tokens: 48,
        sampling: Sampling::Greedy,
        grammar: Some(SYNONYM_GRAMMAR.to_string()),
    };
    let reply = engine.chat(&messages, &params, &mut |_| {
        std::ops::ControlFlow::Continue(())
    })?;
    Ok(clean_synonyms(attribute, &reply.text, n))
}

/// Parses and cleans the model's list. A reply cut off by the token budget
/// keeps the items it completed.
pub fn clean_synonyms(attribute: &str, reply: &str, n: usize) -> Vec<String> {
    let own = attribute.trim().to_lowercase();
    let bare = own.strip_prefix("favorite ").unwrap_or(&own).to_string();
    let mut out: Vec<String> = Vec::new();
    let parts: Vec<&str> = reply.split('"').collect();
    // Odd parts are the quoted items; an item without its closing quote
    // (the reply was cut off) is not one of the `closed`.
    let closed = parts.len().saturating_sub(1) / 2;
    for item in parts.iter().skip(1).step_by(2).take(closed) {
        let s = item.trim().to_lowercase();
        let words = s.split_whitespace().count();
        let letters = s
            .chars()
            .all(|c| c.is_ascii_lowercase() || matches!(c, ' ' | '-' | '\''));
        if (1..=4).contains(&words) && letters && s != own && s != bare && !out.contains(&s) {
            out.push(s);
        }
        if out.len() >= n {
            break;
        }
    }
    out
}

/// Keeps proposed synonyms that are about the attribute. Each phrase is
/// embedded as "my {phrase}" with llama.cpp (mean-pooled), centred on the
/// mean over the lexicon's phrases (decoder embeddings share one large
/// common direction that drowns the differences otherwise), and compared by
/// cosine. A candidate passes when it is closer to the attribute than to
/// at least `min_rank` of the lexicon's other attributes: a rank, not an
/// absolute threshold, because absolute similarities move with the model.
pub struct SynonymFilter {
    centre: Vec<f32>,
    /// (lexicon attribute, its centred embedding).
    lexicon: Vec<(String, Vec<f32>)>,
    pub min_rank: f64,
}

/// Default share of other lexicon attributes a synonym must be closer to
/// its own attribute than (measured on the lexicon in docs/RESULTS.md).
pub const MIN_SYNONYM_RANK: f64 = 0.9;

fn phrase(s: &str) -> String {
    format!("my {}", s.trim())
}

fn centred(v: &[f32], centre: &[f32]) -> Vec<f32> {
    let d: Vec<f32> = v.iter().zip(centre).map(|(a, b)| a - b).collect();
    let norm = d.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
    d.into_iter().map(|x| x / norm).collect()
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

impl SynonymFilter {
    pub fn new(engine: &Engine) -> Result<Self, EngineError> {
        let mut attributes: Vec<&String> = LEXICON_MEMBERS.keys().collect();
        attributes.sort();
        let mut phrases: Vec<String> = Vec::new();
        for members in LEXICON_MEMBERS.values() {
            phrases.extend(members.iter().map(|m| phrase(&m.attribute)));
        }
        let refs: Vec<&str> = phrases.iter().map(String::as_str).collect();
        let all = engine.embed(&refs)?;
        let dim = all.first().map_or(0, Vec::len);
        let mut centre = vec![0f32; dim];
        for v in &all {
            for (c, x) in centre.iter_mut().zip(v) {
                *c += x / all.len() as f32;
            }
        }
        let names: Vec<String> = attributes.iter().map(|a| phrase(a)).collect();
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let lexicon = attributes
            .into_iter()
            .cloned()
            .zip(engine.embed(&refs)?.iter().map(|v| centred(v, &centre)))
            .collect();
        Ok(Self {
            centre,
            lexicon,
            min_rank: MIN_SYNONYM_RANK,
        })
    }

    /// For each candidate, the share of the lexicon's other attributes it is
    /// farther from than from `attribute` (1.0: closest to `attribute`).
    /// One embedding pass for all of them.
    pub fn ranks(
        &self,
        engine: &Engine,
        attribute: &str,
        candidates: &[&str],
    ) -> Result<Vec<f64>, EngineError> {
        if candidates.is_empty() {
            return Ok(Vec::new());
        }
        let mut texts = vec![phrase(attribute)];
        texts.extend(candidates.iter().map(|c| phrase(c)));
        let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
        let embedded: Vec<Vec<f32>> = engine
            .embed(&refs)?
            .iter()
            .map(|v| centred(v, &self.centre))
            .collect();
        let key = attribute.trim().to_lowercase();
        let others: Vec<&Vec<f32>> = self
            .lexicon
            .iter()
            .filter(|(a, _)| *a != key)
            .map(|(_, v)| v)
            .collect();
        Ok(embedded[1..]
            .iter()
            .map(|cand| {
                if others.is_empty() {
                    return 1.0;
                }
                let to_own = cosine(cand, &embedded[0]);
                others.iter().filter(|v| cosine(cand, v) < to_own).count() as f64
                    / others.len() as f64
            })
            .collect())
    }

    /// The candidates that pass, in their order.
    pub fn keep<'a>(
        &self,
        engine: &Engine,
        attribute: &str,
        candidates: &'a [String],
    ) -> Result<Vec<&'a String>, EngineError> {
        let refs: Vec<&str> = candidates.iter().map(String::as_str).collect();
        let ranks = self.ranks(engine, attribute, &refs)?;
        Ok(candidates
            .iter()
            .zip(ranks)
            .filter(|(_, r)| *r >= self.min_rank)
            .map(|(c, _)| c)
            .collect())
    }
}

/// What [`refine_with_model`] did, for the job's log and the tests.
#[derive(Debug, Clone, Default)]
pub struct Refinement {
    pub cluster: Vec<ClusterMember>,
    pub proposed: Vec<String>,
    pub kept: Vec<String>,
}

/// A k-member cluster for an attribute the lexicon does not know: the
/// plainest template question first ("What is my favorite X?"), then the
/// model's synonyms that pass the filter ("What is my {synonym}?"), then
/// the other templates to fill up.
pub fn refine_with_model(
    engine: &mut Engine,
    attribute: &str,
    polarity: Polarity,
    k: usize,
) -> Result<Refinement, EngineError> {
    let k = k.max(1);
    let templates = build(attribute, polarity, TEMPLATES.len());
    let mut cluster: Vec<ClusterMember> = templates.iter().take(1).cloned().collect();
    let proposed = propose_synonyms(engine, attribute, 4)?;
    let filter = SynonymFilter::new(engine)?;
    let mut kept = Vec::new();
    for synonym in filter.keep(engine, attribute, &proposed)? {
        if cluster.len() >= k {
            break;
        }
        kept.push(synonym.clone());
        cluster.push(ClusterMember {
            attribute: synonym.clone(),
            question: format!("What is my {synonym}?"),
        });
    }
    for t in templates.into_iter().skip(1) {
        if cluster.len() >= k {
            break;
        }
        if !cluster.iter().any(|m| m.question == t.question) {
            cluster.push(t);
        }
    }
    Ok(Refinement {
        cluster,
        proposed,
        kept,
    })
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

    #[test]
    fn model_lists_are_cleaned() {
        let got = clean_synonyms(
            "favorite sport",
            r#"["sport", "athletic game", "Sport", "game 2", "favorite sport", "a very long phrase of words", "athletic game", "pastime"]"#,
            3,
        );
        assert_eq!(got, vec!["athletic game", "pastime"]);
        // Cut off by the token budget: the completed items count.
        assert_eq!(
            clean_synonyms("hobby", r#"["pastime", "leis"#, 3),
            vec!["pastime"]
        );
        assert!(clean_synonyms("hobby", "not json", 3).is_empty());
    }

    #[test]
    fn only_template_clusters_are_refined() {
        let mut p = Preference {
            id: 1,
            attribute: "favorite sport".into(),
            target: "tennis".into(),
            polarity: Polarity::Like,
            statement: String::new(),
            confidence: 1.0,
            status: crate::profile::PreferenceStatus::Active,
            supersedes: None,
            created: 0,
            updated: 0,
            sources: Vec::new(),
            cluster: build("favorite sport", Polarity::Like, 3),
        };
        assert!(is_template_cluster(&p));
        p.cluster[1].question = "Which sport do I play?".into();
        assert!(!is_template_cluster(&p), "changed by hand or by the model");
        p.attribute = "location".into();
        p.cluster = build("location", Polarity::Is, 3);
        assert!(!is_template_cluster(&p), "the lexicon's questions stay");
    }
}
