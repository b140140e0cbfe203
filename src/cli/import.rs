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
    #[arg(required_unless_present = "watch")]
    files: Vec<PathBuf>,
    /// Keep running and learn from every file dropped into the inbox folder
    /// ([learning] inbox, default inbox/ in the data folder). Imported files
    /// move to processed/, unreadable ones to failed/ with a .error.txt.
    #[arg(long)]
    watch: bool,
    /// Seconds a file must stay unchanged before it is read (--watch).
    #[arg(long, default_value_t = 2.0)]
    settle: f64,
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
    if args.watch {
        let inbox = match app.config.config.learning.inbox.as_str() {
            "" => app.paths.data_dir.join("inbox"),
            dir => PathBuf::from(dir),
        };
        eprintln!(
            "Watching {} for chat exports (Ctrl-C stops; each message is committed as it is read).",
            inbox.display()
        );
        imprint::learn::inbox::watch(
            &inbox,
            std::time::Duration::from_secs_f64(args.settle.max(0.1)),
            &mut profile,
            &settings,
            sha.as_deref(),
            |outcome| match outcome {
                imprint::learn::inbox::Outcome::Imported { file, summary } => println!(
                    "imported {}: {} new preference(s), {} waiting for review, {} already imported",
                    file.display(),
                    summary.capture.learned.len(),
                    summary.capture.pending.len(),
                    summary.already_imported
                ),
                imprint::learn::inbox::Outcome::Failed { file, error } => {
                    eprintln!("could not import {}: {error}", file.display())
                }
            },
            || false,
        )
        .context("watching the inbox")?;
        return Ok(ExitCode::SUCCESS);
    }
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
