//! Reading UPQA files (read in place from the benchmark folder: their
//! licence forbids copying them into the repository).

use std::path::{Path, PathBuf};

use serde::Deserialize;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum DataError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{path}: line {line}, column {column}: {message}. Expected a JSON list of UPQA items."
    )]
    Parse {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("{path}: item {index} has an empty {field} list")]
    EmptyCluster {
        path: PathBuf,
        index: usize,
        field: &'static str,
    },
    #[error("{clusters} has {n_clusters} items but {data} has {n_data}; they must describe the same items in the same order")]
    Mismatch {
        data: PathBuf,
        clusters: PathBuf,
        n_data: usize,
        n_clusters: usize,
    },
}

/// One UPQA item.
#[derive(Debug, Clone, Deserialize)]
pub struct UpqaItem {
    pub input_attribute: String,
    pub attribute_type: String,
    pub question: String,
    pub question_paraphrased: String,
    pub implicit_question: String,
    pub product_recommendation_question: String,
    pub target: String,
}

/// The same item with 9 synonym attribute types and questions; the
/// original is the last element of each list.
#[derive(Debug, Clone, Deserialize)]
pub struct ClusterItem {
    pub attribute_type: Vec<String>,
    pub question: Vec<String>,
    pub target: Vec<String>,
}

impl ClusterItem {
    /// The last `k` questions (k ≥ 1), as the paper slices clusters.
    pub fn questions(&self, k: usize) -> Vec<String> {
        let k = k.clamp(1, self.question.len());
        self.question[self.question.len() - k..].to_vec()
    }
}

/// How the cluster's synonym questions reach the editor. UPQA words them
/// to the listener ("What's your favorite pastime?") while its explicit,
/// paraphrased and implicit questions ask about the speaker ("What's my
/// hobby?"); imprint's own clusters (learn/cluster.rs) are first person,
/// as a user asks about themself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum ClusterPerson {
    /// Turned to the first person ("What's my favorite pastime?"), as
    /// imprint's own clusters are.
    First,
    /// Word for word, as the paper used them.
    Verbatim,
}

/// Words after which "you" is the subject of what follows.
const SUBJECT_AFTER: &[&str] = &[
    "do", "did", "does", "have", "has", "had", "can", "could", "will", "would", "should", "shall",
    "may", "might", "must", "when", "where", "what", "why", "how", "which", "who", "that", "if",
    "and", "or", "but", "because", "while", "as",
];

/// Words after which "you" is an object.
const OBJECT_AFTER: &[&str] = &[
    "to", "for", "with", "about", "at", "from", "of", "by", "like", "than", "around", "near",
    "without", "behind", "toward", "towards", "into", "onto", "upon", "between", "among",
];

/// A question to the listener turned into the same question about the
/// speaker: "What do you feel is your calling?" → "What do I feel is my
/// calling?". Word-level rules; text without "you" forms is returned as is.
pub fn first_person(question: &str) -> String {
    // Words and the characters between them, so punctuation and spacing
    // survive the round trip.
    let mut parts: Vec<String> = Vec::new();
    let mut word = String::new();
    for ch in question.chars() {
        if ch.is_alphanumeric() || ch == '\'' || ch == '\u{2019}' {
            word.push(ch);
        } else {
            if !word.is_empty() {
                parts.push(std::mem::take(&mut word));
            }
            parts.push(ch.to_string());
        }
    }
    if !word.is_empty() {
        parts.push(word);
    }
    let is_word = |p: &str| p.chars().next().is_some_and(char::is_alphanumeric);
    let lower = |p: &str| p.to_lowercase().replace('\u{2019}', "'");
    let capitalised = |p: &str| p.chars().next().is_some_and(char::is_uppercase);
    let mut out = parts.clone();
    for i in 0..parts.len() {
        let before = (0..i).rev().find(|&j| is_word(&parts[j]));
        let after = (i + 1..parts.len()).find(|&j| is_word(&parts[j]));
        let replacement = match lower(&parts[i]).as_str() {
            "your" => "my",
            "yours" => "mine",
            "yourself" | "yourselves" => "myself",
            "you're" => "I'm",
            "you've" => "I've",
            "you'd" => "I'd",
            "you'll" => "I'll",
            "you" => {
                let b = before.map(|j| lower(&parts[j]));
                let a = after.map(|j| lower(&parts[j]));
                match (b.as_deref(), a.as_deref()) {
                    // "are you" / "were you" → "am I" / "was I".
                    (Some(verb @ ("are" | "were")), _) => {
                        let j = before.unwrap_or(i);
                        let new = if verb == "are" { "am" } else { "was" };
                        out[j] = if capitalised(&parts[j]) {
                            format!("{}{}", new[..1].to_uppercase(), &new[1..])
                        } else {
                            new.to_string()
                        };
                        "I"
                    }
                    // "you are" / "you were" → "I am" / "I was".
                    (_, Some(verb @ ("are" | "were"))) => {
                        let j = after.unwrap_or(i);
                        out[j] = if verb == "are" { "am" } else { "was" }.to_string();
                        "I"
                    }
                    // "when you re…" (an apostrophe lost in the data).
                    (_, Some("re")) => {
                        out[after.unwrap_or(i)] = "'m".to_string();
                        // Drop the separator between "you" and "re".
                        for sep in out.iter_mut().take(after.unwrap_or(i)).skip(i + 1) {
                            sep.clear();
                        }
                        "I"
                    }
                    (Some(b), _) if SUBJECT_AFTER.contains(&b) => "I",
                    (Some(b), _) if OBJECT_AFTER.contains(&b) => "me",
                    // "… suit you?": an object closing the sentence.
                    (Some(_), None) => "me",
                    // Opening the sentence, or "something you enjoy".
                    _ => "I",
                }
            }
            _ => continue,
        };
        out[i] = if capitalised(&parts[i]) && replacement != "I" && !replacement.starts_with("I'") {
            format!("{}{}", replacement[..1].to_uppercase(), &replacement[1..])
        } else {
            replacement.to_string()
        };
    }
    out.concat()
}

pub(crate) fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T, DataError> {
    let text = std::fs::read_to_string(path).map_err(|source| DataError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|e| DataError::Parse {
        path: path.to_path_buf(),
        line: e.line(),
        column: e.column(),
        message: e.to_string(),
    })
}

pub fn load_items(path: &Path) -> Result<Vec<UpqaItem>, DataError> {
    read_json(path)
}

pub fn load_clusters(
    path: &Path,
    data_path: &Path,
    n_data: usize,
) -> Result<Vec<ClusterItem>, DataError> {
    let clusters: Vec<ClusterItem> = read_json(path)?;
    for (index, c) in clusters.iter().enumerate() {
        for (field, empty) in [
            ("question", c.question.is_empty()),
            ("target", c.target.is_empty()),
        ] {
            if empty {
                return Err(DataError::EmptyCluster {
                    path: path.to_path_buf(),
                    index,
                    field,
                });
            }
        }
    }
    if clusters.len() != n_data {
        return Err(DataError::Mismatch {
            data: data_path.to_path_buf(),
            clusters: path.to_path_buf(),
            n_data,
            n_clusters: clusters.len(),
        });
    }
    Ok(clusters)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clusters_are_sliced_from_the_end() {
        let c = ClusterItem {
            attribute_type: vec!["a".into(), "b".into(), "c".into()],
            question: vec!["q1".into(), "q2".into(), "q3".into()],
            target: vec!["t1".into(), "t2".into(), "t3".into()],
        };
        assert_eq!(c.questions(1), vec!["q3"]);
        assert_eq!(c.questions(2), vec!["q2", "q3"]);
        assert_eq!(c.questions(9), vec!["q1", "q2", "q3"]);
        assert_eq!(c.questions(0), vec!["q3"]);
    }

    #[test]
    fn listener_questions_become_questions_about_the_speaker() {
        let cases = [
            (
                "What's your favorite pastime?",
                "What's my favorite pastime?",
            ),
            ("What kind of work do you do?", "What kind of work do I do?"),
            (
                "What do you feel is your calling in life?",
                "What do I feel is my calling in life?",
            ),
            (
                "What geographical area are you from?",
                "What geographical area am I from?",
            ),
            ("Are you a morning person?", "Am I a morning person?"),
            ("Where were you born?", "Where was I born?"),
            ("You are from where?", "I am from where?"),
            (
                "Your favorite snack, what is it?",
                "My favorite snack, what is it?",
            ),
            (
                "What do you do when you’re stressed?",
                "What do I do when I'm stressed?",
            ),
            (
                "What do you do when you re stressed?",
                "What do I do when I'm stressed?",
            ),
            ("Is this car yours?", "Is this car mine?"),
            ("What would suit you?", "What would suit me?"),
            ("Which team is good for you?", "Which team is good for me?"),
            ("What's something you enjoy?", "What's something I enjoy?"),
            (
                "Where do you and your family live?",
                "Where do I and my family live?",
            ),
            ("What's my hobby?", "What's my hobby?"),
            ("Tell me about yourself.", "Tell me about myself."),
        ];
        for (question, expected) in cases {
            assert_eq!(first_person(question), expected, "{question}");
        }
    }

    #[test]
    fn malformed_files_name_the_position() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.json");
        std::fs::write(&path, "[\n {\"input_attribute\": 3}\n]").unwrap();
        let err = load_items(&path).unwrap_err().to_string();
        assert!(err.contains("bad.json") && err.contains("line 2"), "{err}");
    }
}
