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
    fn malformed_files_name_the_position() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.json");
        std::fs::write(&path, "[\n {\"input_attribute\": 3}\n]").unwrap();
        let err = load_items(&path).unwrap_err().to_string();
        assert!(err.contains("bad.json") && err.contains("line 2"), "{err}");
    }
}
