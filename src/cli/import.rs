//! `imprint import`: learn from other assistants' chat histories.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Args;

use imprint::learn::capture::CaptureSettings;
use imprint::learn::import::{detect, import_history, Format};

use super::App;

#[derive(Debug, Args)]
pub struct ImportArgs {
    /// Chat exports: ChatGPT or Claude conversations.json, JSONL, Markdown transcripts, plain text.
    #[arg(required = true)]
    files: Vec<PathBuf>,
    /// The format of every file (default: detected from each file).
    #[arg(long, value_enum)]
    format: Option<Format>,
    /// A model name or GGUF path the edit jobs are queued for (default: the current model).
    #[arg(long)]
    model: Option<String>,
}

pub fn run(app: &App, args: ImportArgs) -> Result<ExitCode> {
    let mut profile = super::open_profile(app)?;
    let model =
        imprint::models::resolve_model(&app.paths, &app.config.config, args.model.as_deref()).ok();
    let sha = match &model {
        Some(path) => Some(imprint::models::fingerprint(&app.paths, path)?),
        None => None,
    };
    if sha.is_none() {
        eprintln!("imprint: no model is installed, so no edits are queued; after `imprint model pull`, `imprint prefs recompute` computes them");
    }
    let settings = CaptureSettings::from(&app.config.config.learning);
    let mut failed = 0;
    for file in &args.files {
        let format = match args.format {
            Some(f) => f,
            None => match detect(file) {
                Ok(f) => f,
                Err(e) => {
                    eprintln!("imprint: {e}");
                    failed += 1;
                    continue;
                }
            },
        };
        let bar = app.spinner(&format!("importing {}", file.display()));
        let result = import_history(&mut profile, file, format, &settings, sha.as_deref(), |n| {
            if n % 50 == 0 {
                bar.set_message(format!("importing {}: {n} messages", file.display()));
            }
        });
        bar.finish_and_clear();
        match result {
            Ok(s) => {
                println!(
                    "{} ({:?}): {} conversation(s), {} message(s), {} from you; {} new preference(s) learned, {} waiting for review, {} reinforced, {} replaced; {} message(s) already imported.",
                    file.display(),
                    format,
                    s.read.conversations,
                    s.read.messages,
                    s.user_messages,
                    s.capture.learned.len(),
                    s.capture.pending.len(),
                    s.capture.reinforced.len(),
                    s.capture.superseded.len(),
                    s.already_imported
                );
                if s.read.oversized_lines > 0 {
                    println!(
                        "  skipped {} line(s) longer than {} KiB",
                        s.read.oversized_lines,
                        imprint::learn::import::MAX_LINE / 1024
                    );
                }
                if s.capture.secrets_skipped.total() > 0 {
                    println!(
                        "  not learned, never stored: {}",
                        s.capture.secrets_skipped.describe()
                    );
                }
                if !s.capture.jobs.is_empty() {
                    println!(
                        "  {} edit job(s) queued: `imprint jobs run` writes them into the weights.",
                        s.capture.jobs.len()
                    );
                }
            }
            Err(e) => {
                // What was captured before the error stays: each message is
                // committed on its own.
                eprintln!("imprint: {e}");
                failed += 1;
            }
        }
    }
    if failed > 0 {
        return Err(anyhow::anyhow!(
            "{failed} file(s) could not be imported (see above); everything else was kept"
        ))
        .context("import");
    }
    Ok(ExitCode::SUCCESS)
}
