//! Argument definitions and dispatch.

mod ask;
mod bench;
mod bench_serve;
mod calibrate;
mod chat;
mod config_cmd;
mod daemon;
mod edit;
mod eval;
mod import;
mod model;
mod prefs;
mod profile;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

use imprint::config::LoadedConfig;
use imprint::paths::Paths;

#[derive(Debug, Parser)]
#[command(
    name = "imprint",
    version,
    about = "A private assistant on your own machine that learns you by editing its own weights.",
    long_about = "imprint runs a local GGUF model through llama.cpp. Nothing leaves your machine.\n\nStart with `imprint model pull`, then `imprint chat` or `imprint ask \"...\"`."
)]
pub struct Cli {
    /// More log output (repeat for more). IMPRINT_LOG=<filter> gives full control.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Ask one question and stream the answer to stdout.
    Ask(ask::AskArgs),
    /// Chat in the terminal: full screen through the daemon (started if needed), or line mode (--line, pipes).
    Chat(chat::ChatArgs),
    /// Fetch, add, list and choose models.
    #[command(subcommand)]
    Model(model::ModelCommand),
    /// Show the effective configuration and where each value comes from.
    #[command(subcommand)]
    Config(config_cmd::ConfigCommand),
    /// Teach the model a preference by editing its weights; list or remove edits.
    Edit(edit::EditArgs),
    /// Choose the edit layer and learning rate for this model on a small generated set.
    Calibrate(calibrate::CalibrateArgs),
    /// Measure personalization quality on benchmark data.
    #[command(subcommand)]
    Eval(eval::EvalCommand),
    /// Measure speed.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// The encrypted profile: status, export, import, delete, audit log.
    #[command(subcommand)]
    Profile(profile::ProfileCommand),
    /// Review, approve, reject, change and forget learned preferences.
    #[command(subcommand)]
    Prefs(prefs::PrefsCommand),
    /// Learn from other assistants' chat histories (ChatGPT, Claude, JSONL, Markdown, text).
    Import(import::ImportArgs),
    /// Stored conversations: list, show, delete.
    #[command(subcommand)]
    History(profile::HistoryCommand),
    /// The learning job queue: list, or run the queued jobs now.
    #[command(subcommand)]
    Jobs(prefs::JobsCommand),
    /// The background service: one model for every client, learning while you chat, an OpenAI-compatible API.
    Daemon(daemon::DaemonArgs),
}

/// What every command gets: where files live and the effective config.
pub struct App {
    pub paths: Paths,
    pub config: LoadedConfig,
    /// Progress bars only when a person is watching stderr.
    pub interactive: bool,
}

impl App {
    /// A spinner on stderr, or nothing when no person is watching.
    pub fn spinner(&self, message: &str) -> indicatif::ProgressBar {
        if !self.interactive {
            return indicatif::ProgressBar::hidden();
        }
        let bar = indicatif::ProgressBar::new_spinner();
        bar.set_message(message.to_string());
        bar.enable_steady_tick(std::time::Duration::from_millis(120));
        bar
    }

    /// A progress bar over `len` steps. When stderr is not a terminal (a
    /// log file, a script), a plain line such as "eval upqa: 37/130, 12m
    /// elapsed" every half minute instead, so long runs in the background
    /// still say how far they are.
    pub fn progress(&self, len: u64, message: &str) -> indicatif::ProgressBar {
        let bar = indicatif::ProgressBar::new(len).with_message(message.to_string());
        if self.interactive {
            return bar;
        }
        if let Ok(style) =
            indicatif::ProgressStyle::with_template("{msg}: {pos}/{len}, {elapsed} elapsed")
        {
            bar.set_style(style);
        }
        bar.set_draw_target(indicatif::ProgressDrawTarget::term_like_with_hz(
            Box::new(LogLines::new(std::time::Duration::from_secs(30))),
            1,
        ));
        bar
    }
}

/// An indicatif terminal that writes the bar's text as a whole line at most
/// once per `every`, for logs, where cursor movement means nothing.
#[derive(Debug)]
struct LogLines {
    every: std::time::Duration,
    state: std::sync::Mutex<(String, Option<std::time::Instant>, String)>,
}

impl LogLines {
    fn new(every: std::time::Duration) -> Self {
        Self {
            every,
            // (text of the frame being drawn, when a line was last written, that line)
            state: std::sync::Mutex::new((String::new(), None, String::new())),
        }
    }
}

impl indicatif::TermLike for LogLines {
    fn width(&self) -> u16 {
        200
    }
    fn move_cursor_up(&self, _: usize) -> std::io::Result<()> {
        Ok(())
    }
    fn move_cursor_down(&self, _: usize) -> std::io::Result<()> {
        Ok(())
    }
    fn move_cursor_right(&self, _: usize) -> std::io::Result<()> {
        Ok(())
    }
    fn move_cursor_left(&self, _: usize) -> std::io::Result<()> {
        Ok(())
    }
    fn write_line(&self, s: &str) -> std::io::Result<()> {
        self.write_str(s)
    }
    fn write_str(&self, s: &str) -> std::io::Result<()> {
        if let Ok(mut state) = self.state.lock() {
            if !s.trim().is_empty() {
                state.0 = s.trim().to_string();
            }
        }
        Ok(())
    }
    fn clear_line(&self) -> std::io::Result<()> {
        Ok(())
    }
    fn flush(&self) -> std::io::Result<()> {
        let Ok(mut state) = self.state.lock() else {
            return Ok(());
        };
        let due = state.1.is_none_or(|t| t.elapsed() >= self.every);
        if due && !state.0.is_empty() && state.0 != state.2 {
            use std::io::Write;
            writeln!(std::io::stderr(), "{}", state.0)?;
            state.2 = state.0.clone();
            state.1 = Some(std::time::Instant::now());
        }
        Ok(())
    }
}

pub fn run(cli: Cli) -> Result<ExitCode> {
    let paths = Paths::discover()?;
    let config = LoadedConfig::load(&paths.config_file())
        .with_context(|| "could not load the configuration")?;
    // The daemon's log is its only voice: say what it does by default.
    let verbose = if matches!(cli.command, Command::Daemon(_)) {
        cli.verbose.max(1)
    } else {
        cli.verbose
    };
    init_tracing(verbose, config.config.logging.llama);
    let ctx = App {
        paths,
        config,
        interactive: std::io::stderr().is_terminal(),
    };
    match cli.command {
        Command::Ask(args) => ask::run(&ctx, args),
        Command::Chat(args) => chat::run(&ctx, args),
        Command::Model(cmd) => model::run(&ctx, cmd),
        Command::Config(cmd) => config_cmd::run(&ctx, cmd),
        Command::Edit(args) => edit::run(&ctx, args),
        Command::Eval(cmd) => eval::run(&ctx, cmd),
        Command::Calibrate(args) => calibrate::run(&ctx, args),
        Command::Bench(cmd) => bench::run(&ctx, cmd),
        Command::Profile(cmd) => profile::run(&ctx, cmd),
        Command::Prefs(cmd) => prefs::run(&ctx, cmd),
        Command::History(cmd) => profile::history(&ctx, cmd),
        Command::Import(args) => import::run(&ctx, args),
        Command::Daemon(args) => daemon::run(&ctx, args),
        Command::Jobs(cmd) => prefs::jobs(&ctx, cmd),
    }
}

fn init_tracing(verbose: u8, llama_logs: bool) {
    use tracing_subscriber::EnvFilter;
    // llama.cpp's own lines arrive under the target "llama-cpp-2" (the
    // bindings' crate name, dashes and all), not the module path.
    let default = match (verbose, llama_logs) {
        (0, false) => "warn,llama-cpp-2=off,llama_cpp_2=off",
        (0, true) => "warn,llama-cpp-2=info,llama_cpp_2=info",
        (1, _) => "info,llama-cpp-2=warn,llama_cpp_2=warn",
        _ => "debug",
    };
    let filter = std::env::var("IMPRINT_LOG")
        .ok()
        .and_then(|f| EnvFilter::try_new(f).ok())
        .unwrap_or_else(|| EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
    imprint::engine::init_logging();
}

/// Loads the engine for a command: `--model` (name or path) wins over config.
pub fn load_engine(
    ctx: &App,
    model: Option<&str>,
    personalized: bool,
) -> Result<imprint::engine::Engine> {
    let mut engine = load_engine_with_context(ctx, model, 0)?;
    if personalized {
        attach_active_edits(ctx, &mut engine)?;
    }
    Ok(engine)
}

/// [`load_engine`] without the profile's edits, with a context of at least
/// `context_size` tokens (long multi-turn evaluations ask for more than
/// the configured size).
pub fn load_engine_with_context(
    ctx: &App,
    model: Option<&str>,
    context_size: u32,
) -> Result<imprint::engine::Engine> {
    let path: PathBuf = imprint::models::resolve_model(&ctx.paths, &ctx.config.config, model)?;
    let mut options = imprint::engine::EngineOptions::from_config(&path, &ctx.config.config.engine);
    options.context_size = options.context_size.max(context_size);
    let spinner = ctx.spinner(&format!("loading {}", path.display()));
    let engine = imprint::engine::Engine::load(options);
    spinner.finish_and_clear();
    Ok(engine?)
}

/// The model's fingerprint and an editor for the engine's model.
pub fn load_editor(
    ctx: &App,
    engine: &imprint::engine::Engine,
    settings: imprint::editor::EditorSettings,
) -> Result<(String, imprint::editor::Editor)> {
    let path = &engine.options().model_path;
    let sha = imprint::models::fingerprint(&ctx.paths, path)?;
    let editor = imprint::editor::Editor::load(path, &sha, &ctx.paths.cache_dir, settings)?;
    Ok((sha, editor))
}

/// The passphrase source of every profile opened by this process. One
/// command can open the profile more than once (`chat` attaches the active
/// edits, then keeps the profile for the conversation): the person is
/// asked once, not once per open (a fresh `make run` used to ask three
/// times).
fn passphrase_source() -> &'static imprint::profile::Remembered<imprint::profile::EnvOrPrompt> {
    use imprint::profile::{EnvOrPrompt, Remembered};
    static SOURCE: std::sync::OnceLock<Remembered<EnvOrPrompt>> = std::sync::OnceLock::new();
    SOURCE.get_or_init(|| Remembered::new(EnvOrPrompt))
}

/// Opens the profile, creating it (encrypted) on first use. Notices about
/// how it was protected, and edits moved in from older versions, go to
/// stderr: nothing about the key is ever decided silently.
pub fn open_profile(ctx: &App) -> Result<imprint::profile::Profile> {
    use imprint::profile::Profile;
    let (mut profile, notice) = Profile::open_or_create(&ctx.paths, passphrase_source())
        .with_context(|| {
            format!(
                "cannot open the profile in {}",
                ctx.paths.data_dir.display()
            )
        })?;
    if let Some(notice) = notice {
        eprintln!("imprint: {notice}");
    }
    let moved = profile.adopt_legacy_edits(&ctx.paths.data_dir)?;
    if moved > 0 {
        eprintln!(
            "imprint: moved {moved} edit(s) from the old edits folder into the encrypted profile"
        );
    }
    Ok(profile)
}

/// What the profile records about the engine's model.
pub fn model_record(
    ctx: &App,
    engine: &imprint::engine::Engine,
    editor: Option<&imprint::editor::Editor>,
) -> Result<imprint::profile::edits::ModelRecord> {
    let path = &engine.options().model_path;
    let summary = engine.summary();
    Ok(imprint::profile::edits::ModelRecord {
        sha256: imprint::models::fingerprint(&ctx.paths, path)?,
        path: path.display().to_string(),
        architecture: summary.architecture.clone(),
        n_layer: summary.n_layer as usize,
        n_embd: summary.n_embd as usize,
        n_ff: editor.map(|e| e.model().config.n_ff).unwrap_or(0),
    })
}

/// The attached adapter is rebuilt from the profile: the one place the
/// assembled weights come from.
pub fn attach_active_edits(ctx: &App, engine: &mut imprint::engine::Engine) -> Result<usize> {
    let profile = open_profile(ctx)?;
    attach_from(ctx, &profile, engine)
}

pub fn attach_from(
    ctx: &App,
    profile: &imprint::profile::Profile,
    engine: &mut imprint::engine::Engine,
) -> Result<usize> {
    let sha = imprint::models::fingerprint(&ctx.paths, &engine.options().model_path)?;
    let active = profile.active_edits(&sha)?.len();
    let architecture = engine.summary().architecture.clone();
    let adapter = profile.assemble_adapter(&ctx.paths.cache_dir, &sha, &architecture)?;
    if let Some(path) = &adapter {
        imprint::editor::adapter::check_adapter(path, &architecture, &sha)?;
    }
    engine.set_adapter(adapter.as_deref())?;
    Ok(active)
}
