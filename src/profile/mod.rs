//! The profile: everything imprint knows about its user, in one encrypted
//! SQLite database (`<data>/profile.db`).
//!
//! It holds conversations, the preferences learned from them with their
//! provenance and synonym clusters, the weight edits computed for each
//! preference, a persistent job queue and an audit log. The editor's edits
//! live here; the assembled LoRA adapter in the cache is rebuilt from them.
//!
//! - [`key`]: where the encryption key comes from (keyring, passphrase,
//!   or explicitly none).
//! - [`schema`]: the tables, as numbered migrations.
//! - [`records`]: preferences, conversations, jobs and the audit log.
//! - [`edits`]: stored edits and the assembled adapter.
//! - [`archive`]: export and import.
//! - [`delete`]: removing the whole profile, with a receipt.
//!
//! Durability: WAL journal with `synchronous = FULL`, and every learning
//! step that touches several tables runs in one transaction, so a process
//! killed at any point leaves either the old state or the new one.

pub mod archive;
pub mod delete;
pub mod edits;
pub mod key;
pub mod records;
pub mod schema;

use std::io::Write;
use std::path::{Path, PathBuf};

use rusqlite::{Connection, ErrorCode, OpenFlags};
use thiserror::Error;
use zeroize::Zeroizing;

use crate::paths::Paths;
pub use key::{EnvOrPrompt, KeyChoice, PassphraseSource, Protection, Remembered};
pub use records::{
    AuditEntry, ClusterMember, Conversation, Job, JobState, Message, NewPreference, Polarity,
    Preference, PreferenceStatus, Source, SourceRef,
};

#[derive(Debug, Error)]
pub enum ProfileError {
    #[error("cannot access {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the profile database failed: {0}")]
    Sql(String),
    #[error("the disk is full, so nothing was written: free some space and try again ({0})")]
    DiskFull(String),
    #[error("the profile cannot be written ({0}); check that the data folder and its files are writable by you")]
    ReadOnly(String),
    #[error("the profile database {path} is damaged ({reason}). Restore it from an export (`imprint profile import`) or start over with `imprint profile delete`")]
    Corrupt { path: PathBuf, reason: String },
    #[error("cannot unlock the profile: {0}")]
    WrongKey(String),
    #[error("keyring: {0}")]
    Keyring(String),
    #[error("passphrase: {0}")]
    Passphrase(String),
    #[error("the key file {path} is unusable: {reason}")]
    KeyFile { path: PathBuf, reason: String },
    #[error("the profile was written by a newer imprint (schema version {found}; this one knows up to {supported}). Upgrade imprint; the file was left untouched")]
    NewerSchema { found: i64, supported: i64 },
    #[error("no preference with id {0}; `imprint prefs list` shows the ids")]
    UnknownPreference(i64),
    #[error("no conversation with id {0}")]
    UnknownConversation(i64),
    #[error("no edit with id {0}; `imprint edit list` shows the ids")]
    UnknownEdit(String),
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Archive(#[from] archive::ArchiveError),
    #[error(transparent)]
    Editor(#[from] crate::editor::EditorError),
}

impl From<rusqlite::Error> for ProfileError {
    fn from(e: rusqlite::Error) -> Self {
        let text = e.to_string();
        match e.sqlite_error_code() {
            Some(ErrorCode::DiskFull) => ProfileError::DiskFull(text),
            Some(ErrorCode::ReadOnly) | Some(ErrorCode::CannotOpen) => ProfileError::ReadOnly(text),
            Some(ErrorCode::NotADatabase) | Some(ErrorCode::DatabaseCorrupt) => {
                ProfileError::Corrupt {
                    path: PathBuf::from("profile.db"),
                    reason: text,
                }
            }
            _ => ProfileError::Sql(text),
        }
    }
}

/// Seconds since the Unix epoch.
pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Writes `bytes` to `path` atomically with mode 0600.
pub fn write_private_file(path: &Path, bytes: &[u8]) -> Result<(), ProfileError> {
    let io = |source| ProfileError::Io {
        path: path.to_path_buf(),
        source,
    };
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    crate::paths::create_private_dir(dir).map_err(io)?;
    // NamedTempFile is created 0600 on Unix.
    let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(io)?;
    tmp.write_all(bytes).map_err(io)?;
    tmp.as_file().sync_all().map_err(io)?;
    tmp.persist(path).map_err(|e| io(e.error))?;
    Ok(())
}

/// The files a profile is made of.
#[derive(Debug, Clone)]
pub struct ProfileFiles {
    pub db: PathBuf,
    pub key_file: PathBuf,
    /// The assembled adapters (rebuildable from the database).
    pub adapters_dir: PathBuf,
}

impl ProfileFiles {
    pub fn new(paths: &Paths) -> Self {
        Self {
            db: paths.data_dir.join("profile.db"),
            key_file: key::key_file_path(&paths.data_dir),
            adapters_dir: paths.cache_dir.join("adapters"),
        }
    }

    /// The database and SQLite's companion files, which hold its data too.
    pub fn database_files(&self) -> Vec<PathBuf> {
        let mut files = vec![self.db.clone()];
        for suffix in ["-wal", "-shm", "-journal"] {
            let mut name = self.db.clone().into_os_string();
            name.push(suffix);
            files.push(PathBuf::from(name));
        }
        files
    }
}

/// An open profile.
pub struct Profile {
    conn: Connection,
    files: ProfileFiles,
    protection: Protection,
    schema_version_before: i64,
}

impl std::fmt::Debug for Profile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Profile")
            .field("db", &self.files.db)
            .field("protection", &self.protection)
            .finish()
    }
}

impl Profile {
    pub fn exists(paths: &Paths) -> bool {
        ProfileFiles::new(paths).db.exists()
    }

    /// Opens the profile, creating it (encrypted, key in the keyring or
    /// from a passphrase) when there is none yet. The notice, when there is
    /// one, must be shown to the user.
    pub fn open_or_create(
        paths: &Paths,
        passphrase: &dyn PassphraseSource,
    ) -> Result<(Self, Option<String>), ProfileError> {
        if Self::exists(paths) {
            Ok((Self::open(paths, passphrase)?, None))
        } else {
            Self::create(paths, KeyChoice::Auto, passphrase)
        }
    }

    /// Opens an existing profile.
    pub fn open(paths: &Paths, passphrase: &dyn PassphraseSource) -> Result<Self, ProfileError> {
        let files = ProfileFiles::new(paths);
        let key_file = key::KeyFile::load(&files.key_file)?.ok_or_else(|| {
            ProfileError::KeyFile {
                path: files.key_file.clone(),
                reason: "it is missing, so the profile's key cannot be found. Restore the file, or start over with `imprint profile delete`".into(),
            }
        })?;
        let key = key_file.unlock(passphrase)?;
        Self::connect(files, key_file.protection, key.as_ref(), false)
    }

    /// Creates a new, empty profile. Fails when one exists.
    pub fn create(
        paths: &Paths,
        choice: KeyChoice,
        passphrase: &dyn PassphraseSource,
    ) -> Result<(Self, Option<String>), ProfileError> {
        let files = ProfileFiles::new(paths);
        if files.db.exists() {
            return Err(ProfileError::Invalid(format!(
                "a profile already exists at {}; `imprint profile delete` removes it first",
                files.db.display()
            )));
        }
        crate::paths::create_private_dir(&paths.data_dir).map_err(|source| ProfileError::Io {
            path: paths.data_dir.clone(),
            source,
        })?;
        // A key file without a database is left over from an interrupted
        // creation: its key protects nothing, so a new one replaces it.
        if let Some(stale) = key::KeyFile::load(&files.key_file).ok().flatten() {
            if let Protection::Keyring { user } = &stale.protection {
                let _ = key::keyring_delete(user);
            }
        }
        // Key first, then the key file, then the database: a crash leaves
        // at worst a key file without a database, which is replaced above.
        let (key_file, key, notice) = key::KeyFile::create(choice, passphrase)?;
        key_file.save(&files.key_file)?;
        create_private_file(&files.db)?;
        let profile = Self::connect(files, key_file.protection, key.as_ref(), true)?;
        profile.audit("created", "profile", &profile.protection.describe())?;
        Ok((profile, notice))
    }

    fn connect(
        files: ProfileFiles,
        protection: Protection,
        key: Option<&key::RawKey>,
        creating: bool,
    ) -> Result<Self, ProfileError> {
        let mut flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        if creating {
            flags |= OpenFlags::SQLITE_OPEN_CREATE;
        }
        let corrupt = |e: rusqlite::Error| match ProfileError::from(e) {
            ProfileError::Corrupt { reason, .. } => ProfileError::Corrupt {
                path: files.db.clone(),
                reason,
            },
            other => other,
        };
        let mut conn = Connection::open_with_flags(&files.db, flags).map_err(corrupt)?;
        // SQLCipher logs decryption failures to stderr itself; imprint
        // reports them as one clear error instead.
        let _ = conn.execute_batch("PRAGMA cipher_log_level = NONE;");
        if let Some(key) = key {
            let pragma = Zeroizing::new(format!("PRAGMA key = \"x'{}'\";", hex::encode(&key[..])));
            conn.execute_batch(&pragma).map_err(corrupt)?;
        }
        // The first read decrypts page 1: with a checked key, a failure
        // here means the file itself is damaged (or not a profile at all).
        conn.query_row("SELECT count(*) FROM sqlite_master", [], |r| {
            r.get::<_, i64>(0)
        })
        .map_err(corrupt)?;
        // Refuse a newer schema before anything (even the journal mode)
        // is written to the file.
        let found: i64 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .map_err(corrupt)?;
        if found > schema::current_version() {
            return Err(ProfileError::NewerSchema {
                found,
                supported: schema::current_version(),
            });
        }
        // Several connections share the file (the daemon's server and its
        // editor worker), so every write transaction in this module begins
        // IMMEDIATE: a deferred one that reads and then writes would fail at
        // once with SQLITE_BUSY_SNAPSHOT instead of waiting its turn here.
        conn.busy_timeout(std::time::Duration::from_secs(10))
            .map_err(corrupt)?;
        conn.pragma_update(None, "foreign_keys", true)
            .map_err(corrupt)?;
        // Overwrite deleted content instead of leaving it in free pages.
        conn.pragma_update(None, "secure_delete", true)
            .map_err(corrupt)?;
        let mode: String = conn
            .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
            .map_err(corrupt)?;
        if !mode.eq_ignore_ascii_case("wal") {
            tracing::warn!("the profile database is in journal mode {mode}, not WAL");
        }
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(corrupt)?;
        let before = schema::migrate(&mut conn).map_err(|e| match e {
            ProfileError::Corrupt { reason, .. } => ProfileError::Corrupt {
                path: files.db.clone(),
                reason,
            },
            other => other,
        })?;
        Ok(Self {
            conn,
            files,
            protection,
            schema_version_before: before,
        })
    }

    pub fn files(&self) -> &ProfileFiles {
        &self.files
    }

    pub fn protection(&self) -> &Protection {
        &self.protection
    }

    /// The schema version found when the profile was opened (before any
    /// migration ran).
    pub fn schema_version_before(&self) -> i64 {
        self.schema_version_before
    }

    pub fn schema_version(&self) -> Result<i64, ProfileError> {
        Ok(self
            .conn
            .pragma_query_value(None, "user_version", |r| r.get(0))?)
    }

    /// SQLite's own consistency check: "ok" when the file is sound.
    pub fn integrity_check(&self) -> Result<String, ProfileError> {
        let rows: Vec<String> = self
            .conn
            .prepare("PRAGMA integrity_check")?
            .query_map([], |r| r.get(0))?
            .collect::<Result<_, _>>()?;
        Ok(rows.join("; "))
    }

    pub(crate) fn conn(&self) -> &Connection {
        &self.conn
    }

    pub(crate) fn conn_mut(&mut self) -> &mut Connection {
        &mut self.conn
    }

    /// Closes the database, checkpointing the WAL into the main file.
    pub fn close(self) -> Result<(), ProfileError> {
        self.conn.close().map_err(|(_, e)| e.into())
    }
}

/// Creates an empty file with mode 0600 (SQLite gives its -wal and -shm
/// files the database file's permissions).
fn create_private_file(path: &Path) -> Result<(), ProfileError> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    options.open(path).map_err(|source| ProfileError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(())
}
