//! Stored edits and the adapter assembled from them.
//!
//! The factors are one BLOB per edit: for each tensor in order, A
//! `[rank × n_in]` then B `[n_out × rank]`, little-endian f32. The same
//! bytes go into exports, so an exported and re-imported profile assembles
//! a bit-identical adapter.

use std::path::{Path, PathBuf};

use rusqlite::{params, OptionalExtension, Row};

use super::{now, Profile, ProfileError};
use crate::editor::{Edit, EditMetrics, EditRequest, LoraFactors, Method};

/// The model an edit was computed for, as the profile records it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ModelRecord {
    pub sha256: String,
    pub path: String,
    pub architecture: String,
    pub n_layer: usize,
    pub n_embd: usize,
    pub n_ff: usize,
}

/// Factor shapes without the numbers (the `tensors` column).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TensorShape {
    pub tensor: String,
    pub rank: usize,
    pub n_in: usize,
    pub n_out: usize,
}

pub fn factor_bytes(factors: &[LoraFactors]) -> Vec<u8> {
    let mut bytes = Vec::new();
    for f in factors {
        for v in f.a.iter().chain(&f.b) {
            bytes.extend_from_slice(&v.to_le_bytes());
        }
    }
    bytes
}

/// Splits a factor blob back into tensors; errors when its size does not
/// match the shapes exactly.
pub fn factors_from_bytes(
    shapes: &[TensorShape],
    bytes: &[u8],
) -> Result<Vec<LoraFactors>, String> {
    let expected: usize = shapes.iter().map(|s| 4 * s.rank * (s.n_in + s.n_out)).sum();
    if bytes.len() != expected {
        return Err(format!(
            "the factors hold {} bytes where the shapes need {expected}",
            bytes.len()
        ));
    }
    let floats: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    let mut offset = 0;
    let mut out = Vec::with_capacity(shapes.len());
    for s in shapes {
        let (na, nb) = (s.rank * s.n_in, s.n_out * s.rank);
        out.push(LoraFactors {
            tensor: s.tensor.clone(),
            rank: s.rank,
            n_in: s.n_in,
            n_out: s.n_out,
            a: floats[offset..offset + na].to_vec(),
            b: floats[offset + na..offset + na + nb].to_vec(),
        });
        offset += na + nb;
    }
    Ok(out)
}

pub fn shapes(factors: &[LoraFactors]) -> Vec<TensorShape> {
    factors
        .iter()
        .map(|f| TensorShape {
            tensor: f.tensor.clone(),
            rank: f.rank,
            n_in: f.n_in,
            n_out: f.n_out,
        })
        .collect()
}

const EDIT_COLUMNS: &str =
    "id, preference_id, model_sha256, method, layer, tensors, factors, metrics, request, active, rejection, created";

/// An edit with the preference it belongs to.
#[derive(Debug, Clone)]
pub struct StoredEdit {
    pub preference_id: i64,
    pub edit: Edit,
}

fn json_err(i: usize, e: serde_json::Error) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(i, rusqlite::types::Type::Text, Box::new(e))
}

fn edit_row(r: &Row) -> rusqlite::Result<StoredEdit> {
    let method: String = r.get(3)?;
    let tensors: String = r.get(5)?;
    let blob: Vec<u8> = r.get(6)?;
    let metrics: String = r.get(7)?;
    let request: String = r.get(8)?;
    let shapes: Vec<TensorShape> = serde_json::from_str(&tensors).map_err(|e| json_err(5, e))?;
    let factors = factors_from_bytes(&shapes, &blob).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(6, rusqlite::types::Type::Blob, e.into())
    })?;
    Ok(StoredEdit {
        preference_id: r.get(1)?,
        edit: Edit {
            id: r.get(0)?,
            request: serde_json::from_str::<EditRequest>(&request).map_err(|e| json_err(8, e))?,
            method: method.parse::<Method>().map_err(|e| {
                rusqlite::Error::FromSqlConversionFailure(3, rusqlite::types::Type::Text, e.into())
            })?,
            model_sha256: r.get(2)?,
            layer: r.get::<_, i64>(4)? as usize,
            factors,
            metrics: serde_json::from_str::<EditMetrics>(&metrics).map_err(|e| json_err(7, e))?,
            active: r.get::<_, i64>(9)? != 0,
            rejection: r.get(10)?,
            created: r.get::<_, i64>(11)? as u64,
        },
    })
}

pub(crate) fn insert_edit(
    conn: &rusqlite::Connection,
    preference_id: i64,
    edit: &Edit,
) -> Result<(), ProfileError> {
    let method = match edit.method {
        Method::Ftm => "ftm",
        Method::Rome => "rome",
    };
    let json = |v: serde_json::Result<String>| v.map_err(|e| ProfileError::Invalid(e.to_string()));
    conn.execute(
        &format!(
            "INSERT INTO edits ({EDIT_COLUMNS}, rank) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)"
        ),
        params![
            edit.id,
            preference_id,
            edit.model_sha256,
            method,
            edit.layer as i64,
            json(serde_json::to_string(&shapes(&edit.factors)))?,
            factor_bytes(&edit.factors),
            json(serde_json::to_string(&edit.metrics))?,
            json(serde_json::to_string(&edit.request))?,
            edit.active as i64,
            edit.rejection,
            edit.created as i64,
            edit.factors.iter().map(|f| f.rank).max().unwrap_or(0) as i64,
        ],
    )?;
    Ok(())
}

impl Profile {
    /// Records (or refreshes) what the profile knows about a model.
    pub fn remember_model(&self, m: &ModelRecord) -> Result<(), ProfileError> {
        upsert_model(self.conn(), m, true)
    }

    pub fn models(&self) -> Result<Vec<ModelRecord>, ProfileError> {
        let mut stmt = self.conn().prepare(
            "SELECT sha256, path, architecture, n_layer, n_embd, n_ff FROM models ORDER BY first_seen",
        )?;
        let rows = stmt
            .query_map([], |r| {
                Ok(ModelRecord {
                    sha256: r.get(0)?,
                    path: r.get(1)?,
                    architecture: r.get(2)?,
                    n_layer: r.get::<_, i64>(3)? as usize,
                    n_embd: r.get::<_, i64>(4)? as usize,
                    n_ff: r.get::<_, i64>(5)? as usize,
                })
            })?
            .collect::<Result<_, _>>()?;
        Ok(rows)
    }

    /// Stores a computed edit for a preference. Finishing the job that
    /// computed it happens in the same transaction, so a crash never leaves
    /// a stored edit with its job still pending, or the reverse.
    pub fn save_edit(
        &mut self,
        preference_id: i64,
        edit: &Edit,
        finished_job: Option<i64>,
    ) -> Result<(), ProfileError> {
        let tx = self
            .conn_mut()
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        if edit.active {
            // One active edit per preference and model: a recomputed edit
            // replaces the old one.
            tx.execute(
                "UPDATE edits SET active = 0 WHERE preference_id = ?1 AND model_sha256 = ?2",
                params![preference_id, edit.model_sha256],
            )?;
        }
        insert_edit(&tx, preference_id, edit).map_err(|e| match e {
            ProfileError::Sql(s) if s.contains("FOREIGN KEY") => {
                ProfileError::UnknownPreference(preference_id)
            }
            other => other,
        })?;
        if let Some(job) = finished_job {
            tx.execute(
                "UPDATE jobs SET state = 'done', progress = 1, error = NULL, updated = ?2 WHERE id = ?1",
                params![job, now()],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Every edit, oldest first (the order they are stacked in).
    pub fn edits(&self) -> Result<Vec<StoredEdit>, ProfileError> {
        let mut stmt = self.conn().prepare(&format!(
            "SELECT {EDIT_COLUMNS} FROM edits ORDER BY created, id"
        ))?;
        let rows = stmt.query_map([], edit_row)?.collect::<Result<_, _>>()?;
        Ok(rows)
    }

    pub fn edits_for_preference(
        &self,
        preference_id: i64,
    ) -> Result<Vec<StoredEdit>, ProfileError> {
        let mut stmt = self.conn().prepare(&format!(
            "SELECT {EDIT_COLUMNS} FROM edits WHERE preference_id = ?1 ORDER BY created, id"
        ))?;
        let rows = stmt
            .query_map([preference_id], edit_row)?
            .collect::<Result<_, _>>()?;
        Ok(rows)
    }

    /// The edits that make up a model's personalization: active edits of
    /// active preferences, oldest first.
    pub fn active_edits(&self, model_sha256: &str) -> Result<Vec<Edit>, ProfileError> {
        let mut stmt = self.conn().prepare(&format!(
            "SELECT {} FROM edits e JOIN preferences p ON p.id = e.preference_id
             WHERE e.model_sha256 = ?1 AND e.active = 1 AND p.status = 'active'
             ORDER BY e.created, e.id",
            EDIT_COLUMNS
                .split(", ")
                .map(|c| format!("e.{c}"))
                .collect::<Vec<_>>()
                .join(", ")
        ))?;
        let rows = stmt
            .query_map([model_sha256], edit_row)?
            .map(|r| r.map(|s| s.edit))
            .collect::<Result<_, _>>()?;
        Ok(rows)
    }

    /// Removes one edit; its preference stays. Returns it.
    pub fn remove_edit(&mut self, id: &str) -> Result<StoredEdit, ProfileError> {
        let tx = self
            .conn_mut()
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let edit = tx
            .query_row(
                &format!("SELECT {EDIT_COLUMNS} FROM edits WHERE id = ?1"),
                [id],
                edit_row,
            )
            .optional()?
            .ok_or_else(|| ProfileError::UnknownEdit(id.to_string()))?;
        tx.execute("DELETE FROM edits WHERE id = ?1", [id])?;
        super::records::audit_in(
            &tx,
            "forgotten",
            &format!("edit {id}"),
            &format!("of preference {}", edit.preference_id),
        )?;
        tx.commit()?;
        Ok(edit)
    }

    /// Writes the adapter of a model's active edits into the cache and
    /// returns its path, or None (and removes any old adapter) when there
    /// are none: the engine then runs the base weights.
    pub fn assemble_adapter(
        &self,
        cache_dir: &Path,
        model_sha256: &str,
        architecture: &str,
    ) -> Result<Option<PathBuf>, ProfileError> {
        let active = self.active_edits(model_sha256)?;
        let refs: Vec<&Edit> = active.iter().collect();
        let path = adapter_path(cache_dir, model_sha256);
        if crate::editor::adapter::write_adapter(&refs, architecture, model_sha256, &path)? {
            Ok(Some(path))
        } else {
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => return Err(ProfileError::Io { path, source }),
            }
            Ok(None)
        }
    }

    /// Moves edits kept by earlier versions as files (`<data>/edits/`)
    /// into the profile, each under a preference of its own, then removes
    /// the files. Returns how many moved.
    pub fn adopt_legacy_edits(&mut self, data_dir: &Path) -> Result<usize, ProfileError> {
        let dir = data_dir.join("edits");
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return Ok(0);
        };
        let mut moved = 0;
        let mut paths: Vec<PathBuf> = entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "json"))
            .collect();
        paths.sort();
        for json_path in paths {
            let io = |source| ProfileError::Io {
                path: json_path.clone(),
                source,
            };
            let text = std::fs::read_to_string(&json_path).map_err(io)?;
            let mut edit: Edit = serde_json::from_str(&text).map_err(|e| {
                ProfileError::Invalid(format!(
                    "old edit file {} is damaged ({e}); move it away and try again",
                    json_path.display()
                ))
            })?;
            let factors_path = json_path.with_extension("factors");
            let bytes = std::fs::read(&factors_path).map_err(|source| ProfileError::Io {
                path: factors_path.clone(),
                source,
            })?;
            edit.factors = factors_from_bytes(&shapes(&edit.factors), &bytes)
                .map_err(|e| ProfileError::Invalid(format!("{}: {e}", factors_path.display())))?;
            let pref = super::NewPreference {
                attribute: edit.request.attribute.clone(),
                target: edit.request.target.clone(),
                polarity: super::Polarity::Is,
                statement: format!("imprint edit (moved from {})", json_path.display()),
                confidence: 1.0,
                status: super::PreferenceStatus::Active,
                source: super::SourceRef::Manual {
                    note: "taught with imprint edit before the profile store existed".into(),
                },
                cluster: edit
                    .request
                    .questions
                    .iter()
                    .map(|q| super::ClusterMember {
                        attribute: edit.request.attribute.clone(),
                        question: q.clone(),
                    })
                    .collect(),
            };
            let tx = self
                .conn_mut()
                .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let id = super::records::insert_preference(&tx, &pref, None, edit.created as i64)?;
            insert_edit(&tx, id, &edit)?;
            tx.commit()?;
            std::fs::remove_file(&json_path).map_err(io)?;
            let _ = std::fs::remove_file(&factors_path);
            moved += 1;
        }
        let _ = std::fs::remove_dir(&dir);
        Ok(moved)
    }
}

/// Inserts a model record; an existing one keeps its row, and gets the new
/// path when `refresh_path`.
pub(crate) fn upsert_model(
    conn: &rusqlite::Connection,
    m: &ModelRecord,
    refresh_path: bool,
) -> Result<(), ProfileError> {
    let on_conflict = if refresh_path {
        "DO UPDATE SET path = excluded.path"
    } else {
        "DO NOTHING"
    };
    conn.execute(
        &format!(
            "INSERT INTO models (sha256, path, architecture, n_layer, n_embd, n_ff, first_seen)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) ON CONFLICT(sha256) {on_conflict}"
        ),
        params![
            m.sha256,
            m.path,
            m.architecture,
            m.n_layer as i64,
            m.n_embd as i64,
            m.n_ff as i64,
            now()
        ],
    )?;
    Ok(())
}

/// Where the assembled adapter for a model lives.
pub fn adapter_path(cache_dir: &Path, model_sha256: &str) -> PathBuf {
    cache_dir
        .join("adapters")
        .join(format!("{model_sha256}.gguf"))
}
