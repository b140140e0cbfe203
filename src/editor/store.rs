//! Edits on disk: `<data>/edits/<id>.json` (request, metrics) plus
//! `<id>.factors` (the f32 factors, little-endian). The profile issue moves
//! this into the encrypted SQLite store; the interface stays the same.

use std::io::Write;
use std::path::{Path, PathBuf};

use super::{Edit, EditorError};

pub struct EditStore {
    dir: PathBuf,
}

impl EditStore {
    pub fn new(data_dir: &Path) -> Self {
        Self {
            dir: data_dir.join("edits"),
        }
    }

    fn io(&self, path: &Path) -> impl Fn(std::io::Error) -> EditorError {
        let path = path.to_path_buf();
        move |source| EditorError::Io {
            path: path.clone(),
            source,
        }
    }

    /// Every stored edit, oldest first (the order they are stacked in).
    pub fn list(&self) -> Result<Vec<Edit>, EditorError> {
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(self.io(&self.dir)(e)),
        };
        let mut edits = Vec::new();
        for entry in entries.filter_map(Result::ok) {
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "json") {
                edits.push(self.read(&path)?);
            }
        }
        edits.sort_by(|a, b| (a.created, &a.id).cmp(&(b.created, &b.id)));
        Ok(edits)
    }

    fn read(&self, json_path: &Path) -> Result<Edit, EditorError> {
        let text = std::fs::read_to_string(json_path).map_err(self.io(json_path))?;
        let mut edit: Edit = serde_json::from_str(&text).map_err(|e| {
            EditorError::Invalid(format!(
                "edit file {} is damaged ({e}); remove it or restore it from an export",
                json_path.display()
            ))
        })?;
        let factors_path = json_path.with_extension("factors");
        let bytes = std::fs::read(&factors_path).map_err(self.io(&factors_path))?;
        let floats: Vec<f32> = bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let mut offset = 0;
        for f in &mut edit.factors {
            let (na, nb) = (f.rank * f.n_in, f.n_out * f.rank);
            if floats.len() < offset + na + nb {
                return Err(EditorError::Invalid(format!(
                    "edit factors {} are truncated; remove the edit and compute it again",
                    factors_path.display()
                )));
            }
            f.a = floats[offset..offset + na].to_vec();
            f.b = floats[offset + na..offset + na + nb].to_vec();
            offset += na + nb;
        }
        Ok(edit)
    }

    /// Writes the factors first and the JSON last (each atomically): an edit
    /// is visible only once both are complete.
    pub fn save(&self, edit: &Edit) -> Result<(), EditorError> {
        crate::paths::create_private_dir(&self.dir).map_err(self.io(&self.dir))?;
        let mut bytes = Vec::new();
        for f in &edit.factors {
            for v in f.a.iter().chain(&f.b) {
                bytes.extend_from_slice(&v.to_le_bytes());
            }
        }
        let json =
            serde_json::to_vec_pretty(edit).map_err(|e| EditorError::Invalid(e.to_string()))?;
        for (ext, data) in [("factors", &bytes), ("json", &json)] {
            let path = self.dir.join(format!("{}.{ext}", edit.id));
            let mut tmp = tempfile::NamedTempFile::new_in(&self.dir).map_err(self.io(&path))?;
            tmp.write_all(data).map_err(self.io(&path))?;
            tmp.as_file().sync_all().map_err(self.io(&path))?;
            tmp.persist(&path).map_err(|e| self.io(&path)(e.error))?;
        }
        Ok(())
    }

    pub fn remove(&self, id: &str) -> Result<Edit, EditorError> {
        let json = self.dir.join(format!("{id}.json"));
        if !json.exists() || id.contains('/') || id.contains("..") {
            return Err(EditorError::UnknownEdit(id.to_string()));
        }
        let edit = self.read(&json)?;
        std::fs::remove_file(&json).map_err(self.io(&json))?;
        let factors = json.with_extension("factors");
        let _ = std::fs::remove_file(factors);
        Ok(edit)
    }

    /// Active edits computed for the model with this fingerprint.
    pub fn active_for(&self, model_sha256: &str) -> Result<Vec<Edit>, EditorError> {
        Ok(self
            .list()?
            .into_iter()
            .filter(|e| e.active && e.model_sha256 == model_sha256)
            .collect())
    }
}

/// Where the assembled adapter for a model lives.
pub fn adapter_path(cache_dir: &Path, model_sha256: &str) -> PathBuf {
    cache_dir
        .join("adapters")
        .join(format!("{model_sha256}.gguf"))
}

/// Rebuilds the adapter of the active edits for a model and returns its
/// path, or None when there are no active edits (base weights).
pub fn rebuild_adapter(
    store: &EditStore,
    cache_dir: &Path,
    model_sha256: &str,
    architecture: &str,
) -> Result<Option<PathBuf>, EditorError> {
    let active = store.active_for(model_sha256)?;
    let refs: Vec<&Edit> = active.iter().collect();
    let path = adapter_path(cache_dir, model_sha256);
    if super::adapter::write_adapter(&refs, architecture, model_sha256, &path)? {
        Ok(Some(path))
    } else {
        let _ = std::fs::remove_file(&path);
        Ok(None)
    }
}
