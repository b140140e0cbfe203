//! The profile's tables, as numbered migrations.
//!
//! `PRAGMA user_version` records how many have run. Each migration runs in
//! its own transaction, so a profile is always at one exact version. A
//! profile written by a newer imprint (a higher version than
//! [`MIGRATIONS`] knows) is refused rather than guessed at.

use rusqlite::Connection;

use super::ProfileError;

/// Migration n (1-based) brings the schema from version n-1 to n.
pub const MIGRATIONS: &[&str] = &[
    // 1: the first schema.
    r#"
CREATE TABLE models (
    sha256       TEXT PRIMARY KEY,
    path         TEXT NOT NULL,
    architecture TEXT NOT NULL,
    n_layer      INTEGER NOT NULL,
    n_embd       INTEGER NOT NULL,
    n_ff         INTEGER NOT NULL,
    first_seen   INTEGER NOT NULL
);

CREATE TABLE conversations (
    id       INTEGER PRIMARY KEY,
    title    TEXT NOT NULL,
    created  INTEGER NOT NULL,
    updated  INTEGER NOT NULL
);

CREATE TABLE messages (
    id              INTEGER PRIMARY KEY,
    conversation_id INTEGER NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    role            TEXT NOT NULL CHECK (role IN ('system', 'user', 'assistant')),
    content         TEXT NOT NULL,
    created         INTEGER NOT NULL
);
CREATE INDEX messages_by_conversation ON messages(conversation_id, id);

CREATE TABLE preferences (
    id          INTEGER PRIMARY KEY,
    attribute   TEXT NOT NULL,
    target      TEXT NOT NULL,
    polarity    TEXT NOT NULL CHECK (polarity IN ('like', 'dislike', 'is')),
    statement   TEXT NOT NULL,
    confidence  REAL NOT NULL CHECK (confidence >= 0 AND confidence <= 1),
    status      TEXT NOT NULL CHECK (status IN ('pending', 'active', 'rejected', 'superseded')),
    supersedes  INTEGER REFERENCES preferences(id) ON DELETE SET NULL,
    created     INTEGER NOT NULL,
    updated     INTEGER NOT NULL
);
CREATE INDEX preferences_by_status ON preferences(status);

-- Where a preference came from: a message in a conversation, a chat-history
-- import, or the user teaching it directly.
CREATE TABLE preference_sources (
    id                   INTEGER PRIMARY KEY,
    preference_id        INTEGER NOT NULL REFERENCES preferences(id) ON DELETE CASCADE,
    kind                 TEXT NOT NULL CHECK (kind IN ('message', 'import', 'manual')),
    message_id           INTEGER REFERENCES messages(id) ON DELETE CASCADE,
    import_file          TEXT,
    import_conversation  TEXT,
    import_message_index INTEGER,
    note                 TEXT NOT NULL DEFAULT '',
    created              INTEGER NOT NULL,
    CHECK (kind != 'message' OR message_id IS NOT NULL),
    CHECK (kind != 'import' OR import_file IS NOT NULL)
);
CREATE INDEX sources_by_preference ON preference_sources(preference_id);
CREATE INDEX sources_by_message ON preference_sources(message_id);

-- The preference's synonym cluster: the editor's training questions.
CREATE TABLE cluster_members (
    preference_id INTEGER NOT NULL REFERENCES preferences(id) ON DELETE CASCADE,
    position      INTEGER NOT NULL,
    attribute     TEXT NOT NULL,
    question      TEXT NOT NULL,
    PRIMARY KEY (preference_id, position)
);

CREATE TABLE edits (
    id             TEXT PRIMARY KEY,
    preference_id  INTEGER NOT NULL REFERENCES preferences(id) ON DELETE CASCADE,
    model_sha256   TEXT NOT NULL,
    method         TEXT NOT NULL,
    layer          INTEGER NOT NULL,
    rank           INTEGER NOT NULL,
    -- JSON: [{tensor, rank, n_in, n_out}], in the order of the factor blob.
    tensors        TEXT NOT NULL,
    -- Per tensor: A [rank × n_in] then B [n_out × rank], little-endian f32.
    factors        BLOB NOT NULL,
    -- JSON EditMetrics from the verification gate.
    metrics        TEXT NOT NULL,
    -- JSON EditRequest the edit was trained on.
    request        TEXT NOT NULL,
    active         INTEGER NOT NULL CHECK (active IN (0, 1)),
    rejection      TEXT,
    created        INTEGER NOT NULL
);
CREATE INDEX edits_by_model ON edits(model_sha256, active);

CREATE TABLE jobs (
    id       INTEGER PRIMARY KEY,
    kind     TEXT NOT NULL,
    payload  TEXT NOT NULL,
    state    TEXT NOT NULL CHECK (state IN ('queued', 'running', 'done', 'failed')),
    progress REAL NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    error    TEXT,
    created  INTEGER NOT NULL,
    updated  INTEGER NOT NULL
);
CREATE INDEX jobs_by_state ON jobs(state, id);

CREATE TABLE audit_log (
    id      INTEGER PRIMARY KEY,
    at      INTEGER NOT NULL,
    action  TEXT NOT NULL CHECK (action IN ('created', 'approved', 'rejected', 'forgotten',
                                            'exported', 'imported', 'deleted', 'edited',
                                            'superseded')),
    subject TEXT NOT NULL,
    detail  TEXT NOT NULL DEFAULT ''
);
"#,
    // 2: what chat-history imports have already seen, so importing the
    // same file (or an overlapping export) again adds nothing.
    r#"
CREATE TABLE import_seen (
    content_sha256 TEXT PRIMARY KEY,
    file           TEXT NOT NULL,
    at             INTEGER NOT NULL
);
"#,
    // 3: learning can be switched off for one conversation (the daemon's
    // per-session toggle); its messages are kept but nothing is captured.
    r#"
ALTER TABLE conversations ADD COLUMN learning INTEGER NOT NULL DEFAULT 1;
"#,
];

/// The schema version this build writes.
pub fn current_version() -> i64 {
    MIGRATIONS.len() as i64
}

/// Brings the database up to [`current_version`]. Returns the version it
/// was at before.
pub fn migrate(conn: &mut Connection) -> Result<i64, ProfileError> {
    let found: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    if found > current_version() {
        return Err(ProfileError::NewerSchema {
            found,
            supported: current_version(),
        });
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(found as usize) {
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", (i + 1) as i64)?;
        tx.commit()?;
    }
    Ok(found)
}
