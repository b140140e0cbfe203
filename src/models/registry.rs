//! The user's models: `models.toml` in the data dir lists every model that
//! was pulled or added, and which one is current.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::gguf::{inspect_gguf, GgufError};

#[derive(Debug, Error)]
pub enum RegistryError {
    #[error("model registry {path} is damaged ({message}). Fix or delete it; `imprint model pull` and `imprint model add` rebuild it.")]
    Corrupt { path: PathBuf, message: String },
    #[error("cannot {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("no model named {name:?}. Known models: {known}. `imprint model pull` fetches the default one; `imprint model add PATH` registers a local GGUF.")]
    UnknownModel { name: String, known: String },
    #[error("a model named {0:?} is already registered; choose another --name")]
    NameTaken(String),
    #[error(transparent)]
    Gguf(#[from] GgufError),
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Registry {
    /// The model used when the config names none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current: Option<String>,
    #[serde(default, rename = "model")]
    pub models: Vec<RegisteredModel>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RegisteredModel {
    pub name: String,
    pub path: PathBuf,
    pub architecture: String,
    pub n_layer: u32,
    pub n_embd: u32,
    pub size: u64,
    /// sha256 of the whole file: the model's fingerprint, which edits are tied to.
    pub sha256: String,
}

impl Registry {
    pub fn load(path: &Path) -> Result<Self, RegistryError> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(source) => {
                return Err(RegistryError::Io {
                    action: "read",
                    path: path.to_path_buf(),
                    source,
                })
            }
        };
        toml::from_str(&text).map_err(|e| RegistryError::Corrupt {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
    }

    /// Writes atomically: a crash mid-write leaves the old registry intact.
    pub fn save(&self, path: &Path) -> Result<(), RegistryError> {
        let io = |action, source| RegistryError::Io {
            action,
            path: path.to_path_buf(),
            source,
        };
        let dir = path.parent().unwrap_or_else(|| Path::new("."));
        crate::paths::create_private_dir(dir).map_err(|e| io("create the folder of", e))?;
        let text = toml::to_string_pretty(self).map_err(|e| RegistryError::Corrupt {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(|e| io("write", e))?;
        tmp.write_all(text.as_bytes()).map_err(|e| io("write", e))?;
        tmp.persist(path).map_err(|e| io("replace", e.error))?;
        Ok(())
    }

    pub fn get(&self, name: &str) -> Option<&RegisteredModel> {
        self.models.iter().find(|m| m.name == name)
    }

    pub fn find(&self, name: &str) -> Result<&RegisteredModel, RegistryError> {
        self.get(name).ok_or_else(|| RegistryError::UnknownModel {
            name: name.to_string(),
            known: self.known_names(),
        })
    }

    fn known_names(&self) -> String {
        if self.models.is_empty() {
            "none yet".to_string()
        } else {
            self.models
                .iter()
                .map(|m| m.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        }
    }

    /// Adds or replaces the entry called `model.name`.
    pub fn upsert(&mut self, model: RegisteredModel) {
        self.models.retain(|m| m.name != model.name);
        self.models.push(model);
        self.models.sort_by(|a, b| a.name.cmp(&b.name));
    }

    pub fn set_current(&mut self, name: &str) -> Result<(), RegistryError> {
        self.find(name)?;
        self.current = Some(name.to_string());
        Ok(())
    }
}

/// Validates a local GGUF and describes it for the registry.
pub fn describe_file(path: &Path, name: &str) -> Result<RegisteredModel, RegistryError> {
    let summary = inspect_gguf(path)?;
    let sha256 = sha256_file(path).map_err(|source| RegistryError::Io {
        action: "read",
        path: path.to_path_buf(),
        source,
    })?;
    let path = std::fs::canonicalize(path).map_err(|source| RegistryError::Io {
        action: "resolve",
        path: path.to_path_buf(),
        source,
    })?;
    Ok(RegisteredModel {
        name: name.to_string(),
        path,
        architecture: summary.architecture,
        n_layer: summary.n_layer,
        n_embd: summary.n_embd,
        size: summary.file_size,
        sha256,
    })
}

pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    use sha2::Digest;
    let mut hasher = sha2::Sha256::new();
    let mut file = std::fs::File::open(path)?;
    std::io::copy(&mut file, &mut hasher)?;
    Ok(hex::encode(hasher.finalize()))
}
