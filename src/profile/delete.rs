//! Removing the whole profile.
//!
//! When the profile can still be opened, its rows are deleted first with
//! `secure_delete` on and the WAL truncated, so the freed pages are
//! overwritten before the files are unlinked. Then the database and its
//! companion files, the key file, the keyring entry, the assembled
//! adapters and leftover temporary files go. Models and model-derived
//! caches (null-space projectors, base-model locality snapshots) hold
//! nothing personal and stay.

use std::path::{Path, PathBuf};

use serde::Serialize;

use super::key::{KeyFile, PassphraseSource, Protection};
use super::{Profile, ProfileError, ProfileFiles};
use crate::paths::Paths;

#[derive(Debug, Clone, Default, Serialize)]
pub struct DeletionReceipt {
    /// Files and folders removed.
    pub removed: Vec<PathBuf>,
    /// The keyring entry removed, as `service/user`.
    pub keyring_entry: Option<String>,
    /// What the profile held, when it could be opened.
    pub preferences: Option<usize>,
    pub edits: Option<usize>,
    pub conversations: Option<usize>,
    /// Why the contents could not be wiped before unlinking, if so.
    pub not_wiped: Option<String>,
}

/// Deletes the profile under `paths`. Works on a profile that cannot be
/// opened any more (lost key, damaged file): the files still go.
pub fn delete_profile(
    paths: &Paths,
    passphrase: &dyn PassphraseSource,
) -> Result<DeletionReceipt, ProfileError> {
    let files = ProfileFiles::new(paths);
    let mut receipt = DeletionReceipt::default();
    if files.db.exists() {
        match Profile::open(paths, passphrase) {
            Ok(profile) => {
                receipt.preferences = Some(profile.preferences(None)?.len());
                receipt.edits = Some(profile.edits()?.len());
                receipt.conversations = Some(profile.conversations()?.len());
                wipe(&profile)?;
                profile.close()?;
            }
            Err(e) => receipt.not_wiped = Some(e.to_string()),
        }
    }
    for f in files.database_files() {
        remove_file(&f, &mut receipt)?;
    }
    if let Ok(Some(key_file)) = KeyFile::load(&files.key_file) {
        if let Protection::Keyring { user } = &key_file.protection {
            if super::key::keyring_delete(user)? {
                receipt.keyring_entry = Some(format!("{}/{user}", super::key::KEYRING_SERVICE));
            }
        }
    }
    remove_file(&files.key_file, &mut receipt)?;
    remove_dir(&files.adapters_dir, &mut receipt)?;
    // Edits kept as files by versions before the profile store.
    remove_dir(&paths.data_dir.join("edits"), &mut receipt)?;
    // Temporary files left by an interrupted atomic write.
    for dir in [&paths.data_dir, &paths.cache_dir] {
        if let Ok(entries) = std::fs::read_dir(dir) {
            for e in entries.filter_map(Result::ok) {
                if e.file_name().to_string_lossy().starts_with(".tmp") {
                    remove_file(&e.path(), &mut receipt)?;
                }
            }
        }
    }
    Ok(receipt)
}

/// Overwrites the contents in place before the files are unlinked.
fn wipe(profile: &Profile) -> Result<(), ProfileError> {
    let conn = profile.conn();
    conn.pragma_update(None, "secure_delete", true)?;
    conn.execute_batch(
        "DELETE FROM edits; DELETE FROM cluster_members; DELETE FROM preference_sources;
         DELETE FROM preferences; DELETE FROM messages; DELETE FROM conversations;
         DELETE FROM jobs; DELETE FROM audit_log; DELETE FROM models; DELETE FROM import_seen;",
    )?;
    conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
    conn.execute_batch("VACUUM")?;
    Ok(())
}

fn remove_file(path: &Path, receipt: &mut DeletionReceipt) -> Result<(), ProfileError> {
    remove(path, receipt, std::fs::remove_file(path))
}

fn remove_dir(path: &Path, receipt: &mut DeletionReceipt) -> Result<(), ProfileError> {
    remove(path, receipt, std::fs::remove_dir_all(path))
}

/// Records a removal on the receipt; "already gone" is not an error.
fn remove(
    path: &Path,
    receipt: &mut DeletionReceipt,
    result: std::io::Result<()>,
) -> Result<(), ProfileError> {
    match result {
        Ok(()) => {
            receipt.removed.push(path.to_path_buf());
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(ProfileError::Io {
            path: path.to_path_buf(),
            source,
        }),
    }
}
