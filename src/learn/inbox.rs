//! The import inbox: chat exports dropped into a folder are learned from.
//!
//! The watcher (`notify`) only says "something changed"; the decisions are
//! made by scanning the folder. A file is imported once it has kept the
//! same size and modification time across one full debounce period, so a
//! file written in several steps is read once, complete; a file renamed
//! into place is simply a new name. Hidden files and the usual partial
//! download names (`.part`, `.tmp`, `.crdownload`, `.download`) are left
//! alone. After import a file moves to `processed/`; one that could not be
//! read moves to `failed/` with `<name>.error.txt` beside it saying why.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;

use super::capture::CaptureSettings;
use super::import::{detect, import_history, ImportSummary};
use crate::profile::Profile;

/// What happened to one file.
#[derive(Debug, Serialize)]
pub enum Outcome {
    Imported {
        file: PathBuf,
        summary: ImportSummary,
    },
    Failed {
        file: PathBuf,
        error: String,
    },
}

/// Remembers each file's (size, mtime) and when it was first seen so.
#[derive(Debug, Default)]
pub struct Inbox {
    seen: HashMap<PathBuf, ((u64, Option<SystemTime>), Instant)>,
}

fn ignored(name: &str) -> bool {
    name.starts_with('.')
        || [".part", ".tmp", ".crdownload", ".download", ".error.txt"]
            .iter()
            .any(|s| name.ends_with(s))
}

fn move_into(file: &Path, dir: &Path) -> std::io::Result<PathBuf> {
    crate::paths::create_private_dir(dir)?;
    let name = file.file_name().unwrap_or_default();
    let mut target = dir.join(name);
    let mut n = 1;
    while target.exists() {
        target = dir.join(format!("{}.{n}", name.to_string_lossy()));
        n += 1;
    }
    std::fs::rename(file, &target)?;
    Ok(target)
}

impl Inbox {
    /// Imports every file of `dir` that has been stable for `debounce`,
    /// and moves it to `processed/` or `failed/`.
    pub fn scan(
        &mut self,
        dir: &Path,
        debounce: Duration,
        profile: &mut Profile,
        settings: &CaptureSettings,
        model_sha256: Option<&str>,
    ) -> std::io::Result<Vec<Outcome>> {
        crate::paths::create_private_dir(dir)?;
        let mut outcomes = Vec::new();
        let mut present = Vec::new();
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            let Ok(meta) = entry.metadata() else { continue };
            if !meta.is_file() || ignored(&name) {
                continue;
            }
            present.push(path.clone());
            let state = (meta.len(), meta.modified().ok());
            let now = Instant::now();
            let stable_since = match self.seen.get(&path) {
                Some((old, since)) if *old == state => *since,
                _ => {
                    self.seen.insert(path.clone(), (state, now));
                    continue;
                }
            };
            if now.duration_since(stable_since) < debounce {
                continue;
            }
            self.seen.remove(&path);
            let result = detect(&path).map_err(|e| e.to_string()).and_then(|format| {
                import_history(profile, &path, format, settings, model_sha256, |_| {})
                    .map_err(|e| e.to_string())
            });
            match result {
                Ok(summary) => {
                    let moved = move_into(&path, &dir.join("processed"))?;
                    outcomes.push(Outcome::Imported {
                        file: moved,
                        summary,
                    });
                }
                Err(error) => {
                    let moved = move_into(&path, &dir.join("failed"))?;
                    let mut note = moved.clone().into_os_string();
                    note.push(".error.txt");
                    std::fs::write(&note, format!("{error}\n"))?;
                    outcomes.push(Outcome::Failed { file: moved, error });
                }
            }
        }
        self.seen.retain(|p, _| present.contains(p));
        Ok(outcomes)
    }
}

/// Watches `dir` until `stop` returns true, scanning after every change
/// (and every `debounce` in any case, which also completes the stability
/// check). `report` gets every outcome.
pub fn watch(
    dir: &Path,
    debounce: Duration,
    profile: &mut Profile,
    settings: &CaptureSettings,
    model_sha256: Option<&str>,
    mut report: impl FnMut(&Outcome),
    mut stop: impl FnMut() -> bool,
) -> Result<(), notify::Error> {
    use notify::Watcher;
    crate::paths::create_private_dir(dir).map_err(notify::Error::io)?;
    let (tx, rx) = std::sync::mpsc::channel();
    let mut watcher = notify::recommended_watcher(move |event| {
        let _ = tx.send(event);
    })?;
    watcher.watch(dir, notify::RecursiveMode::NonRecursive)?;
    let mut inbox = Inbox::default();
    while !stop() {
        // Wake on a change or after one debounce period.
        let _ = rx.recv_timeout(debounce / 2);
        while rx.try_recv().is_ok() {}
        let outcomes = inbox
            .scan(dir, debounce, profile, settings, model_sha256)
            .map_err(notify::Error::io)?;
        for o in &outcomes {
            report(o);
        }
    }
    Ok(())
}
