//! `imprint daemon`: run, start, stop and inspect the background service,
//! show the HTTP token, and install it to start at login.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use serde_json::json;

use imprint::daemon::client::{self, Client};
use imprint::daemon::runtime::{self, RuntimeFiles};
use imprint::daemon::{DaemonOptions, ModelInfo};
use imprint::editor::Method;
use imprint::profile::{EnvOrPrompt, Remembered};

use super::App;

#[derive(Debug, Args)]
pub struct DaemonArgs {
    #[command(subcommand)]
    command: Option<DaemonCommand>,
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Debug, Args, Clone, Default)]
pub struct ServeArgs {
    /// Also serve the OpenAI-compatible API here (loopback only), e.g. 127.0.0.1:8741.
    #[arg(long, value_name = "ADDR")]
    http: Option<SocketAddr>,
    /// A model name from `imprint model list`, or a path to a GGUF file.
    #[arg(long)]
    model: Option<String>,
}

impl ServeArgs {
    /// The same choices, as arguments for a daemon started in the background.
    fn to_args(&self) -> Vec<String> {
        let mut args = Vec::new();
        if let Some(addr) = self.http {
            args.extend(["--http".to_string(), addr.to_string()]);
        }
        if let Some(model) = &self.model {
            args.extend(["--model".to_string(), model.clone()]);
        }
        args
    }
}

#[derive(Debug, Subcommand)]
enum DaemonCommand {
    /// Run in the foreground (what `imprint daemon` alone does; systemd/launchd use this).
    Run(ServeArgs),
    /// Start in the background and return once it is ready.
    Start(ServeArgs),
    /// Stop a running daemon gracefully (an edit in progress finishes first).
    Stop,
    /// Is it running, with which model, how many edits, what is queued.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Show the bearer token of the HTTP endpoint (created on first use).
    Token {
        /// Replace it with a new one (clients must be given the new one).
        #[arg(long)]
        rotate: bool,
        /// Delete it.
        #[arg(long, conflicts_with = "rotate")]
        revoke: bool,
    },
    /// Start the daemon at login: writes and enables a systemd user unit (Linux) or a launchd agent (macOS).
    Install {
        #[command(flatten)]
        serve: ServeArgs,
        /// Print the unit instead of installing it.
        #[arg(long)]
        print: bool,
    },
    /// Stop starting it at login, and remove the unit.
    Uninstall,
}

pub fn run(app: &App, args: DaemonArgs) -> Result<ExitCode> {
    match args.command {
        None => serve(app, args.serve),
        Some(DaemonCommand::Run(serve_args)) => serve(app, serve_args),
        Some(DaemonCommand::Start(serve_args)) => start(app, serve_args),
        Some(DaemonCommand::Stop) => stop(app),
        Some(DaemonCommand::Status { json }) => status(app, json),
        Some(DaemonCommand::Token { rotate, revoke }) => token(app, rotate, revoke),
        Some(DaemonCommand::Install { serve, print }) => install(app, serve, print),
        Some(DaemonCommand::Uninstall) => uninstall(app),
    }
}

/// A small runtime for the CLI's client calls.
pub fn block_on<F: std::future::Future>(future: F) -> Result<F::Output> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    Ok(rt.block_on(future))
}

fn serve(app: &App, args: ServeArgs) -> Result<ExitCode> {
    if let Some(addr) = args.http {
        if !addr.ip().is_loopback() {
            return Err(imprint::daemon::DaemonError::NotLoopback(addr).into());
        }
    }
    let path =
        imprint::models::resolve_model(&app.paths, &app.config.config, args.model.as_deref())?;
    let sha = imprint::models::fingerprint(&app.paths, &path)?;
    let engine = imprint::engine::EngineOptions::from_config(&path, &app.config.config.engine);
    let summary = imprint::models::gguf::inspect_gguf(&path)?;
    let editor = super::prefs::default_settings(app, &sha, Method::Ftm)?;
    let http = match args.http {
        Some(addr) => {
            let (token, store) = imprint::daemon::token::load_or_create(&app.paths, false)?;
            tracing::info!("HTTP bearer token kept in {store}");
            Some((addr, token))
        }
        None => None,
    };
    let grace = std::env::var("IMPRINT_DAEMON_GRACE_S")
        .ok()
        .and_then(|v| v.parse().ok())
        .map(Duration::from_secs)
        .unwrap_or(Duration::from_secs(60));
    let options = DaemonOptions {
        paths: app.paths.clone(),
        config: app.config.config.clone(),
        model: ModelInfo {
            name: path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "imprint".into()),
            path: path.clone(),
            sha256: sha,
            architecture: summary.architecture.clone(),
            gpu_layers: engine.n_gpu_layers,
            n_ctx: 0,
            n_layer: 0,
        },
        engine,
        editor,
        http,
        grace,
    };
    imprint::daemon::run(options, Arc::new(Remembered::new(EnvOrPrompt)))
        .context("the daemon stopped with an error")?;
    Ok(ExitCode::SUCCESS)
}

fn start(app: &App, args: ServeArgs) -> Result<ExitCode> {
    let files = RuntimeFiles::new(&app.paths);
    if block_on(Client::connect(&app.paths))?.is_ok() {
        println!(
            "The daemon is already running ({}).",
            files.socket.display()
        );
        return Ok(ExitCode::SUCCESS);
    }
    let spinner = app.spinner("starting the daemon (loading the model)");
    let passphrase = unlock_for_daemon(app)?;
    let started = block_on(client::start_in_background(
        &app.paths,
        &args.to_args(),
        passphrase.as_deref().map(String::as_str),
    ))?;
    spinner.finish_and_clear();
    started?;
    println!(
        "The daemon is running: socket {}, log {}.",
        files.socket.display(),
        client::log_file(&app.paths).display()
    );
    Ok(ExitCode::SUCCESS)
}

/// Opens (or creates) the profile here, where a person can answer a
/// prompt, before a daemon is started in the background: a daemon has no
/// terminal to ask for a passphrase on. Returns the passphrase it will
/// need, when the profile has one and IMPRINT_PASSPHRASE does not give it.
pub fn unlock_for_daemon(app: &App) -> Result<Option<zeroize::Zeroizing<String>>> {
    if block_on(Client::connect(&app.paths))?.is_ok() {
        return Ok(None);
    }
    let source = Remembered::new(EnvOrPrompt);
    let (profile, notice) = imprint::profile::Profile::open_or_create(&app.paths, &source)
        .with_context(|| {
            format!(
                "cannot open the profile in {}",
                app.paths.data_dir.display()
            )
        })?;
    if let Some(notice) = notice {
        eprintln!("imprint: {notice}");
    }
    let needs = matches!(
        profile.protection(),
        imprint::profile::Protection::Passphrase { .. }
    ) && std::env::var_os("IMPRINT_PASSPHRASE").is_none();
    drop(profile);
    Ok(if needs { source.remembered() } else { None })
}

fn stop(app: &App) -> Result<ExitCode> {
    let files = RuntimeFiles::new(&app.paths);
    if !runtime::is_locked(&files) {
        println!("The daemon is not running.");
        return Ok(ExitCode::SUCCESS);
    }
    let asked = block_on(async {
        let mut c = Client::connect(&app.paths).await?;
        c.call("shutdown", json!({})).await
    })?;
    if asked.is_err() {
        // Not answering on the socket: fall back to the signal.
        if let Some(pid) = runtime::read_pid(&files.lock) {
            // SAFETY: kill with a pid read from our own lock file.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
        }
    }
    let spinner = app.spinner("stopping the daemon (an edit in progress finishes first)");
    let deadline = Instant::now() + Duration::from_secs(180);
    while runtime::is_locked(&files) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    spinner.finish_and_clear();
    if runtime::is_locked(&files) {
        bail!(
            "the daemon is still running after 3 minutes; its log is {}",
            client::log_file(&app.paths).display()
        );
    }
    println!("The daemon has stopped.");
    Ok(ExitCode::SUCCESS)
}

fn status(app: &App, as_json: bool) -> Result<ExitCode> {
    let files = RuntimeFiles::new(&app.paths);
    let status = block_on(async {
        let mut c = Client::connect(&app.paths).await?;
        c.call("status", json!({})).await
    })?;
    let status = match status {
        Ok(s) => s,
        Err(e) => {
            if as_json {
                println!(
                    "{}",
                    json!({ "running": false, "socket": files.socket, "error": e.to_string() })
                );
            } else if files.socket.exists() || runtime::is_locked(&files) {
                println!(
                    "Cannot talk to the daemon on {}: {e}",
                    files.socket.display()
                );
            } else {
                println!("The daemon is not running. `imprint daemon start` starts it.");
            }
            return Ok(ExitCode::from(3));
        }
    };
    if as_json {
        println!("{}", serde_json::to_string_pretty(&status)?);
        return Ok(ExitCode::SUCCESS);
    }
    let s = |v: &serde_json::Value| v.as_str().unwrap_or("?").to_string();
    let n = |v: &serde_json::Value| v.as_u64().unwrap_or(0);
    println!(
        "Running as pid {} for {:.0} s (protocol {}).",
        n(&status["pid"]),
        status["uptime_s"].as_f64().unwrap_or(0.0),
        n(&status["protocol"])
    );
    println!("  socket:   {}", files.socket.display());
    println!("  log:      {}", client::log_file(&app.paths).display());
    println!(
        "  model:    {} ({}, {} GPU layers, context {})",
        s(&status["model"]["name"]),
        s(&status["model"]["architecture"]),
        n(&status["model"]["gpu_layers"]),
        n(&status["model"]["n_ctx"])
    );
    println!(
        "  edits:    {} active (adapter generation {})",
        n(&status["adapter"]["active_edits"]),
        n(&status["adapter"]["generation"])
    );
    println!(
        "  jobs:     {} queued, {} running, {} failed; editor {}{}",
        n(&status["queue"]["queued"]),
        n(&status["queue"]["running"]),
        n(&status["queue"]["failed"]),
        s(&status["worker"]["state"]),
        status["worker"]["stage"]
            .as_str()
            .map(|st| format!(" ({st})"))
            .unwrap_or_default()
    );
    println!(
        "  sessions: {}, clients connected: {}",
        n(&status["sessions"]),
        n(&status["clients"])
    );
    Ok(ExitCode::SUCCESS)
}

fn token(app: &App, rotate: bool, revoke: bool) -> Result<ExitCode> {
    if revoke {
        imprint::daemon::token::revoke(&app.paths)?;
        println!(
            "The HTTP token is deleted; a running daemon keeps the old one until it restarts."
        );
        return Ok(ExitCode::SUCCESS);
    }
    let (token, store) = imprint::daemon::token::load_or_create(&app.paths, rotate)?;
    println!("{token}");
    eprintln!("(kept in {store}; give it to clients as the API key, e.g. OPENAI_API_KEY)");
    if rotate {
        eprintln!("(a running daemon keeps the old token until it restarts)");
    }
    Ok(ExitCode::SUCCESS)
}

const SYSTEMD_UNIT: &str = include_str!("../../packaging/systemd/imprint.service");
const LAUNCHD_PLIST: &str = include_str!("../../packaging/launchd/dev.imprint.daemon.plist");

fn unit_path() -> Result<PathBuf> {
    let home = directories::BaseDirs::new().context("cannot find your home directory")?;
    Ok(if cfg!(target_os = "macos") {
        home.home_dir()
            .join("Library/LaunchAgents/dev.imprint.daemon.plist")
    } else {
        home.config_dir().join("systemd/user/imprint.service")
    })
}

fn render_unit(app: &App, args: &ServeArgs) -> Result<String> {
    let exe = std::env::current_exe().context("cannot find the imprint binary")?;
    let exe = exe.display().to_string();
    let extra = args.to_args();
    let log = client::log_file(&app.paths);
    if cfg!(target_os = "macos") {
        let arguments: String = std::iter::once(exe.as_str())
            .chain(["daemon", "run"])
            .chain(extra.iter().map(String::as_str))
            .map(|a| format!("    <string>{a}</string>\n"))
            .collect();
        Ok(LAUNCHD_PLIST
            .replace("@ARGUMENTS@\n", &arguments)
            .replace("@LOG@", &log.display().to_string()))
    } else {
        let command = std::iter::once(exe)
            .chain(["daemon".into(), "run".into()])
            .chain(extra)
            .collect::<Vec<_>>()
            .join(" ");
        Ok(SYSTEMD_UNIT.replace("@COMMAND@", &command))
    }
}

fn install(app: &App, args: ServeArgs, print: bool) -> Result<ExitCode> {
    let unit = render_unit(app, &args)?;
    if print {
        print!("{unit}");
        return Ok(ExitCode::SUCCESS);
    }
    let path = unit_path()?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    std::fs::write(&path, unit).with_context(|| format!("cannot write {}", path.display()))?;
    println!("Wrote {}.", path.display());
    let enabled = if cfg!(target_os = "macos") {
        std::process::Command::new("launchctl")
            .arg("load")
            .arg("-w")
            .arg(&path)
            .status()
    } else {
        std::process::Command::new("systemctl")
            .args(["--user", "daemon-reload"])
            .status()
            .and_then(|_| {
                std::process::Command::new("systemctl")
                    .args(["--user", "enable", "--now", "imprint.service"])
                    .status()
            })
    };
    match enabled {
        Ok(s) if s.success() => {
            if cfg!(target_os = "macos") {
                println!("Loaded: the daemon starts at login. Logs: {}.", client::log_file(&app.paths).display());
            } else {
                println!("Enabled and started: the daemon starts at login. Logs: journalctl --user -u imprint.");
            }
        }
        Ok(s) => println!(
            "The unit is written, but enabling it failed ({s}). Enable it by hand: {}",
            if cfg!(target_os = "macos") { "launchctl load -w <plist>" } else { "systemctl --user enable --now imprint.service" }
        ),
        Err(e) => println!(
            "The unit is written, but the service manager could not be run ({e}). Without one, start the daemon with `imprint daemon start`."
        ),
    }
    Ok(ExitCode::SUCCESS)
}

fn uninstall(_app: &App) -> Result<ExitCode> {
    let path = unit_path()?;
    if cfg!(target_os = "macos") {
        let _ = std::process::Command::new("launchctl")
            .arg("unload")
            .arg(&path)
            .status();
    } else {
        let _ = std::process::Command::new("systemctl")
            .args(["--user", "disable", "--now", "imprint.service"])
            .status();
    }
    match std::fs::remove_file(&path) {
        Ok(()) => println!("Removed {}.", path.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => println!("Nothing was installed."),
        Err(e) => bail!("cannot remove {}: {e}", path.display()),
    }
    Ok(ExitCode::SUCCESS)
}
