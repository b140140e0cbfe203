//! `imprint chat`: the full-screen terminal chat, a client of the daemon.
//!
//! - [`app`]: the state and what keys do to it (no I/O);
//! - [`ui`]: drawing that state (no state changes beyond layout feedback);
//! - [`link`]: the async task that talks to the daemon;
//! - [`markdown`], [`input`]: reply rendering and the message editor.
//!
//! One event loop, on the main thread, receives everything as
//! [`AppEvent`]s from one channel: keys, mouse and resizes (read on a
//! thread of their own), what the daemon says (from the link), and ticks.
//! Each event updates the state; then the screen is redrawn.
//!
//! The terminal is restored on every way out: normal exit, error (the
//! guard's `Drop`) and panic (a hook that restores before the message is
//! printed).

pub mod app;
pub mod input;
pub mod link;
pub mod markdown;
pub mod ui;

use std::io::Write;
use std::time::Duration;

use ratatui::backend::CrosstermBackend;
use ratatui::crossterm::event::{
    self, DisableBracketedPaste, DisableMouseCapture, EnableBracketedPaste, EnableMouseCapture,
    Event,
};
use ratatui::crossterm::execute;
use ratatui::crossterm::terminal::{self, EnterAlternateScreen, LeaveAlternateScreen};
use ratatui::Terminal;
use tokio::sync::mpsc::{unbounded_channel, UnboundedSender};

use crate::paths::Paths;
use app::{Action, App, DaemonMsg};

/// Everything the event loop reacts to.
pub enum AppEvent {
    Terminal(Event),
    Daemon(DaemonMsg),
    Tick,
}

pub struct ChatOptions {
    pub paths: Paths,
    /// Arguments for starting a daemon when none runs (e.g. `--model`).
    pub daemon_args: Vec<String>,
    /// False with NO_COLOR set.
    pub color: bool,
    /// Start in an incognito session.
    pub incognito: bool,
    /// The profile's passphrase for a daemon started from here (see
    /// `daemon::client::start_in_background`).
    pub daemon_passphrase: Option<zeroize::Zeroizing<String>>,
}

/// Restores the terminal when dropped (normal exit and errors).
struct TerminalGuard;

impl TerminalGuard {
    fn enter() -> std::io::Result<Self> {
        terminal::enable_raw_mode()?;
        let guard = TerminalGuard;
        execute!(
            std::io::stdout(),
            EnterAlternateScreen,
            EnableMouseCapture,
            EnableBracketedPaste
        )?;
        Ok(guard)
    }
}

fn restore_terminal() {
    let _ = terminal::disable_raw_mode();
    let _ = execute!(
        std::io::stdout(),
        DisableBracketedPaste,
        DisableMouseCapture,
        LeaveAlternateScreen,
        ratatui::crossterm::cursor::Show
    );
}

impl Drop for TerminalGuard {
    fn drop(&mut self) {
        restore_terminal();
    }
}

/// Copies text through the terminal (OSC 52): works over SSH and in tmux
/// (with `set-clipboard on`), needs no clipboard library or display
/// server, and does nothing harmful where unsupported.
fn copy_to_clipboard(text: &str) {
    use base64_lite::encode;
    let mut out = std::io::stdout();
    let _ = write!(out, "\x1b]52;c;{}\x07", encode(text.as_bytes()));
    let _ = out.flush();
}

/// Base64 for OSC 52, the one place imprint needs it.
mod base64_lite {
    const TABLE: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

    pub fn encode(bytes: &[u8]) -> String {
        let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
        for chunk in bytes.chunks(3) {
            let b = [
                chunk[0],
                *chunk.get(1).unwrap_or(&0),
                *chunk.get(2).unwrap_or(&0),
            ];
            let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
            for i in 0..4 {
                if i <= chunk.len() {
                    out.push(TABLE[((n >> (18 - 6 * i)) & 63) as usize] as char);
                } else {
                    out.push('=');
                }
            }
        }
        out
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn matches_the_rfc_examples() {
            for (plain, coded) in [
                ("", ""),
                ("f", "Zg=="),
                ("fo", "Zm8="),
                ("foo", "Zm9v"),
                ("foobar", "Zm9vYmFy"),
            ] {
                assert_eq!(super::encode(plain.as_bytes()), coded);
            }
        }
    }
}

/// Reads terminal events on a thread of its own (crossterm's reads block).
fn spawn_input_reader(tx: UnboundedSender<AppEvent>) {
    std::thread::spawn(move || loop {
        match event::poll(Duration::from_millis(250)) {
            Ok(true) => match event::read() {
                Ok(e) => {
                    if tx.send(AppEvent::Terminal(e)).is_err() {
                        return;
                    }
                }
                Err(_) => return,
            },
            Ok(false) => {
                if tx.send(AppEvent::Tick).is_err() {
                    return;
                }
            }
            Err(_) => return,
        }
    });
}

/// Runs the chat until the user quits.
pub fn run(options: ChatOptions) -> std::io::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let (tx, mut rx) = unbounded_channel::<AppEvent>();

    // What the daemon says, into the one loop.
    let (daemon_tx, mut daemon_rx) = unbounded_channel::<DaemonMsg>();
    let forward = tx.clone();
    rt.spawn(async move {
        while let Some(msg) = daemon_rx.recv().await {
            if forward.send(AppEvent::Daemon(msg)).is_err() {
                break;
            }
        }
    });
    let actions = {
        let _enter = rt.enter();
        link::spawn(
            options.paths.clone(),
            options.daemon_args.clone(),
            options.daemon_passphrase.clone(),
            daemon_tx,
        )
    };
    if options.incognito {
        // Waits in the link's queue until the daemon answers.
        let _ = actions.send(Action::NewSession { incognito: true });
    }

    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        restore_terminal();
        default_hook(info);
    }));
    let guard = TerminalGuard::enter()?;
    let mut terminal = Terminal::new(CrosstermBackend::new(std::io::stdout()))?;
    spawn_input_reader(tx.clone());

    let mut app = App::new(options.color);
    terminal.draw(|f| ui::draw(f, &mut app))?;
    while let Some(event) = rx.blocking_recv() {
        let mut requested: Vec<Action> = Vec::new();
        match event {
            AppEvent::Terminal(Event::Key(key)) => requested = app.on_key(key),
            AppEvent::Terminal(Event::Mouse(m)) => app.on_mouse(m.kind),
            AppEvent::Terminal(Event::Paste(text)) => app.on_paste(&text),
            AppEvent::Terminal(Event::Resize(..)) => terminal.autoresize()?,
            AppEvent::Terminal(_) => {}
            AppEvent::Daemon(msg) => app.on_daemon(msg),
            AppEvent::Tick => {}
        }
        for action in requested {
            match action {
                Action::Copy(text) => {
                    copy_to_clipboard(&text);
                    app.on_daemon(DaemonMsg::Notice("Copied the last answer (through the terminal; in tmux, `set -g set-clipboard on`).".into()));
                }
                other => {
                    let _ = actions.send(other);
                }
            }
        }
        if app.quit {
            break;
        }
        terminal.draw(|f| ui::draw(f, &mut app))?;
    }
    drop(actions);
    drop(guard);
    rt.shutdown_timeout(Duration::from_millis(500));
    Ok(())
}
