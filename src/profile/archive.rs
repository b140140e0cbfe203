//! Export and import: the whole profile as one portable file.
//!
//! The archive is a zip with three kinds of entries:
//! - `manifest.json`: format name and version, when and by what it was
//!   made, the models the edits belong to, counts, and the sha256 of every
//!   other entry;
//! - `profile.json`: conversations, preferences with provenance and
//!   clusters, and the edits' metadata, as indented JSON a person can read;
//! - `factors/<edit id>.f32`: each edit's factors, the exact bytes the
//!   database holds.
//!
//! Unless the user asks for `--plain`, the zip is encrypted with a
//! passphrase in the age format (scrypt), so the file can also be opened
//! with the `age`/`rage` tools. Import checks everything (format, version,
//! checksums, references, factor sizes) before it writes anything.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{Cursor, Read, Write};

use rusqlite::params;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use thiserror::Error;
use zeroize::Zeroizing;

use super::edits::{factors_from_bytes, insert_edit, ModelRecord, TensorShape};
use super::records::{audit_in, Conversation, Message, Preference, SourceRef};
use super::{now, Profile, ProfileError};
use crate::editor::{Edit, EditMetrics, EditRequest, Method};

pub const FORMAT: &str = "imprint-profile-export";
pub const VERSION: u32 = 1;
const AGE_MAGIC: &[u8] = b"age-encryption.org/v1";
const ZIP_MAGIC: &[u8] = b"PK\x03\x04";

#[derive(Debug, Error)]
pub enum ArchiveError {
    #[error(
        "this is not an imprint export (it is neither an age-encrypted file nor a zip archive)"
    )]
    NotAnExport,
    #[error(
        "the export is encrypted: give its passphrase (IMPRINT_EXPORT_PASSPHRASE or the prompt)"
    )]
    NeedsPassphrase,
    #[error("cannot decrypt the export: {0}")]
    Decrypt(String),
    #[error("the export is damaged: {0}")]
    Corrupt(String),
    #[error("the export has format version {found}, and this imprint reads version {VERSION} only; upgrade imprint to import it")]
    UnknownVersion { found: u32 },
    #[error("cannot write the export: {0}")]
    Write(String),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub version: u32,
    pub created: i64,
    pub imprint_version: String,
    pub models: Vec<ModelRecord>,
    pub counts: Counts,
    /// sha256 (hex) of every other entry, by name.
    pub entries: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Counts {
    pub conversations: usize,
    pub messages: usize,
    pub preferences: usize,
    pub edits: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ConversationView {
    #[serde(flatten)]
    pub conversation: Conversation,
    pub messages: Vec<Message>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EditView {
    pub id: String,
    pub preference_id: i64,
    pub model_sha256: String,
    pub method: Method,
    pub layer: usize,
    pub tensors: Vec<TensorShape>,
    pub request: EditRequest,
    pub metrics: EditMetrics,
    pub active: bool,
    pub rejection: Option<String>,
    pub created: u64,
    /// The entry holding the factors.
    pub factors: String,
}

/// `profile.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProfileView {
    pub conversations: Vec<ConversationView>,
    pub preferences: Vec<Preference>,
    pub edits: Vec<EditView>,
}

/// A fully checked archive, ready to be written.
#[derive(Debug)]
pub struct Archive {
    pub manifest: Manifest,
    pub view: ProfileView,
    /// Edit id → factors.
    pub factors: HashMap<String, Vec<u8>>,
}

impl Archive {
    /// Reads what a profile holds.
    pub fn collect(profile: &Profile) -> Result<Self, ProfileError> {
        let mut conversations = Vec::new();
        for c in profile.conversations()? {
            let messages = profile.messages(c.id)?;
            conversations.push(ConversationView {
                conversation: c,
                messages,
            });
        }
        conversations.sort_by_key(|c| c.conversation.id);
        let preferences = profile.preferences(None)?;
        let mut edits = Vec::new();
        let mut factors = HashMap::new();
        for stored in profile.edits()? {
            let e = stored.edit;
            let name = format!("factors/{}.f32", e.id);
            factors.insert(e.id.clone(), super::edits::factor_bytes(&e.factors));
            edits.push(EditView {
                id: e.id,
                preference_id: stored.preference_id,
                model_sha256: e.model_sha256,
                method: e.method,
                layer: e.layer,
                tensors: super::edits::shapes(&e.factors),
                request: e.request,
                metrics: e.metrics,
                active: e.active,
                rejection: e.rejection,
                created: e.created,
                factors: name,
            });
        }
        let counts = Counts {
            conversations: conversations.len(),
            messages: conversations.iter().map(|c| c.messages.len()).sum(),
            preferences: preferences.len(),
            edits: edits.len(),
        };
        Ok(Self {
            manifest: Manifest {
                format: FORMAT.into(),
                version: VERSION,
                created: now(),
                imprint_version: env!("CARGO_PKG_VERSION").into(),
                models: profile.models()?,
                counts,
                entries: BTreeMap::new(),
            },
            view: ProfileView {
                conversations,
                preferences,
                edits,
            },
            factors,
        })
    }

    /// The archive as bytes: a zip, age-encrypted when a passphrase is given.
    pub fn to_bytes(&self, passphrase: Option<&str>) -> Result<Vec<u8>, ArchiveError> {
        let write = |e: &dyn std::fmt::Display| ArchiveError::Write(e.to_string());
        let profile_json = serde_json::to_vec_pretty(&self.view).map_err(|e| write(&e))?;
        let mut entries: Vec<(String, &[u8])> = vec![("profile.json".into(), &profile_json)];
        for e in &self.view.edits {
            let bytes = self
                .factors
                .get(&e.id)
                .ok_or_else(|| ArchiveError::Write(format!("factors of edit {} missing", e.id)))?;
            entries.push((e.factors.clone(), bytes));
        }
        let mut manifest = self.manifest.clone();
        manifest.entries = entries
            .iter()
            .map(|(name, bytes)| (name.clone(), hex::encode(Sha256::digest(bytes))))
            .collect();
        let manifest_json = serde_json::to_vec_pretty(&manifest).map_err(|e| write(&e))?;

        let mut zip = zip::ZipWriter::new(Cursor::new(Vec::new()));
        let options = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Deflated)
            .unix_permissions(0o600);
        zip.start_file("manifest.json", options)
            .map_err(|e| write(&e))?;
        zip.write_all(&manifest_json).map_err(|e| write(&e))?;
        for (name, bytes) in &entries {
            zip.start_file(name.as_str(), options)
                .map_err(|e| write(&e))?;
            zip.write_all(bytes).map_err(|e| write(&e))?;
        }
        let plain = Zeroizing::new(zip.finish().map_err(|e| write(&e))?.into_inner());
        match passphrase {
            None => Ok(plain.to_vec()),
            Some(p) => {
                let recipient =
                    age::scrypt::Recipient::new(age::secrecy::SecretString::from(p.to_owned()));
                age::encrypt(&recipient, &plain).map_err(|e| write(&e))
            }
        }
    }

    /// Whether these bytes are an encrypted export.
    pub fn is_encrypted(bytes: &[u8]) -> bool {
        bytes.starts_with(AGE_MAGIC)
    }

    /// Parses and checks an archive. Nothing is written.
    pub fn from_bytes(bytes: &[u8], passphrase: Option<&str>) -> Result<Self, ArchiveError> {
        let corrupt = |what: String| ArchiveError::Corrupt(what);
        let plain: Zeroizing<Vec<u8>> = if bytes.starts_with(AGE_MAGIC) {
            let p = passphrase.ok_or(ArchiveError::NeedsPassphrase)?;
            let identity =
                age::scrypt::Identity::new(age::secrecy::SecretString::from(p.to_owned()));
            Zeroizing::new(age::decrypt(&identity, bytes).map_err(|e| match e {
                age::DecryptError::DecryptionFailed | age::DecryptError::NoMatchingKeys => {
                    ArchiveError::Decrypt("the passphrase is wrong".into())
                }
                other => ArchiveError::Decrypt(other.to_string()),
            })?)
        } else if bytes.starts_with(ZIP_MAGIC) {
            Zeroizing::new(bytes.to_vec())
        } else {
            return Err(ArchiveError::NotAnExport);
        };
        let mut zip = zip::ZipArchive::new(Cursor::new(plain.as_slice()))
            .map_err(|e| corrupt(format!("not a readable zip archive ({e})")))?;
        let mut read = |name: &str| -> Result<Vec<u8>, ArchiveError> {
            let mut f = zip
                .by_name(name)
                .map_err(|_| corrupt(format!("the entry {name} is missing")))?;
            // Entries are bounded by the archive itself; a lying size
            // header cannot make this allocate more than it reads.
            let mut out = Vec::new();
            f.read_to_end(&mut out)
                .map_err(|e| corrupt(format!("the entry {name} cannot be read ({e})")))?;
            Ok(out)
        };
        let manifest_bytes = read("manifest.json")?;
        // Check the format and version before trusting any other field.
        let head: serde_json::Value = serde_json::from_slice(&manifest_bytes)
            .map_err(|e| corrupt(format!("manifest.json is not JSON ({e})")))?;
        if head.get("format").and_then(|f| f.as_str()) != Some(FORMAT) {
            return Err(ArchiveError::NotAnExport);
        }
        let version = head.get("version").and_then(|v| v.as_u64()).unwrap_or(0) as u32;
        if version != VERSION {
            return Err(ArchiveError::UnknownVersion { found: version });
        }
        let manifest: Manifest =
            serde_json::from_value(head).map_err(|e| corrupt(format!("manifest.json: {e}")))?;
        let mut contents = HashMap::new();
        for (name, sha) in &manifest.entries {
            let bytes = read(name)?;
            if hex::encode(Sha256::digest(&bytes)) != *sha {
                return Err(corrupt(format!("{name} does not match its checksum")));
            }
            contents.insert(name.clone(), bytes);
        }
        let profile_json = contents
            .remove("profile.json")
            .ok_or_else(|| corrupt("the manifest does not list profile.json".into()))?;
        let view: ProfileView = serde_json::from_slice(&profile_json).map_err(|e| {
            corrupt(format!(
                "profile.json, line {} column {}: {e}",
                e.line(),
                e.column()
            ))
        })?;
        let mut factors = HashMap::new();
        for e in &view.edits {
            let bytes = contents
                .remove(&e.factors)
                .ok_or_else(|| corrupt(format!("the factors of edit {} are missing", e.id)))?;
            factors_from_bytes(&e.tensors, &bytes)
                .map_err(|why| corrupt(format!("edit {}: {why}", e.id)))?;
            factors.insert(e.id.clone(), bytes);
        }
        let archive = Self {
            manifest,
            view,
            factors,
        };
        archive.check_references()?;
        Ok(archive)
    }

    /// Every id an entry points at exists in the archive.
    fn check_references(&self) -> Result<(), ArchiveError> {
        let corrupt = |what: String| ArchiveError::Corrupt(what);
        let mut conversations = HashSet::new();
        let mut messages = HashSet::new();
        for c in &self.view.conversations {
            if !conversations.insert(c.conversation.id) {
                return Err(corrupt(format!(
                    "conversation {} appears twice",
                    c.conversation.id
                )));
            }
            for m in &c.messages {
                if m.conversation_id != c.conversation.id || !messages.insert(m.id) {
                    return Err(corrupt(format!(
                        "message {} is misplaced or repeated",
                        m.id
                    )));
                }
                if !matches!(m.role.as_str(), "system" | "user" | "assistant") {
                    return Err(corrupt(format!("message {} has role {:?}", m.id, m.role)));
                }
            }
        }
        let prefs: HashSet<i64> = self.view.preferences.iter().map(|p| p.id).collect();
        if prefs.len() != self.view.preferences.len() {
            return Err(corrupt("a preference id appears twice".into()));
        }
        for p in &self.view.preferences {
            if !(0.0..=1.0).contains(&p.confidence) {
                return Err(corrupt(format!(
                    "preference {} has confidence {}",
                    p.id, p.confidence
                )));
            }
            if let Some(s) = p.supersedes {
                if !prefs.contains(&s) {
                    return Err(corrupt(format!(
                        "preference {} supersedes {s}, which is not in the export",
                        p.id
                    )));
                }
            }
            for s in &p.sources {
                if let SourceRef::Message { message_id } = s.reference {
                    if !messages.contains(&message_id) {
                        return Err(corrupt(format!(
                            "preference {} comes from message {message_id}, which is not in the export",
                            p.id
                        )));
                    }
                }
            }
        }
        let mut edit_ids = HashSet::new();
        for e in &self.view.edits {
            if !prefs.contains(&e.preference_id) {
                return Err(corrupt(format!(
                    "edit {} belongs to preference {}, which is not in the export",
                    e.id, e.preference_id
                )));
            }
            if !edit_ids.insert(e.id.as_str()) {
                return Err(corrupt(format!("edit {} appears twice", e.id)));
            }
        }
        let counts = Counts {
            conversations: self.view.conversations.len(),
            messages: messages.len(),
            preferences: prefs.len(),
            edits: self.view.edits.len(),
        };
        if counts != self.manifest.counts {
            return Err(corrupt(format!(
                "the manifest counts {:?} but the export holds {:?}",
                self.manifest.counts, counts
            )));
        }
        Ok(())
    }

    fn edit(&self, view: &EditView) -> Result<Edit, ProfileError> {
        let bytes = self
            .factors
            .get(&view.id)
            .ok_or_else(|| ProfileError::Invalid(format!("factors of edit {} missing", view.id)))?;
        Ok(Edit {
            id: view.id.clone(),
            request: view.request.clone(),
            method: view.method,
            model_sha256: view.model_sha256.clone(),
            layer: view.layer,
            factors: factors_from_bytes(&view.tensors, bytes).map_err(ProfileError::Invalid)?,
            metrics: view.metrics.clone(),
            active: view.active,
            rejection: view.rejection.clone(),
            created: view.created,
        })
    }

    /// Models the archive's edits were computed for.
    pub fn edit_models(&self) -> Vec<String> {
        let mut models: Vec<String> = self
            .view
            .edits
            .iter()
            .map(|e| e.model_sha256.clone())
            .collect();
        models.sort();
        models.dedup();
        models
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImportMode {
    /// Everything in the profile is replaced by the archive (ids kept).
    Replace,
    /// The archive is added; a preference already present (same attribute,
    /// target and status) gains the archive's sources instead of a copy.
    Merge,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct ImportReport {
    pub conversations: usize,
    pub messages: usize,
    pub preferences_added: usize,
    pub preferences_merged: usize,
    pub edits: usize,
    /// Fingerprints of the models the imported edits belong to.
    pub edit_models: Vec<String>,
}

impl Profile {
    /// Writes a checked archive into the profile in one transaction.
    pub fn import(
        &mut self,
        archive: &Archive,
        mode: ImportMode,
    ) -> Result<ImportReport, ProfileError> {
        let mut report = ImportReport {
            edit_models: archive.edit_models(),
            ..Default::default()
        };
        let edits: Vec<(i64, Edit)> = archive
            .view
            .edits
            .iter()
            .map(|v| Ok((v.preference_id, archive.edit(v)?)))
            .collect::<Result<_, ProfileError>>()?;
        let tx = self
            .conn_mut()
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        for m in &archive.manifest.models {
            super::edits::upsert_model(&tx, m, false)?;
        }
        if mode == ImportMode::Replace {
            tx.execute_batch(
                "DELETE FROM edits; DELETE FROM preferences; DELETE FROM messages;
                 DELETE FROM conversations; DELETE FROM jobs;",
            )?;
        }
        let keep_ids = mode == ImportMode::Replace;
        let mut conversation_ids = HashMap::new();
        let mut message_ids = HashMap::new();
        for c in &archive.view.conversations {
            let conv = &c.conversation;
            if keep_ids {
                tx.execute(
                    "INSERT INTO conversations (id, title, created, updated, learning) VALUES (?1, ?2, ?3, ?4, ?5)",
                    params![conv.id, conv.title, conv.created, conv.updated, conv.learning],
                )?;
            } else {
                tx.execute(
                    "INSERT INTO conversations (title, created, updated, learning) VALUES (?1, ?2, ?3, ?4)",
                    params![conv.title, conv.created, conv.updated, conv.learning],
                )?;
            }
            conversation_ids.insert(conv.id, tx.last_insert_rowid());
            report.conversations += 1;
            for m in &c.messages {
                let cid = conversation_ids[&conv.id];
                if keep_ids {
                    tx.execute(
                        "INSERT INTO messages (id, conversation_id, role, content, created) VALUES (?1, ?2, ?3, ?4, ?5)",
                        params![m.id, cid, m.role, m.content, m.created],
                    )?;
                } else {
                    tx.execute(
                        "INSERT INTO messages (conversation_id, role, content, created) VALUES (?1, ?2, ?3, ?4)",
                        params![cid, m.role, m.content, m.created],
                    )?;
                }
                message_ids.insert(m.id, tx.last_insert_rowid());
                report.messages += 1;
            }
        }
        let mut preference_ids = HashMap::new();
        for p in &archive.view.preferences {
            if !keep_ids {
                let existing: Option<i64> = rusqlite::OptionalExtension::optional(tx.query_row(
                    "SELECT id FROM preferences WHERE attribute = ?1 AND target = ?2 AND status = ?3",
                    params![p.attribute, p.target, p.status.as_str()],
                    |r| r.get(0),
                ))?;
                if let Some(id) = existing {
                    preference_ids.insert(p.id, id);
                    insert_sources(&tx, id, p, &message_ids, false)?;
                    report.preferences_merged += 1;
                    continue;
                }
            }
            let id_param = if keep_ids { Some(p.id) } else { None };
            tx.execute(
                "INSERT INTO preferences (id, attribute, target, polarity, statement, confidence, status, supersedes, created, updated)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, NULL, ?8, ?9)",
                params![id_param, p.attribute, p.target, p.polarity.as_str(), p.statement, p.confidence, p.status.as_str(), p.created, p.updated],
            )?;
            let id = tx.last_insert_rowid();
            preference_ids.insert(p.id, id);
            insert_sources(&tx, id, p, &message_ids, keep_ids)?;
            for (i, m) in p.cluster.iter().enumerate() {
                tx.execute(
                    "INSERT INTO cluster_members (preference_id, position, attribute, question) VALUES (?1, ?2, ?3, ?4)",
                    params![id, i as i64, m.attribute, m.question],
                )?;
            }
            report.preferences_added += 1;
        }
        // Supersedes links once every preference has its final id.
        for p in &archive.view.preferences {
            if let (Some(old), Some(new)) = (p.supersedes, preference_ids.get(&p.id)) {
                tx.execute(
                    "UPDATE preferences SET supersedes = ?2 WHERE id = ?1",
                    params![new, preference_ids.get(&old)],
                )?;
            }
        }
        for (pid, edit) in &edits {
            let exists: i64 = tx.query_row(
                "SELECT count(*) FROM edits WHERE id = ?1",
                [&edit.id],
                |r| r.get(0),
            )?;
            if exists > 0 {
                continue;
            }
            insert_edit(&tx, preference_ids[pid], edit)?;
            report.edits += 1;
        }
        audit_in(
            &tx,
            "imported",
            "profile",
            &format!(
                "{} ({}): {} preference(s) added, {} merged, {} edit(s), {} conversation(s)",
                match mode {
                    ImportMode::Replace => "replace",
                    ImportMode::Merge => "merge",
                },
                archive.manifest.created,
                report.preferences_added,
                report.preferences_merged,
                report.edits,
                report.conversations
            ),
        )?;
        tx.commit()?;
        Ok(report)
    }
}

fn insert_sources(
    tx: &rusqlite::Connection,
    preference_id: i64,
    p: &Preference,
    message_ids: &HashMap<i64, i64>,
    keep_ids: bool,
) -> Result<(), ProfileError> {
    for s in &p.sources {
        // Message ids are renumbered on merge: point at the new ones.
        let reference = match &s.reference {
            SourceRef::Message { message_id } => SourceRef::Message {
                message_id: message_ids.get(message_id).copied().unwrap_or(*message_id),
            },
            other => other.clone(),
        };
        super::records::insert_source(
            tx,
            preference_id,
            &reference,
            s.created,
            keep_ids.then_some(s.id),
        )?;
    }
    Ok(())
}
