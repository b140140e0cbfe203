//! Where imprint keeps its files.
//!
//! The platform's conventional directories come from `directories` (XDG on
//! Linux, `~/Library/...` on macOS). `IMPRINT_HOME` moves all of them under one
//! folder, which is what tests and CI use to stay out of the user's real
//! profile.

use std::path::{Path, PathBuf};

use thiserror::Error;

#[derive(Debug, Error)]
pub enum PathsError {
    #[error("cannot find a home directory to keep imprint's files in; set IMPRINT_HOME to a writable folder")]
    NoHome,
}

/// The three folders imprint writes to.
#[derive(Debug, Clone)]
pub struct Paths {
    /// Models, edits, the profile: things worth keeping.
    pub data_dir: PathBuf,
    /// The user's `config.toml`.
    pub config_dir: PathBuf,
    /// Rebuildable things (assembled adapters, null-space caches).
    pub cache_dir: PathBuf,
}

impl Paths {
    pub fn discover() -> Result<Self, PathsError> {
        if let Some(home) = std::env::var_os("IMPRINT_HOME").filter(|v| !v.is_empty()) {
            return Ok(Self::under(Path::new(&home)));
        }
        let dirs = directories::ProjectDirs::from("", "", "imprint").ok_or(PathsError::NoHome)?;
        Ok(Self {
            data_dir: dirs.data_dir().to_path_buf(),
            config_dir: dirs.config_dir().to_path_buf(),
            cache_dir: dirs.cache_dir().to_path_buf(),
        })
    }

    /// All folders below one root (`IMPRINT_HOME`, tests).
    pub fn under(root: &Path) -> Self {
        Self {
            data_dir: root.join("data"),
            config_dir: root.join("config"),
            cache_dir: root.join("cache"),
        }
    }

    pub fn models_dir(&self) -> PathBuf {
        self.data_dir.join("models")
    }

    pub fn model_registry(&self) -> PathBuf {
        self.data_dir.join("models.toml")
    }

    pub fn config_file(&self) -> PathBuf {
        self.config_dir.join("config.toml")
    }
}

/// Creates `dir` (and parents) readable only by the user: profiles and models
/// are private.
pub fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}
