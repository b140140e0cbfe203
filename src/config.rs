//! Layered configuration: built-in defaults, then the user's file, then
//! `IMPRINT_<SECTION>_<KEY>` environment variables.
//!
//! The layers are merged as TOML tables before anything is deserialized, so
//! every effective value can say where it came from (`imprint config show`).
//! Unknown keys are errors rather than silently ignored: a typo in a config
//! file should never quietly leave a default in place.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// The defaults, compiled in so the binary is self-contained.
pub const DEFAULT_TOML: &str = include_str!("../config/default.toml");

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub model: ModelConfig,
    pub engine: EngineConfig,
    pub generation: GenerationConfig,
    pub learning: LearningConfig,
    pub editor: EditorConfig,
    pub logging: LoggingConfig,
}

/// The editor's choices a user may want to change (the rest are per-edit
/// flags of `imprint edit`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EditorConfig {
    /// How anchor questions keep their answers while an edit trains.
    pub anchors: crate::editor::AnchorMode,
    /// Weight of the key-preservation term of `anchors = "keys"`.
    pub anchor_key_weight: f64,
    /// What that term's shipped anchors are made of on a first attempt.
    pub key_anchors: crate::editor::KeyAnchors,
    /// Share of ordinary keys' energy the null-space projector removes.
    pub nullspace_energy: f64,
    /// The share the retry uses after the gate refused an edit for locality.
    pub retry_nullspace_energy: f64,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LearningConfig {
    pub capture: bool,
    pub auto_apply_threshold: f64,
    pub cluster_size: usize,
    pub inbox: String,
    pub llm_extractor: bool,
    /// Ask the model for synonyms of attributes the lexicon does not know
    /// (`learn::cluster::refine_with_model`).
    pub model_synonyms: bool,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    pub name: String,
    pub path: String,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EngineConfig {
    pub n_gpu_layers: GpuLayers,
    pub threads: u32,
    pub context_size: u32,
    pub batch_size: u32,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct GenerationConfig {
    pub system_prompt: String,
    pub max_tokens: u32,
    pub temperature: f32,
    pub top_p: f32,
    pub min_p: f32,
    pub repeat_penalty: f32,
    pub repeat_last_n: i32,
    pub seed: u32,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LoggingConfig {
    pub llama: bool,
}

/// How many layers llama.cpp offloads to the GPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GpuLayers {
    /// Everything when built with a GPU backend, nothing otherwise.
    Auto,
    Count(u32),
}

impl GpuLayers {
    /// The number handed to llama.cpp.
    pub fn resolve(self) -> u32 {
        match self {
            GpuLayers::Count(n) => n,
            GpuLayers::Auto
                if cfg!(any(feature = "cuda", feature = "vulkan", feature = "metal")) =>
            {
                // llama.cpp clamps this to the model's layer count.
                u32::MAX
            }
            GpuLayers::Auto => 0,
        }
    }
}

impl<'de> Deserialize<'de> for GpuLayers {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(u32),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Number(n) => Ok(GpuLayers::Count(n)),
            Raw::Text(s) if s.eq_ignore_ascii_case("auto") => Ok(GpuLayers::Auto),
            Raw::Text(s) => s.trim().parse().map(GpuLayers::Count).map_err(|_| {
                serde::de::Error::custom(format!(
                    "n_gpu_layers must be \"auto\" or a number of layers, not {s:?}"
                ))
            }),
        }
    }
}

impl Serialize for GpuLayers {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            GpuLayers::Auto => s.serialize_str("auto"),
            GpuLayers::Count(n) => s.serialize_u32(*n),
        }
    }
}

/// Where a setting's effective value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Default,
    File(PathBuf),
    Env(String),
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Default => write!(f, "built-in default"),
            Source::File(p) => write!(f, "{}", p.display()),
            Source::Env(var) => write!(f, "environment variable {var}"),
        }
    }
}

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid TOML: {message}Fix the file or move it aside to use the defaults.")]
    Syntax { path: PathBuf, message: String },
    #[error("config file {path}: [{section}] {key} is not a setting imprint knows. Known settings in [{section}]: {known}")]
    UnknownKey {
        path: PathBuf,
        section: String,
        key: String,
        known: String,
    },
    #[error(
        "config file {path}: [{section}] is not a section imprint knows. Known sections: {known}"
    )]
    UnknownSection {
        path: PathBuf,
        section: String,
        known: String,
    },
    #[error("environment variable {var} does not name a setting. Known settings in [{section}]: {known}")]
    UnknownEnv {
        var: String,
        section: String,
        known: String,
    },
    #[error("invalid configuration ({origin}): {message}")]
    Invalid { origin: String, message: String },
}

/// The effective configuration plus the origin of each `section.key`.
#[derive(Debug, Clone)]
pub struct LoadedConfig {
    pub config: Config,
    pub sources: BTreeMap<String, Source>,
    pub merged: toml::Table,
}

impl LoadedConfig {
    /// Defaults, then `user_file` if it exists, then the process environment.
    pub fn load(user_file: &Path) -> Result<Self, ConfigError> {
        let env: Vec<(String, String)> = std::env::vars().collect();
        Self::load_from(user_file, &env)
    }

    /// Like [`load`](Self::load) with an explicit environment (tests).
    pub fn load_from(user_file: &Path, env: &[(String, String)]) -> Result<Self, ConfigError> {
        let mut merged: toml::Table =
            DEFAULT_TOML
                .parse()
                .map_err(|e: toml::de::Error| ConfigError::Syntax {
                    path: PathBuf::from("<built-in config/default.toml>"),
                    message: e.to_string(),
                })?;
        let mut sources = BTreeMap::new();
        for (section, table) in &merged {
            if let Some(table) = table.as_table() {
                for key in table.keys() {
                    sources.insert(format!("{section}.{key}"), Source::Default);
                }
            }
        }

        if user_file.exists() {
            let text = std::fs::read_to_string(user_file).map_err(|source| ConfigError::Read {
                path: user_file.to_path_buf(),
                source,
            })?;
            let user: toml::Table =
                text.parse()
                    .map_err(|e: toml::de::Error| ConfigError::Syntax {
                        path: user_file.to_path_buf(),
                        message: e.to_string(),
                    })?;
            overlay_file(&mut merged, &mut sources, user, user_file)?;
        }

        overlay_env(&mut merged, &mut sources, env)?;

        let origin = if user_file.exists() {
            format!("defaults + {} + environment", user_file.display())
        } else {
            "defaults + environment".to_string()
        };
        let config: Config =
            toml::Value::Table(merged.clone())
                .try_into()
                .map_err(|e: toml::de::Error| ConfigError::Invalid {
                    origin: origin.clone(),
                    message: e.to_string(),
                })?;
        // Range checks serde cannot express; refused here, at load, so a bad
        // value is named with its source instead of failing the first edit.
        for (key, energy) in [
            ("nullspace_energy", config.editor.nullspace_energy),
            (
                "retry_nullspace_energy",
                config.editor.retry_nullspace_energy,
            ),
        ] {
            if !(0.0..1.0).contains(&energy) {
                return Err(ConfigError::Invalid {
                    origin,
                    message: format!(
                        "[editor] {key} must be at least 0 and below 1 (0.95 keeps \
                         edits away from the directions holding 95 % of ordinary keys' \
                         energy), not {energy}"
                    ),
                });
            }
        }
        Ok(Self {
            config,
            sources,
            merged,
        })
    }

    /// `section.key = value  # source`, one line each, in file order.
    pub fn describe(&self) -> String {
        let mut out = String::new();
        for (section, table) in &self.merged {
            let Some(table) = table.as_table() else {
                continue;
            };
            out.push_str(&format!("[{section}]\n"));
            for (key, value) in table {
                let source = self
                    .sources
                    .get(&format!("{section}.{key}"))
                    .map(ToString::to_string)
                    .unwrap_or_default();
                out.push_str(&format!("{key} = {value}    # {source}\n"));
            }
            out.push('\n');
        }
        out
    }
}

fn known_keys(table: &toml::Table) -> String {
    table.keys().cloned().collect::<Vec<_>>().join(", ")
}

fn overlay_file(
    merged: &mut toml::Table,
    sources: &mut BTreeMap<String, Source>,
    user: toml::Table,
    path: &Path,
) -> Result<(), ConfigError> {
    let known_sections = known_keys(merged);
    for (section, value) in user {
        let Some(base) = merged.get_mut(&section).and_then(|v| v.as_table_mut()) else {
            return Err(ConfigError::UnknownSection {
                path: path.to_path_buf(),
                section,
                known: known_sections,
            });
        };
        let Some(values) = value.as_table() else {
            return Err(ConfigError::Invalid {
                origin: path.display().to_string(),
                message: format!("{section} must be a [section] of settings"),
            });
        };
        for (key, v) in values {
            if !base.contains_key(key) {
                return Err(ConfigError::UnknownKey {
                    path: path.to_path_buf(),
                    section,
                    key: key.clone(),
                    known: known_keys(base),
                });
            }
            base.insert(key.clone(), v.clone());
            sources.insert(format!("{section}.{key}"), Source::File(path.to_path_buf()));
        }
    }
    Ok(())
}

/// `IMPRINT_ENGINE_CONTEXT_SIZE=8192` sets `[engine] context_size`. Variables
/// whose second word is not a section (IMPRINT_HOME, IMPRINT_LOG, ...) are
/// other switches and are left alone.
fn overlay_env(
    merged: &mut toml::Table,
    sources: &mut BTreeMap<String, Source>,
    env: &[(String, String)],
) -> Result<(), ConfigError> {
    for (var, raw) in env {
        let Some(rest) = var.strip_prefix("IMPRINT_") else {
            continue;
        };
        let Some((section, key)) = rest.split_once('_') else {
            continue;
        };
        let section = section.to_ascii_lowercase();
        let key = key.to_ascii_lowercase();
        let Some(base) = merged.get_mut(&section).and_then(|v| v.as_table_mut()) else {
            continue;
        };
        let Some(current) = base.get(&key) else {
            return Err(ConfigError::UnknownEnv {
                var: var.clone(),
                section,
                known: known_keys(base),
            });
        };
        let value = parse_env_value(raw, current);
        base.insert(key.clone(), value);
        sources.insert(format!("{section}.{key}"), Source::Env(var.clone()));
    }
    Ok(())
}

/// Environment values are untyped text: read them as the type of the default
/// they replace, so `IMPRINT_ENGINE_THREADS=4` is a number and
/// `IMPRINT_MODEL_NAME=4` stays a string.
fn parse_env_value(raw: &str, current: &toml::Value) -> toml::Value {
    let parsed = match current {
        toml::Value::Integer(_) => raw.trim().parse().ok().map(toml::Value::Integer),
        toml::Value::Float(_) => raw.trim().parse().ok().map(toml::Value::Float),
        toml::Value::Boolean(_) => match raw.trim().to_ascii_lowercase().as_str() {
            "1" | "true" | "yes" | "on" => Some(toml::Value::Boolean(true)),
            "0" | "false" | "no" | "off" => Some(toml::Value::Boolean(false)),
            _ => None,
        },
        _ => None,
    };
    // Anything unparseable stays text, and deserialization then reports the
    // variable's bad value with the expected type.
    parsed.unwrap_or_else(|| {
        raw.trim()
            .parse::<i64>()
            .map(toml::Value::Integer)
            .unwrap_or_else(|_| toml::Value::String(raw.to_string()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(file_text: Option<&str>, env: &[(&str, &str)]) -> Result<LoadedConfig, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        if let Some(text) = file_text {
            std::fs::write(&path, text).unwrap();
        }
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        LoadedConfig::load_from(&path, &env)
    }

    #[test]
    fn nullspace_energies_are_read_and_range_checked_at_load() {
        let loaded = load(
            Some("[editor]\nnullspace_energy = 0.9\nretry_nullspace_energy = 0.97\n"),
            &[],
        )
        .unwrap();
        assert_eq!(loaded.config.editor.nullspace_energy, 0.9);
        assert_eq!(loaded.config.editor.retry_nullspace_energy, 0.97);
        for key in ["nullspace_energy", "retry_nullspace_energy"] {
            for bad in ["1.0", "1.5", "-0.1"] {
                let err = load(Some(&format!("[editor]\n{key} = {bad}\n")), &[])
                    .err()
                    .unwrap_or_else(|| panic!("{key} = {bad} was accepted"));
                let text = err.to_string();
                assert!(text.contains(&format!("[editor] {key} must")), "{text}");
                assert!(text.contains("config.toml"), "names the file: {text}");
            }
        }
    }

    #[test]
    fn defaults_parse_and_name_their_source() {
        let loaded = load(None, &[]).unwrap();
        assert_eq!(loaded.config.engine.n_gpu_layers, GpuLayers::Auto);
        assert_eq!(loaded.sources["engine.threads"], Source::Default);
    }

    #[test]
    fn built_in_editor_config_agrees_with_the_editor_library_defaults() {
        // Two homes for one default: the shipped config (what the CLI and the
        // daemon read) and `EditorSettings::default()` (what tests and library
        // callers get). A change to one alone would make them edit differently.
        let editor = load(None, &[]).unwrap().config.editor;
        let library = crate::editor::EditorSettings::default();
        assert_eq!(editor.nullspace_energy, library.nullspace_energy);
        assert_eq!(
            editor.retry_nullspace_energy,
            library.retry_nullspace_energy
        );
        assert_eq!(editor.anchors, library.anchors);
        assert_eq!(editor.anchor_key_weight, library.anchor_key_weight);
        assert_eq!(editor.key_anchors, library.key_anchors);
    }

    #[test]
    fn file_then_env_override_in_order() {
        let loaded = load(
            Some("[engine]\nthreads = 3\ncontext_size = 1024\n"),
            &[("IMPRINT_ENGINE_THREADS", "5"), ("IMPRINT_HOME", "/x")],
        )
        .unwrap();
        assert_eq!(loaded.config.engine.threads, 5);
        assert_eq!(loaded.config.engine.context_size, 1024);
        assert!(matches!(loaded.sources["engine.threads"], Source::Env(_)));
        assert!(matches!(
            loaded.sources["engine.context_size"],
            Source::File(_)
        ));
        let shown = loaded.describe();
        assert!(shown.contains("threads = 5    # environment variable IMPRINT_ENGINE_THREADS"));
    }

    #[test]
    fn typos_are_errors_not_silent_defaults() {
        let err = load(Some("[engine]\nthraeds = 3\n"), &[]).unwrap_err();
        assert!(err.to_string().contains("thraeds"), "{err}");
        let err = load(None, &[("IMPRINT_ENGINE_THRAEDS", "3")]).unwrap_err();
        assert!(err.to_string().contains("IMPRINT_ENGINE_THRAEDS"), "{err}");
        let err = load(Some("[engnie]\nthreads = 3\n"), &[]).unwrap_err();
        assert!(err.to_string().contains("engnie"), "{err}");
    }

    #[test]
    fn bad_values_name_the_setting() {
        let err = load(None, &[("IMPRINT_ENGINE_THREADS", "many")]).unwrap_err();
        assert!(err.to_string().contains("threads"), "{err}");
        let err = load(Some("[engine]\nn_gpu_layers = \"lots\"\n"), &[]).unwrap_err();
        assert!(err.to_string().contains("n_gpu_layers"), "{err}");
        let err = load(Some("[engine\n"), &[]).unwrap_err();
        assert!(err.to_string().contains("not valid TOML"), "{err}");
    }

    #[test]
    fn gpu_layers_accepts_auto_and_numbers() {
        let loaded = load(None, &[("IMPRINT_ENGINE_N_GPU_LAYERS", "12")]).unwrap();
        assert_eq!(loaded.config.engine.n_gpu_layers, GpuLayers::Count(12));
        assert_eq!(GpuLayers::Count(7).resolve(), 7);
    }
}
