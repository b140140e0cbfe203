//! `imprint profile` and `imprint history`.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use zeroize::Zeroizing;

use imprint::profile::archive::{Archive, ImportMode};
use imprint::profile::{EnvOrPrompt, KeyChoice, Profile, ProfileFiles};

use super::App;

#[derive(Debug, Subcommand)]
pub enum ProfileCommand {
    /// Where the profile is, how it is protected, and what it holds.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Create the profile now (it is otherwise created on first use, with
    /// its key in the OS keyring, or from a passphrase where no keyring can
    /// be reached).
    Init {
        /// Store the profile unencrypted. Shown by `imprint profile status`.
        #[arg(long, conflicts_with = "passphrase")]
        no_encryption: bool,
        /// Derive the key from a passphrase (IMPRINT_PASSPHRASE or a
        /// prompt) even where a keyring exists.
        #[arg(long)]
        passphrase: bool,
    },
    /// Write the whole profile to one portable file, encrypted with a
    /// passphrase (IMPRINT_EXPORT_PASSPHRASE or a prompt) unless --plain.
    Export {
        #[arg(long)]
        out: PathBuf,
        /// Write an unencrypted archive (its profile.json is readable by anyone).
        #[arg(long)]
        plain: bool,
        /// Replace an existing file.
        #[arg(long)]
        force: bool,
    },
    /// Read an export back. Everything is checked before anything is written.
    Import {
        file: PathBuf,
        /// Replace the profile's contents with the export's.
        #[arg(long, conflicts_with = "merge")]
        replace: bool,
        /// Add the export's contents to the profile.
        #[arg(long)]
        merge: bool,
    },
    /// Delete the profile: database, key, adapters, caches of personal data.
    Delete {
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
    },
    /// The audit log: what was created, approved, forgotten, exported, ...
    Audit {
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// Run SQLite's integrity check on the profile.
    Check,
}

#[derive(Debug, Subcommand)]
pub enum HistoryCommand {
    /// Stored conversations, newest first.
    List,
    /// Print one conversation.
    Show { id: i64 },
    /// Delete a conversation. Preferences learned only from it go too.
    Delete {
        id: i64,
        #[arg(long)]
        yes: bool,
    },
}

fn export_passphrase(confirm: bool) -> Result<Zeroizing<String>> {
    if let Some(p) = std::env::var_os("IMPRINT_EXPORT_PASSPHRASE") {
        let p = p.to_string_lossy().into_owned();
        if p.is_empty() {
            bail!("IMPRINT_EXPORT_PASSPHRASE is set but empty");
        }
        return Ok(Zeroizing::new(p));
    }
    if !std::io::stdin().is_terminal() {
        bail!("the export is encrypted with a passphrase and no terminal is attached to ask for one: set IMPRINT_EXPORT_PASSPHRASE (or use --plain for an unencrypted export)");
    }
    let first = Zeroizing::new(rpassword::prompt_password("Export passphrase: ")?);
    if first.is_empty() {
        bail!("the passphrase is empty");
    }
    if confirm {
        let again = Zeroizing::new(rpassword::prompt_password("Repeat it: ")?);
        if *again != *first {
            bail!("the two passphrases differ; nothing was written");
        }
    }
    Ok(first)
}

fn confirm(question: &str) -> Result<bool> {
    if !std::io::stdin().is_terminal() {
        bail!("{question} Pass --yes to confirm without a terminal.");
    }
    eprint!("{question} [y/N] ");
    std::io::stderr().flush()?;
    let mut line = String::new();
    std::io::stdin().read_line(&mut line)?;
    Ok(matches!(line.trim(), "y" | "Y" | "yes" | "YES"))
}

pub fn when(ts: i64) -> String {
    // Local time would need a timezone database; UTC is unambiguous.
    let days = ts.div_euclid(86_400);
    let secs = ts.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02} UTC",
        secs / 3600,
        (secs % 3600) / 60
    )
}

/// Howard Hinnant's days-to-civil algorithm.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

pub fn run(app: &App, cmd: ProfileCommand) -> Result<ExitCode> {
    match cmd {
        ProfileCommand::Status { json } => status(app, json),
        ProfileCommand::Init {
            no_encryption,
            passphrase,
        } => {
            let choice = if no_encryption {
                KeyChoice::None
            } else if passphrase {
                KeyChoice::Passphrase
            } else {
                KeyChoice::Auto
            };
            let (profile, notice) = Profile::create(&app.paths, choice, &EnvOrPrompt)?;
            if let Some(n) = notice {
                eprintln!("imprint: {n}");
            }
            println!(
                "Created the profile at {}: {}.",
                profile.files().db.display(),
                profile.protection().describe()
            );
            Ok(ExitCode::SUCCESS)
        }
        ProfileCommand::Export { out, plain, force } => {
            if out.exists() && !force {
                bail!("{} exists; pass --force to replace it", out.display());
            }
            let profile = super::open_profile(app)?;
            let archive = Archive::collect(&profile)?;
            let passphrase = if plain {
                None
            } else {
                Some(export_passphrase(true)?)
            };
            let bytes = archive.to_bytes(passphrase.as_deref().map(|s| s.as_str()))?;
            write_private(&out, &bytes)?;
            let c = &archive.manifest.counts;
            profile.audit(
                "exported",
                "profile",
                &format!(
                    "{} ({}), {} preference(s), {} edit(s)",
                    out.display(),
                    if plain { "plain" } else { "encrypted" },
                    c.preferences,
                    c.edits
                ),
            )?;
            println!(
                "Exported {} preference(s), {} edit(s), {} conversation(s) ({} messages) to {} ({}).",
                c.preferences,
                c.edits,
                c.conversations,
                c.messages,
                out.display(),
                if plain {
                    "NOT encrypted: anyone who can read the file can read your profile"
                } else {
                    "encrypted with your passphrase, age format"
                }
            );
            Ok(ExitCode::SUCCESS)
        }
        ProfileCommand::Import {
            file,
            replace,
            merge,
        } => import(app, &file, replace, merge),
        ProfileCommand::Delete { yes } => {
            let files = ProfileFiles::new(&app.paths);
            if !files.db.exists() && !files.key_file.exists() {
                println!(
                    "There is no profile to delete in {}.",
                    app.paths.data_dir.display()
                );
                return Ok(ExitCode::SUCCESS);
            }
            if !yes
                && !confirm(&format!(
                    "Delete the profile in {} with every preference, edit and conversation? This cannot be undone.",
                    app.paths.data_dir.display()
                ))?
            {
                println!("Nothing was deleted.");
                return Ok(ExitCode::from(1));
            }
            let receipt = imprint::profile::delete::delete_profile(&app.paths, &EnvOrPrompt)?;
            println!("Deleted the profile. Receipt:");
            if let (Some(p), Some(e), Some(c)) =
                (receipt.preferences, receipt.edits, receipt.conversations)
            {
                println!(
                    "  contents wiped first: {p} preference(s), {e} edit(s), {c} conversation(s)"
                );
            }
            if let Some(why) = &receipt.not_wiped {
                println!("  contents could not be wiped before removal ({why}); the files were removed anyway");
            }
            for f in &receipt.removed {
                println!("  removed {}", f.display());
            }
            match &receipt.keyring_entry {
                Some(e) => println!("  removed keyring entry {e}"),
                None => println!("  no keyring entry to remove"),
            }
            println!("  kept: models and model-derived caches (they hold nothing personal), and config.toml");
            Ok(ExitCode::SUCCESS)
        }
        ProfileCommand::Audit { limit } => {
            let profile = super::open_profile(app)?;
            for e in profile.audit_log(limit)? {
                println!(
                    "{}  {:<10} {:<16} {}",
                    when(e.at),
                    e.action,
                    e.subject,
                    e.detail
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        ProfileCommand::Check => {
            let profile = super::open_profile(app)?;
            let result = profile.integrity_check()?;
            println!("integrity check: {result}");
            Ok(if result == "ok" {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
    }
}

fn write_private(path: &std::path::Path, bytes: &[u8]) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => std::path::Path::new("."),
    };
    let mut tmp = tempfile::NamedTempFile::new_in(dir)
        .with_context(|| format!("cannot write in {}", dir.display()))?;
    tmp.write_all(bytes)
        .and_then(|_| tmp.as_file().sync_all())
        .with_context(|| format!("cannot write {}", path.display()))?;
    tmp.persist(path)
        .map_err(|e| e.error)
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

fn import(app: &App, file: &std::path::Path, replace: bool, merge: bool) -> Result<ExitCode> {
    let bytes = std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
    let passphrase = if Archive::is_encrypted(&bytes) {
        Some(export_passphrase(false)?)
    } else {
        None
    };
    let archive = Archive::from_bytes(&bytes, passphrase.as_deref().map(|s| s.as_str()))
        .with_context(|| format!("cannot import {}", file.display()))?;
    let mut profile = super::open_profile(app)?;
    let existing = profile.preferences(None)?.len() + profile.conversations()?.len();
    let mode = match (replace, merge) {
        (true, _) => ImportMode::Replace,
        (_, true) => ImportMode::Merge,
        _ if existing == 0 => ImportMode::Replace,
        _ => bail!(
            "the profile already holds {existing} preference(s)/conversation(s): choose --merge (add the export) or --replace (discard them for the export's)"
        ),
    };
    let report = profile.import(&archive, mode)?;
    println!(
        "Imported {} preference(s) ({} merged into existing ones), {} edit(s), {} conversation(s) ({} messages) from {}.",
        report.preferences_added,
        report.preferences_merged,
        report.edits,
        report.conversations,
        report.messages,
        file.display()
    );
    // Edits only fit the model they were computed for.
    let current = imprint::models::resolve_model(&app.paths, &app.config.config, None)
        .ok()
        .and_then(|p| imprint::models::fingerprint(&app.paths, &p).ok());
    if let Some(current) = current {
        let foreign: Vec<&String> = report
            .edit_models
            .iter()
            .filter(|m| **m != current)
            .collect();
        if !foreign.is_empty() {
            eprintln!(
                "warning: the export's edits were computed for another model ({}), not your current one ({}). They stay stored, unused by this model. `imprint prefs recompute` computes edits for this model from the preferences.",
                foreign.iter().map(|m| &m[..12.min(m.len())]).collect::<Vec<_>>().join(", "),
                &current[..12.min(current.len())]
            );
        }
        imprint::learn::review::rebuild_adapters(&profile, &app.paths.cache_dir, &[current])?;
    }
    Ok(ExitCode::SUCCESS)
}

fn status(app: &App, json: bool) -> Result<ExitCode> {
    let files = ProfileFiles::new(&app.paths);
    if !files.db.exists() {
        if json {
            println!("{}", serde_json::json!({"exists": false, "path": files.db}));
        } else {
            println!(
                "No profile yet at {}; it is created on first use (or with `imprint profile init`).",
                files.db.display()
            );
        }
        return Ok(ExitCode::SUCCESS);
    }
    let profile = super::open_profile(app)?;
    let prefs = profile.preferences(None)?;
    let count =
        |s: imprint::profile::PreferenceStatus| prefs.iter().filter(|p| p.status == s).count();
    let edits = profile.edits()?;
    let jobs = profile.jobs(None)?;
    let size: u64 = files
        .database_files()
        .iter()
        .filter_map(|f| std::fs::metadata(f).ok())
        .map(|m| m.len())
        .sum();
    use imprint::profile::{JobState, PreferenceStatus as S};
    let summary = serde_json::json!({
        "exists": true,
        "path": files.db,
        "protection": profile.protection(),
        "protection_text": profile.protection().describe(),
        "schema_version": profile.schema_version()?,
        "bytes": size,
        "preferences": {
            "active": count(S::Active), "pending": count(S::Pending),
            "rejected": count(S::Rejected), "superseded": count(S::Superseded),
        },
        "edits": edits.len(),
        "active_edits": edits.iter().filter(|e| e.edit.active).count(),
        "conversations": profile.conversations()?.len(),
        "jobs_waiting": jobs.iter().filter(|j| matches!(j.state, JobState::Queued | JobState::Running)).count(),
        "jobs_failed": jobs.iter().filter(|j| j.state == JobState::Failed).count(),
    });
    if json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "Profile: {} ({:.1} KiB)",
        files.db.display(),
        size as f64 / 1024.0
    );
    println!("Protection: {}", profile.protection().describe());
    println!("Schema version: {}", profile.schema_version()?);
    println!(
        "Preferences: {} active, {} pending review, {} rejected, {} superseded",
        count(S::Active),
        count(S::Pending),
        count(S::Rejected),
        count(S::Superseded)
    );
    println!(
        "Edits: {} ({} active)",
        edits.len(),
        edits.iter().filter(|e| e.edit.active).count()
    );
    println!("Conversations: {}", profile.conversations()?.len());
    println!(
        "Jobs: {} waiting, {} failed",
        summary["jobs_waiting"], summary["jobs_failed"]
    );
    Ok(ExitCode::SUCCESS)
}

pub fn history(app: &App, cmd: HistoryCommand) -> Result<ExitCode> {
    match cmd {
        HistoryCommand::List => {
            let profile = super::open_profile(app)?;
            let conversations = profile.conversations()?;
            if conversations.is_empty() {
                println!("No stored conversations.");
            }
            for c in conversations {
                let n = profile.messages(c.id)?.len();
                println!(
                    "{:>4}  {}  {:>3} message(s)  {}",
                    c.id,
                    when(c.updated),
                    n,
                    c.title
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        HistoryCommand::Show { id } => {
            let profile = super::open_profile(app)?;
            let messages = profile.messages(id)?;
            if messages.is_empty() && !profile.conversations()?.iter().any(|c| c.id == id) {
                bail!("no conversation with id {id}; `imprint history list` shows the ids");
            }
            for m in messages {
                println!("[{}] {}: {}", m.id, m.role, m.content);
            }
            Ok(ExitCode::SUCCESS)
        }
        HistoryCommand::Delete { id, yes } => {
            let mut profile = super::open_profile(app)?;
            if !yes
                && !confirm(&format!(
                    "Delete conversation {id} and the preferences learned only from it?"
                ))?
            {
                println!("Nothing was deleted.");
                return Ok(ExitCode::from(1));
            }
            let (removal, models) = profile.delete_conversation(id)?;
            imprint::learn::review::rebuild_adapters(&profile, &app.paths.cache_dir, &models)?;
            println!(
                "Deleted conversation {id} ({} message(s)); {} preference(s) learned only from it were forgotten, {} keep other sources.",
                removal.messages,
                removal.preferences_removed.len(),
                removal.preferences_kept.len()
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}
