//! Preferences with their provenance and clusters, conversations, the job
//! queue and the audit log.

use rusqlite::{params, OptionalExtension, Row};
use serde::{Deserialize, Serialize};

use super::{now, Profile, ProfileError};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Polarity {
    Like,
    Dislike,
    Is,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PreferenceStatus {
    /// Waiting for the user's review.
    Pending,
    /// In use: its edit is (or will be) in the weights.
    Active,
    Rejected,
    /// Replaced by a newer preference (the `supersedes` link points back).
    Superseded,
}

macro_rules! text_enum {
    ($t:ty { $($v:ident => $s:literal),* $(,)? }) => {
        impl $t {
            pub fn as_str(self) -> &'static str {
                match self { $(Self::$v => $s),* }
            }
        }
        impl std::str::FromStr for $t {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                match s.to_ascii_lowercase().as_str() {
                    $($s => Ok(Self::$v),)*
                    other => Err(format!("unknown value {other:?}; expected one of: {}", [$($s),*].join(", "))),
                }
            }
        }
        impl std::fmt::Display for $t {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

text_enum!(Polarity { Like => "like", Dislike => "dislike", Is => "is" });
text_enum!(PreferenceStatus { Pending => "pending", Active => "active", Rejected => "rejected", Superseded => "superseded" });
text_enum!(JobState { Queued => "queued", Running => "running", Done => "done", Failed => "failed" });

fn parse_text<T: std::str::FromStr<Err = String>>(row: &Row, i: usize) -> rusqlite::Result<T> {
    let s: String = row.get(i)?;
    s.parse().map_err(|e: String| {
        rusqlite::Error::FromSqlConversionFailure(i, rusqlite::types::Type::Text, e.into())
    })
}

/// Where a preference came from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum SourceRef {
    /// A user message in one of the profile's conversations.
    Message { message_id: i64 },
    /// A message in an imported chat history.
    Import {
        file: String,
        conversation: String,
        message_index: i64,
    },
    /// Taught directly (`imprint edit`, the preferences pane).
    Manual { note: String },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Source {
    pub id: i64,
    #[serde(flatten)]
    pub reference: SourceRef,
    pub created: i64,
}

/// One member of a preference's synonym cluster: an attribute synonym and
/// a question that contains it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterMember {
    pub attribute: String,
    pub question: String,
}

/// A preference to store.
#[derive(Debug, Clone)]
pub struct NewPreference {
    pub attribute: String,
    pub target: String,
    pub polarity: Polarity,
    /// The words it was learned from.
    pub statement: String,
    pub confidence: f64,
    pub status: PreferenceStatus,
    pub source: SourceRef,
    pub cluster: Vec<ClusterMember>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Preference {
    pub id: i64,
    pub attribute: String,
    pub target: String,
    pub polarity: Polarity,
    pub statement: String,
    pub confidence: f64,
    pub status: PreferenceStatus,
    pub supersedes: Option<i64>,
    pub created: i64,
    pub updated: i64,
    pub sources: Vec<Source>,
    pub cluster: Vec<ClusterMember>,
}

impl Preference {
    /// The editor's request: the cluster's questions, or the attribute
    /// asked about plainly when the cluster is empty.
    pub fn edit_request(&self) -> crate::editor::EditRequest {
        let mut questions: Vec<String> = self.cluster.iter().map(|m| m.question.clone()).collect();
        if questions.is_empty() {
            questions.push(format!("What is my {}?", self.attribute));
        }
        crate::editor::EditRequest {
            attribute: self.attribute.clone(),
            target: self.target.clone(),
            questions,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Conversation {
    pub id: i64,
    pub title: String,
    pub created: i64,
    pub updated: i64,
    /// Whether preferences are captured from this conversation (exports
    /// written before the flag existed mean yes).
    #[serde(default = "learning_default")]
    pub learning: bool,
}

fn learning_default() -> bool {
    true
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    pub id: i64,
    pub conversation_id: i64,
    pub role: String,
    pub content: String,
    pub created: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    Queued,
    Running,
    Done,
    Failed,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Job {
    pub id: i64,
    pub kind: String,
    pub payload: serde_json::Value,
    pub state: JobState,
    pub progress: f64,
    pub attempts: i64,
    pub error: Option<String>,
    pub created: i64,
    pub updated: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditEntry {
    pub id: i64,
    pub at: i64,
    pub action: String,
    pub subject: String,
    pub detail: String,
}

/// What deleting a conversation took with it.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ConversationRemoval {
    pub messages: usize,
    /// Preferences whose only sources were in the conversation: removed,
    /// with their edits.
    pub preferences_removed: Vec<i64>,
    /// Preferences that lost a source there but keep others.
    pub preferences_kept: Vec<i64>,
}

fn conversation_row(r: &Row) -> rusqlite::Result<Conversation> {
    Ok(Conversation {
        id: r.get(0)?,
        title: r.get(1)?,
        created: r.get(2)?,
        updated: r.get(3)?,
        learning: r.get(4)?,
    })
}

const PREFERENCE_COLUMNS: &str =
    "id, attribute, target, polarity, statement, confidence, status, supersedes, created, updated";

fn preference_row(row: &Row) -> rusqlite::Result<Preference> {
    Ok(Preference {
        id: row.get(0)?,
        attribute: row.get(1)?,
        target: row.get(2)?,
        polarity: parse_text(row, 3)?,
        statement: row.get(4)?,
        confidence: row.get(5)?,
        status: parse_text(row, 6)?,
        supersedes: row.get(7)?,
        created: row.get(8)?,
        updated: row.get(9)?,
        sources: Vec::new(),
        cluster: Vec::new(),
    })
}

/// Stores one source of a preference; `id` keeps an exported source's id
/// (import with --replace), None assigns a new one.
pub(crate) fn insert_source(
    tx: &rusqlite::Connection,
    preference_id: i64,
    source: &SourceRef,
    at: i64,
    id: Option<i64>,
) -> Result<(), ProfileError> {
    match source {
        SourceRef::Message { message_id } => tx.execute(
            "INSERT INTO preference_sources (id, preference_id, kind, message_id, created) VALUES (?4, ?1, 'message', ?2, ?3)",
            params![preference_id, message_id, at, id],
        )?,
        SourceRef::Import {
            file,
            conversation,
            message_index,
        } => tx.execute(
            "INSERT INTO preference_sources (id, preference_id, kind, import_file, import_conversation, import_message_index, created) VALUES (?6, ?1, 'import', ?2, ?3, ?4, ?5)",
            params![preference_id, file, conversation, message_index, at, id],
        )?,
        SourceRef::Manual { note } => tx.execute(
            "INSERT INTO preference_sources (id, preference_id, kind, note, created) VALUES (?4, ?1, 'manual', ?2, ?3)",
            params![preference_id, note, at, id],
        )?,
    };
    Ok(())
}

pub(crate) fn audit_in(
    conn: &rusqlite::Connection,
    action: &str,
    subject: &str,
    detail: &str,
) -> Result<(), ProfileError> {
    conn.execute(
        "INSERT INTO audit_log (at, action, subject, detail) VALUES (?1, ?2, ?3, ?4)",
        params![now(), action, subject, detail],
    )?;
    Ok(())
}

pub(crate) fn insert_preference(
    conn: &rusqlite::Connection,
    p: &NewPreference,
    supersedes: Option<i64>,
    at: i64,
) -> Result<i64, ProfileError> {
    if !(0.0..=1.0).contains(&p.confidence) {
        return Err(ProfileError::Invalid(format!(
            "confidence {} is outside 0..1",
            p.confidence
        )));
    }
    if p.attribute.trim().is_empty() || p.target.trim().is_empty() {
        return Err(ProfileError::Invalid(
            "a preference needs an attribute and a target".into(),
        ));
    }
    conn.execute(
        "INSERT INTO preferences (attribute, target, polarity, statement, confidence, status, supersedes, created, updated)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?8)",
        params![
            p.attribute,
            p.target,
            p.polarity.as_str(),
            p.statement,
            p.confidence,
            p.status.as_str(),
            supersedes,
            at
        ],
    )?;
    let id = conn.last_insert_rowid();
    insert_source(conn, id, &p.source, at, None)?;
    insert_cluster(conn, id, &p.cluster)?;
    Ok(id)
}

fn insert_cluster(
    conn: &rusqlite::Connection,
    preference_id: i64,
    cluster: &[ClusterMember],
) -> Result<(), ProfileError> {
    for (i, m) in cluster.iter().enumerate() {
        conn.execute(
            "INSERT INTO cluster_members (preference_id, position, attribute, question) VALUES (?1, ?2, ?3, ?4)",
            params![preference_id, i as i64, m.attribute, m.question],
        )?;
    }
    Ok(())
}

impl Profile {
    /// Appends to the audit log.
    pub fn audit(&self, action: &str, subject: &str, detail: &str) -> Result<(), ProfileError> {
        audit_in(self.conn(), action, subject, detail)
    }

    pub fn audit_log(&self, limit: usize) -> Result<Vec<AuditEntry>, ProfileError> {
        let mut stmt = self.conn().prepare(
            "SELECT id, at, action, subject, detail FROM audit_log ORDER BY id DESC LIMIT ?1",
        )?;
        let mut rows: Vec<AuditEntry> = stmt
            .query_map([limit as i64], |r| {
                Ok(AuditEntry {
                    id: r.get(0)?,
                    at: r.get(1)?,
                    action: r.get(2)?,
                    subject: r.get(3)?,
                    detail: r.get(4)?,
                })
            })?
            .collect::<Result<_, _>>()?;
        rows.reverse();
        Ok(rows)
    }

    /// Stores a preference with its source and cluster, in one transaction.
    pub fn add_preference(&mut self, p: &NewPreference) -> Result<i64, ProfileError> {
        let tx = self
            .conn_mut()
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let id = insert_preference(&tx, p, None, now())?;
        audit_in(
            &tx,
            "created",
            &format!("preference {id}"),
            &format!("{} → {} ({})", p.attribute, p.target, p.status),
        )?;
        tx.commit()?;
        Ok(id)
    }

    /// Stores `new` as the successor of `old_id` (a changed value: "I moved
    /// to Porto"). The old preference becomes superseded and its edits
    /// inactive, in the same transaction.
    pub fn supersede(&mut self, old_id: i64, new: &NewPreference) -> Result<i64, ProfileError> {
        let tx = self
            .conn_mut()
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let at = now();
        let changed = tx.execute(
            "UPDATE preferences SET status = 'superseded', updated = ?2 WHERE id = ?1",
            params![old_id, at],
        )?;
        if changed == 0 {
            return Err(ProfileError::UnknownPreference(old_id));
        }
        tx.execute(
            "UPDATE edits SET active = 0 WHERE preference_id = ?1",
            [old_id],
        )?;
        let id = insert_preference(&tx, new, Some(old_id), at)?;
        audit_in(
            &tx,
            "superseded",
            &format!("preference {old_id}"),
            &format!("by preference {id}: {} → {}", new.attribute, new.target),
        )?;
        tx.commit()?;
        Ok(id)
    }

    /// Adds another source to an existing preference (the same thing said
    /// again).
    pub fn add_source(
        &mut self,
        preference_id: i64,
        source: &SourceRef,
    ) -> Result<(), ProfileError> {
        self.preference(preference_id)?;
        insert_source(self.conn(), preference_id, source, now(), None)
    }

    pub fn preference(&self, id: i64) -> Result<Preference, ProfileError> {
        let mut p = self
            .conn()
            .query_row(
                &format!("SELECT {PREFERENCE_COLUMNS} FROM preferences WHERE id = ?1"),
                [id],
                preference_row,
            )
            .optional()?
            .ok_or(ProfileError::UnknownPreference(id))?;
        self.fill(&mut p)?;
        Ok(p)
    }

    /// Preferences, oldest first; only those with `status` when given.
    pub fn preferences(
        &self,
        status: Option<PreferenceStatus>,
    ) -> Result<Vec<Preference>, ProfileError> {
        let mut stmt = self.conn().prepare(&format!(
            "SELECT {PREFERENCE_COLUMNS} FROM preferences WHERE ?1 IS NULL OR status = ?1 ORDER BY id"
        ))?;
        let mut prefs: Vec<Preference> = stmt
            .query_map([status.map(|s| s.as_str())], preference_row)?
            .collect::<Result<_, _>>()?;
        for p in &mut prefs {
            self.fill(p)?;
        }
        Ok(prefs)
    }

    fn fill(&self, p: &mut Preference) -> Result<(), ProfileError> {
        let mut stmt = self.conn().prepare(
            "SELECT id, kind, message_id, import_file, import_conversation, import_message_index, note, created
             FROM preference_sources WHERE preference_id = ?1 ORDER BY id",
        )?;
        p.sources = stmt
            .query_map([p.id], |r| {
                let kind: String = r.get(1)?;
                let reference = match kind.as_str() {
                    "message" => SourceRef::Message {
                        message_id: r.get(2)?,
                    },
                    "import" => SourceRef::Import {
                        file: r.get(3)?,
                        conversation: r.get::<_, Option<String>>(4)?.unwrap_or_default(),
                        message_index: r.get::<_, Option<i64>>(5)?.unwrap_or(0),
                    },
                    _ => SourceRef::Manual { note: r.get(6)? },
                };
                Ok(Source {
                    id: r.get(0)?,
                    reference,
                    created: r.get(7)?,
                })
            })?
            .collect::<Result<_, _>>()?;
        let mut stmt = self.conn().prepare(
            "SELECT attribute, question FROM cluster_members WHERE preference_id = ?1 ORDER BY position",
        )?;
        p.cluster = stmt
            .query_map([p.id], |r| {
                Ok(ClusterMember {
                    attribute: r.get(0)?,
                    question: r.get(1)?,
                })
            })?
            .collect::<Result<_, _>>()?;
        Ok(())
    }

    /// Approves or rejects a preference (the review queue). Rejecting one
    /// also deactivates its edits.
    pub fn set_status(&mut self, id: i64, status: PreferenceStatus) -> Result<(), ProfileError> {
        let tx = self
            .conn_mut()
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let changed = tx.execute(
            "UPDATE preferences SET status = ?2, updated = ?3 WHERE id = ?1",
            params![id, status.as_str(), now()],
        )?;
        if changed == 0 {
            return Err(ProfileError::UnknownPreference(id));
        }
        if status != PreferenceStatus::Active {
            tx.execute("UPDATE edits SET active = 0 WHERE preference_id = ?1", [id])?;
        }
        let action = match status {
            PreferenceStatus::Active => "approved",
            PreferenceStatus::Rejected => "rejected",
            PreferenceStatus::Superseded => "superseded",
            PreferenceStatus::Pending => "edited",
        };
        audit_in(&tx, action, &format!("preference {id}"), "")?;
        tx.commit()?;
        Ok(())
    }

    /// Changes what a preference says. Its edits no longer match it, so
    /// they are removed (the caller queues a new one).
    pub fn update_preference(
        &mut self,
        id: i64,
        attribute: &str,
        target: &str,
        cluster: &[ClusterMember],
    ) -> Result<(), ProfileError> {
        let tx = self
            .conn_mut()
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let changed = tx.execute(
            "UPDATE preferences SET attribute = ?2, target = ?3, updated = ?4 WHERE id = ?1",
            params![id, attribute, target, now()],
        )?;
        if changed == 0 {
            return Err(ProfileError::UnknownPreference(id));
        }
        tx.execute("DELETE FROM cluster_members WHERE preference_id = ?1", [id])?;
        insert_cluster(&tx, id, cluster)?;
        tx.execute("DELETE FROM edits WHERE preference_id = ?1", [id])?;
        audit_in(
            &tx,
            "edited",
            &format!("preference {id}"),
            &format!("now {attribute} → {target}"),
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Replaces a preference's synonym cluster (the editor's training
    /// questions), e.g. once the model has proposed synonyms for it. Its
    /// edits stay: the caller recomputes them.
    pub fn set_cluster(&mut self, id: i64, cluster: &[ClusterMember]) -> Result<(), ProfileError> {
        let tx = self
            .conn_mut()
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let changed = tx.execute(
            "UPDATE preferences SET updated = ?2 WHERE id = ?1",
            params![id, now()],
        )?;
        if changed == 0 {
            return Err(ProfileError::UnknownPreference(id));
        }
        tx.execute("DELETE FROM cluster_members WHERE preference_id = ?1", [id])?;
        insert_cluster(&tx, id, cluster)?;
        let questions: Vec<&str> = cluster.iter().map(|m| m.question.as_str()).collect();
        audit_in(
            &tx,
            "edited",
            &format!("preference {id}"),
            &format!("cluster: {}", questions.join(" | ")),
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Removes a preference with its sources, cluster and edits. Returns
    /// the model fingerprints whose adapters must be rebuilt.
    pub fn forget(&mut self, id: i64) -> Result<Vec<String>, ProfileError> {
        let tx = self
            .conn_mut()
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let models = models_with_active_edits(&tx, &[id])?;
        if tx.execute("DELETE FROM preferences WHERE id = ?1", [id])? == 0 {
            return Err(ProfileError::UnknownPreference(id));
        }
        // The log keeps that something was forgotten, not what: forgetting
        // must not leave the preference behind in another table.
        audit_in(&tx, "forgotten", &format!("preference {id}"), "")?;
        tx.commit()?;
        Ok(models)
    }

    // ---- conversations ----

    pub fn create_conversation(&self, title: &str) -> Result<i64, ProfileError> {
        let at = now();
        self.conn().execute(
            "INSERT INTO conversations (title, created, updated) VALUES (?1, ?2, ?2)",
            params![title, at],
        )?;
        Ok(self.conn().last_insert_rowid())
    }

    pub fn conversation(&self, id: i64) -> Result<Conversation, ProfileError> {
        self.conn()
            .query_row(
                "SELECT id, title, created, updated, learning FROM conversations WHERE id = ?1",
                [id],
                conversation_row,
            )
            .optional()?
            .ok_or(ProfileError::UnknownConversation(id))
    }

    /// Turns capture on or off for one conversation.
    pub fn set_conversation_learning(&self, id: i64, learning: bool) -> Result<(), ProfileError> {
        let n = self.conn().execute(
            "UPDATE conversations SET learning = ?2 WHERE id = ?1",
            params![id, learning],
        )?;
        if n == 0 {
            return Err(ProfileError::UnknownConversation(id));
        }
        Ok(())
    }

    pub fn rename_conversation(&self, id: i64, title: &str) -> Result<(), ProfileError> {
        let n = self.conn().execute(
            "UPDATE conversations SET title = ?2, updated = ?3 WHERE id = ?1",
            params![id, title, now()],
        )?;
        if n == 0 {
            return Err(ProfileError::UnknownConversation(id));
        }
        Ok(())
    }

    pub fn add_message(
        &self,
        conversation_id: i64,
        role: &str,
        content: &str,
    ) -> Result<i64, ProfileError> {
        let at = now();
        self.conn().execute(
            "INSERT INTO messages (conversation_id, role, content, created) VALUES (?1, ?2, ?3, ?4)",
            params![conversation_id, role, content, at],
        )
        .map_err(|e| match e.sqlite_error_code() {
            Some(rusqlite::ErrorCode::ConstraintViolation) => {
                ProfileError::UnknownConversation(conversation_id)
            }
            _ => e.into(),
        })?;
        let id = self.conn().last_insert_rowid();
        self.conn().execute(
            "UPDATE conversations SET updated = ?2 WHERE id = ?1",
            params![conversation_id, at],
        )?;
        Ok(id)
    }

    pub fn conversations(&self) -> Result<Vec<Conversation>, ProfileError> {
        let mut stmt = self.conn().prepare(
            "SELECT id, title, created, updated, learning FROM conversations ORDER BY updated DESC, id DESC",
        )?;
        let rows = stmt
            .query_map([], conversation_row)?
            .collect::<Result<_, _>>()?;
        Ok(rows)
    }

    pub fn messages(&self, conversation_id: i64) -> Result<Vec<Message>, ProfileError> {
        let mut stmt = self.conn().prepare(
            "SELECT id, conversation_id, role, content, created FROM messages WHERE conversation_id = ?1 ORDER BY id",
        )?;
        let rows = stmt
            .query_map([conversation_id], message_row)?
            .collect::<Result<_, _>>()?;
        Ok(rows)
    }

    pub fn message(&self, id: i64) -> Result<Option<Message>, ProfileError> {
        Ok(self
            .conn()
            .query_row(
                "SELECT id, conversation_id, role, content, created FROM messages WHERE id = ?1",
                [id],
                message_row,
            )
            .optional()?)
    }

    /// Deletes a conversation and its messages. Preferences whose only
    /// sources were its messages go with it (and their edits); others keep
    /// their remaining sources. One transaction.
    pub fn delete_conversation(
        &mut self,
        id: i64,
    ) -> Result<(ConversationRemoval, Vec<String>), ProfileError> {
        let tx = self
            .conn_mut()
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let exists: Option<i64> = tx
            .query_row("SELECT id FROM conversations WHERE id = ?1", [id], |r| {
                r.get(0)
            })
            .optional()?;
        if exists.is_none() {
            return Err(ProfileError::UnknownConversation(id));
        }
        let touched: Vec<i64> = tx
            .prepare(
                "SELECT DISTINCT s.preference_id FROM preference_sources s
                 JOIN messages m ON m.id = s.message_id WHERE m.conversation_id = ?1",
            )?
            .query_map([id], |r| r.get(0))?
            .collect::<Result<_, _>>()?;
        let messages = tx.execute("DELETE FROM messages WHERE conversation_id = ?1", [id])?;
        tx.execute("DELETE FROM conversations WHERE id = ?1", [id])?;
        // Sources pointing at the deleted messages went with them (ON
        // DELETE CASCADE); what is left decides each preference's fate.
        let mut removal = ConversationRemoval {
            messages,
            ..Default::default()
        };
        for pid in touched {
            let remaining: i64 = tx.query_row(
                "SELECT count(*) FROM preference_sources WHERE preference_id = ?1",
                [pid],
                |r| r.get(0),
            )?;
            if remaining == 0 {
                removal.preferences_removed.push(pid);
            } else {
                removal.preferences_kept.push(pid);
            }
        }
        let models = models_with_active_edits(&tx, &removal.preferences_removed)?;
        for pid in &removal.preferences_removed {
            tx.execute("DELETE FROM preferences WHERE id = ?1", [pid])?;
            audit_in(
                &tx,
                "forgotten",
                &format!("preference {pid}"),
                &format!("its only source, conversation {id}, was deleted"),
            )?;
        }
        audit_in(
            &tx,
            "deleted",
            &format!("conversation {id}"),
            &format!("{messages} message(s)"),
        )?;
        tx.commit()?;
        Ok((removal, models))
    }

    // ---- imports ----

    /// Records that an imported message with this content hash was
    /// processed. Returns false when it had been already (nothing to do).
    pub fn mark_imported(&self, content_sha256: &str, file: &str) -> Result<bool, ProfileError> {
        let n = self.conn().execute(
            "INSERT OR IGNORE INTO import_seen (content_sha256, file, at) VALUES (?1, ?2, ?3)",
            params![content_sha256, file, now()],
        )?;
        Ok(n == 1)
    }

    /// Whether an import already processed a message with this hash.
    pub fn was_imported(&self, content_sha256: &str) -> Result<bool, ProfileError> {
        let n: i64 = self.conn().query_row(
            "SELECT count(*) FROM import_seen WHERE content_sha256 = ?1",
            [content_sha256],
            |r| r.get(0),
        )?;
        Ok(n > 0)
    }

    // ---- jobs ----

    pub fn enqueue_job(
        &self,
        kind: &str,
        payload: &serde_json::Value,
    ) -> Result<i64, ProfileError> {
        let at = now();
        self.conn().execute(
            "INSERT INTO jobs (kind, payload, state, created, updated) VALUES (?1, ?2, 'queued', ?3, ?3)",
            params![kind, payload.to_string(), at],
        )?;
        Ok(self.conn().last_insert_rowid())
    }

    /// Takes the oldest queued job and marks it running.
    pub fn claim_job(&mut self) -> Result<Option<Job>, ProfileError> {
        let tx = self
            .conn_mut()
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let job = tx
            .query_row(
                &format!(
                    "SELECT {JOB_COLUMNS} FROM jobs WHERE state = 'queued' ORDER BY id LIMIT 1"
                ),
                [],
                job_row,
            )
            .optional()?;
        let Some(mut job) = job else {
            return Ok(None);
        };
        tx.execute(
            "UPDATE jobs SET state = 'running', attempts = attempts + 1, updated = ?2 WHERE id = ?1",
            params![job.id, now()],
        )?;
        tx.commit()?;
        job.state = JobState::Running;
        job.attempts += 1;
        Ok(Some(job))
    }

    /// Marks one queued job running (the CLI runs the job it just queued).
    pub fn claim_job_id(&self, id: i64) -> Result<Option<Job>, ProfileError> {
        let n = self.conn().execute(
            "UPDATE jobs SET state = 'running', attempts = attempts + 1, updated = ?2 WHERE id = ?1 AND state = 'queued'",
            params![id, now()],
        )?;
        if n == 0 {
            return Ok(None);
        }
        Ok(self
            .conn()
            .query_row(
                &format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = ?1"),
                [id],
                job_row,
            )
            .optional()?)
    }

    pub fn set_job_progress(&self, id: i64, progress: f64) -> Result<(), ProfileError> {
        self.conn().execute(
            "UPDATE jobs SET progress = ?2, updated = ?3 WHERE id = ?1",
            params![id, progress.clamp(0.0, 1.0), now()],
        )?;
        Ok(())
    }

    pub fn finish_job(&self, id: i64, error: Option<&str>) -> Result<(), ProfileError> {
        let state = if error.is_some() { "failed" } else { "done" };
        self.conn().execute(
            "UPDATE jobs SET state = ?2, error = ?3, progress = 1, updated = ?4 WHERE id = ?1",
            params![id, state, error, now()],
        )?;
        Ok(())
    }

    /// Jobs left running by a process that died go back to the queue.
    /// Returns how many.
    pub fn requeue_interrupted_jobs(&self) -> Result<usize, ProfileError> {
        Ok(self.conn().execute(
            "UPDATE jobs SET state = 'queued', updated = ?1 WHERE state = 'running'",
            [now()],
        )?)
    }

    pub fn jobs(&self, state: Option<JobState>) -> Result<Vec<Job>, ProfileError> {
        let mut stmt = self.conn().prepare(&format!(
            "SELECT {JOB_COLUMNS} FROM jobs WHERE ?1 IS NULL OR state = ?1 ORDER BY id"
        ))?;
        let rows = stmt
            .query_map([state.map(|s| s.as_str())], job_row)?
            .collect::<Result<_, _>>()?;
        Ok(rows)
    }
}

const JOB_COLUMNS: &str = "id, kind, payload, state, progress, attempts, error, created, updated";

fn job_row(r: &Row) -> rusqlite::Result<Job> {
    let payload: String = r.get(2)?;
    Ok(Job {
        id: r.get(0)?,
        kind: r.get(1)?,
        payload: serde_json::from_str(&payload).unwrap_or(serde_json::Value::Null),
        state: parse_text(r, 3)?,
        progress: r.get(4)?,
        attempts: r.get(5)?,
        error: r.get(6)?,
        created: r.get(7)?,
        updated: r.get(8)?,
    })
}

fn message_row(r: &Row) -> rusqlite::Result<Message> {
    Ok(Message {
        id: r.get(0)?,
        conversation_id: r.get(1)?,
        role: r.get(2)?,
        content: r.get(3)?,
        created: r.get(4)?,
    })
}

/// Model fingerprints with active edits belonging to these preferences.
fn models_with_active_edits(
    conn: &rusqlite::Connection,
    preference_ids: &[i64],
) -> Result<Vec<String>, ProfileError> {
    let mut models = Vec::new();
    let mut stmt = conn.prepare(
        "SELECT DISTINCT model_sha256 FROM edits WHERE preference_id = ?1 AND active = 1",
    )?;
    for id in preference_ids {
        for m in stmt.query_map([id], |r| r.get::<_, String>(0))? {
            let m = m?;
            if !models.contains(&m) {
                models.push(m);
            }
        }
    }
    Ok(models)
}
