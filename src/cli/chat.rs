//! `imprint chat`: the full-screen chat (`imprint::tui`, a client of the
//! daemon) in a terminal; the line-mode chat below over pipes, in dumb
//! terminals, with `--line`, or with the options only it has.

use std::io::{BufRead, Write};
use std::ops::ControlFlow;
use std::process::ExitCode;

use anyhow::Result;
use clap::Args;

use imprint::engine::{ChatMessage, GenerationParams, Sampling};

use super::App;

#[derive(Debug, Args)]
pub struct ChatArgs {
    /// A model name from `imprint model list`, or a path to a GGUF file.
    #[arg(long)]
    model: Option<String>,
    /// Answer with the base model, ignoring your edits.
    #[arg(long)]
    no_profile: bool,
    /// System prompt (default: [generation] system_prompt).
    #[arg(long)]
    system: Option<String>,
    /// Deterministic replies.
    #[arg(long)]
    greedy: bool,
    /// Store nothing: the conversation is not kept in the profile.
    #[arg(long)]
    incognito: bool,
    /// The line-mode chat, in this process, even in a terminal that could show the full-screen one.
    #[arg(long)]
    line: bool,
}

/// Whether the full-screen chat can run here.
fn full_screen_possible(args: &ChatArgs) -> bool {
    use std::io::IsTerminal;
    let line_only = args.line || args.no_profile || args.system.is_some() || args.greedy;
    let dumb = std::env::var("TERM").map_or(true, |t| t.is_empty() || t == "dumb");
    !line_only && !dumb && std::io::stdin().is_terminal() && std::io::stdout().is_terminal()
}

fn full_screen(app: &App, args: ChatArgs) -> Result<ExitCode> {
    let mut daemon_args = Vec::new();
    if let Some(model) = &args.model {
        daemon_args.extend(["--model".to_string(), model.clone()]);
    }
    let daemon_passphrase = super::daemon::unlock_for_daemon(app)?;
    imprint::tui::run(imprint::tui::ChatOptions {
        paths: app.paths.clone(),
        daemon_args,
        daemon_passphrase,
        color: std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty()),
        incognito: args.incognito,
    })?;
    Ok(ExitCode::SUCCESS)
}

/// The conversation as stored in the profile (created with the first
/// message, so an empty chat leaves nothing behind).
struct Stored {
    profile: imprint::profile::Profile,
    conversation: Option<i64>,
}

impl Stored {
    fn add(&mut self, role: &str, content: &str) -> Result<i64> {
        let id = match self.conversation {
            Some(id) => id,
            None => {
                let title: String = content.chars().take(60).collect();
                let id = self.profile.create_conversation(title.trim())?;
                self.conversation = Some(id);
                id
            }
        };
        Ok(self.profile.add_message(id, role, content)?)
    }
}

/// Learns from one user message and says what happened, on stderr.
fn capture(
    app: &App,
    stored: &mut Stored,
    message_id: i64,
    text: &str,
    sha: &str,
    engine: &mut imprint::engine::Engine,
) -> Result<()> {
    let learning = &app.config.config.learning;
    let settings = imprint::learn::capture::CaptureSettings::from(learning);
    let report = imprint::learn::capture::capture_message(
        &mut stored.profile,
        message_id,
        text,
        &settings,
        Some(sha),
        learning.llm_extractor.then_some(engine),
    )?;
    for id in report.learned.iter().chain(&report.pending) {
        let p = stored.profile.preference(*id)?;
        eprintln!(
            "(noted #{}: {} → {}{})",
            p.id,
            p.attribute,
            p.target,
            if p.status == imprint::profile::PreferenceStatus::Pending {
                ", waiting for your review: imprint prefs approve/reject"
            } else {
                ""
            }
        );
    }
    for (old, new) in &report.superseded {
        eprintln!("(preference #{new} replaces #{old})");
    }
    if !report.jobs.is_empty() {
        eprintln!(
            "({} edit job(s) queued: `imprint jobs run` writes them into the weights)",
            report.jobs.len()
        );
    }
    if report.secrets_skipped.total() > 0 {
        eprintln!(
            "(not learned, never stored as a preference: {})",
            report.secrets_skipped.describe()
        );
    }
    Ok(())
}

pub fn run(app: &App, args: ChatArgs) -> Result<ExitCode> {
    if full_screen_possible(&args) {
        return full_screen(app, args);
    }
    let gen = &app.config.config.generation;
    let mut engine = super::load_engine(app, args.model.as_deref(), !args.no_profile)?;
    let sha = imprint::models::fingerprint(&app.paths, &engine.options().model_path)?;
    let mut stored = if args.incognito {
        None
    } else {
        Some(Stored {
            profile: super::open_profile(app)?,
            conversation: None,
        })
    };
    let system = ChatMessage::system(args.system.unwrap_or_else(|| gen.system_prompt.clone()));
    let mut messages = vec![system.clone()];
    let params = GenerationParams {
        max_tokens: gen.max_tokens,
        sampling: if args.greedy {
            Sampling::Greedy
        } else {
            Sampling::from_config(gen)
        },
        grammar: None,
    };
    let interactive = std::io::IsTerminal::is_terminal(&std::io::stdin());
    if interactive {
        eprintln!(
            "imprint chat on {} — /reset starts over, /exit or Ctrl-D quits.{}",
            engine.options().model_path.display(),
            if stored.is_none() {
                " Incognito: nothing is stored."
            } else {
                ""
            }
        );
    }
    let stdin = std::io::stdin();
    let mut stdout = std::io::stdout();
    let mut line = String::new();
    loop {
        if interactive {
            eprint!("\n> ");
        }
        line.clear();
        if stdin.lock().read_line(&mut line)? == 0 {
            break;
        }
        let input = line.trim();
        match input {
            "" => continue,
            "/exit" | "/quit" => break,
            "/reset" => {
                messages.truncate(1);
                engine.reset();
                if let Some(s) = &mut stored {
                    s.conversation = None;
                }
                eprintln!("(conversation cleared)");
                continue;
            }
            _ => {}
        }
        messages.push(ChatMessage::user(input));
        if let Some(s) = &mut stored {
            let id = s.add("user", input)?;
            if app.config.config.learning.capture {
                capture(app, s, id, input, &sha, &mut engine)?;
            }
        }
        let generation = engine.chat(&messages, &params, &mut |text| {
            let _ = stdout.write_all(text.as_bytes());
            let _ = stdout.flush();
            ControlFlow::Continue(())
        })?;
        println!();
        if generation.dropped_messages > 0 {
            eprintln!(
                "(the conversation outgrew the context: the oldest {} messages are no longer seen by the model)",
                generation.dropped_messages
            );
            messages.drain(1..1 + generation.dropped_messages);
        }
        if let Some(s) = &mut stored {
            s.add("assistant", &generation.text)?;
        }
        messages.push(ChatMessage::assistant(generation.text));
    }
    Ok(ExitCode::SUCCESS)
}
