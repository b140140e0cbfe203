//! The full-screen chat, end to end: the real binary in a real terminal
//! (tmux), starting a real daemon on the real model. A question is
//! answered on screen, a stated preference appears for review and is
//! approved from the preferences pane, and quitting gives the terminal
//! back.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

struct Tmux {
    socket: String,
}

impl Tmux {
    /// A tmux server of its own (`name` keeps tests that run at once
    /// apart) whose session "chat", `width` × `height`, runs
    /// `env <env> IMPRINT_HOME=<home> imprint <args> --model <the test
    /// model>` (`env` may start with options such as `-u`), then prints `EXITED <status>`
    /// and stays open so the screen can still be read.
    fn start(name: &str, home: &Path, env: &str, args: &str, (width, height): (u32, u32)) -> Self {
        if Command::new("tmux").arg("-V").output().is_err() {
            panic!("tmux is missing: `make test` installs it");
        }
        let tmux = Tmux {
            socket: format!("imprint-test-{}-{name}", std::process::id()),
        };
        let command = format!(
            "env {env} IMPRINT_HOME={} TERM=xterm-256color {} {args} --model {}; echo EXITED $?; sleep 120",
            shell_quote(&home.display().to_string()),
            shell_quote(env!("CARGO_BIN_EXE_imprint")),
            shell_quote(&common::model_path().display().to_string()),
        );
        let (w, h) = (width.to_string(), height.to_string());
        let status = tmux
            .cmd()
            .args([
                "new-session",
                "-d",
                "-s",
                "chat",
                "-x",
                &w,
                "-y",
                &h,
                &command,
            ])
            .status()
            .unwrap();
        assert!(status.success());
        tmux
    }

    fn cmd(&self) -> Command {
        let mut c = Command::new("tmux");
        c.args(["-L", &self.socket, "-f", "/dev/null"]);
        c
    }

    fn capture(&self) -> String {
        let out = self
            .cmd()
            .args(["capture-pane", "-p", "-t", "chat"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn keys(&self, keys: &[&str]) {
        let status = self
            .cmd()
            .args(["send-keys", "-t", "chat"])
            .args(keys)
            .status()
            .unwrap();
        assert!(status.success());
    }

    fn typed(&self, text: &str) {
        let status = self
            .cmd()
            .args(["send-keys", "-t", "chat", "-l", text])
            .status()
            .unwrap();
        assert!(status.success());
    }

    fn display(&self, format: &str) -> String {
        let out = self
            .cmd()
            .args(["display-message", "-p", "-t", "chat", format])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// Waits until the screen satisfies `ok`; fails with the screen.
    fn wait_for(&self, what: &str, limit: Duration, ok: impl Fn(&str) -> bool) -> String {
        let start = Instant::now();
        loop {
            let screen = self.capture();
            if ok(&screen) {
                return screen;
            }
            assert!(
                start.elapsed() < limit,
                "timed out waiting for {what}. The screen:\n{screen}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.cmd().arg("kill-server").status();
    }
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

fn stop_daemon(home: &Path) {
    let _ = common::imprint_at(home)
        .env("IMPRINT_DAEMON_GRACE_S", "1")
        .args(["daemon", "stop"])
        .output();
}

/// The chat pane's text after the header line `imprint`, up to the next
/// blank line: the reply.
fn reply_after_question(screen: &str, question: &str) -> String {
    let chat_column = |line: &str| -> String {
        // The chat pane is the box on the right: after the side panes.
        let cols: Vec<char> = line.chars().collect();
        let start = cols.iter().position(|&c| c == '│').map_or(0, |first| {
            cols[first + 1..]
                .iter()
                .position(|&c| c == '│')
                .map_or(0, |i| first + 1 + i + 1)
        });
        cols.get(start + 1..)
            .map(|c| {
                c.iter()
                    .collect::<String>()
                    .trim_end_matches('│')
                    .trim()
                    .to_string()
            })
            .unwrap_or_default()
    };
    let lines: Vec<String> = screen.lines().map(chat_column).collect();
    let Some(q) = lines.iter().position(|l| l.contains(question)) else {
        return String::new();
    };
    let Some(header) = lines[q..].iter().position(|l| l.starts_with("imprint")) else {
        return String::new();
    };
    lines[q + header + 1..]
        .iter()
        .take_while(|l| !l.is_empty())
        .cloned()
        .collect::<Vec<_>>()
        .join(" ")
}

#[test]
fn chat_answers_learns_is_approved_and_restores_the_terminal() {
    let home = tempfile::tempdir().unwrap();
    let tmux = Tmux::start(
        "tui",
        home.path(),
        "IMPRINT_PASSPHRASE=tui-test IMPRINT_DAEMON_GRACE_S=1",
        "chat",
        (100, 30),
    );
    let result = std::panic::catch_unwind(|| {
        // The chat starts the daemon itself.
        tmux.wait_for("the daemon connection", Duration::from_secs(120), |s| {
            s.contains("● connected")
        });
        assert_eq!(tmux.display("#{alternate_on}"), "1", "full screen");

        // 1. A question, answered on screen.
        tmux.typed("What is the capital of France?");
        tmux.keys(&["Enter"]);
        let screen = tmux.wait_for("a complete reply", Duration::from_secs(120), |s| {
            s.contains("Enter sends")
                && !reply_after_question(s, "What is the capital of France?").is_empty()
        });
        assert!(screen.contains("you"), "{screen}");

        // 2. A preference, stated; it waits for review in the pane.
        tmux.typed("I love sushi.");
        tmux.keys(&["Enter"]);
        tmux.wait_for(
            "the preference in the review queue",
            Duration::from_secs(120),
            |s| s.contains("Review (1)") && s.contains("→ sushi") && s.contains("awaiting review"),
        );
        // Approve it from the preferences pane.
        tmux.keys(&["Tab", "Tab"]);
        tmux.wait_for(
            "the preferences pane focused",
            Duration::from_secs(10),
            |s| s.contains("Preferences (a x e f"),
        );
        tmux.keys(&["a"]);
        let screen = tmux.wait_for("the approval", Duration::from_secs(30), |s| {
            s.contains("Active (1)") && s.contains("Approved #") && !s.contains("Review (")
        });
        assert!(
            ["queued", "computing", "verified", "refused", "failed"]
                .iter()
                .any(|w| screen.contains(w)),
            "an edit status is shown: {screen}"
        );

        // The help overlay opens and closes.
        // Back to the message box (Esc), then F1 — apart, or the two
        // escape sequences run together.
        tmux.keys(&["Escape"]);
        std::thread::sleep(Duration::from_millis(400));
        tmux.keys(&["F1"]);
        tmux.wait_for("help", Duration::from_secs(10), |s| {
            s.contains("Keys and commands")
        });
        tmux.keys(&["q"]);
        tmux.wait_for("help closed", Duration::from_secs(10), |s| {
            !s.contains("Keys and commands")
        });

        // A resize keeps it alive.
        let _ = tmux
            .cmd()
            .args(["resize-window", "-t", "chat", "-x", "80", "-y", "24"])
            .status();
        tmux.wait_for("the smaller layout", Duration::from_secs(10), |s| {
            s.lines().next().is_some_and(|l| l.chars().count() <= 80) && s.contains("● connected")
        });

        // 3. Quit: the terminal is given back and the exit is clean.
        tmux.keys(&["C-c"]);
        tmux.wait_for("the exit", Duration::from_secs(20), |s| {
            s.contains("EXITED 0")
        });
        assert_eq!(
            tmux.display("#{alternate_on}"),
            "0",
            "the alternate screen was left"
        );
        assert_eq!(
            tmux.display("#{cursor_flag}"),
            "1",
            "the cursor is visible again"
        );
    });
    stop_daemon(home.path());
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
}

/// A passphrase-protected profile asks for its passphrase once per command,
/// however many times the command opens the profile: the line chat opens it
/// to attach the active edits and again to keep the conversation, and it
/// used to prompt for each. Run in tmux because the prompt reads the
/// terminal itself, not stdin.
#[test]
fn the_line_chat_asks_for_the_passphrase_once() {
    let home = tempfile::tempdir().unwrap();
    let created = common::imprint_at(home.path())
        .env("IMPRINT_PASSPHRASE", "line-test")
        .args(["profile", "init", "--passphrase"])
        .output()
        .unwrap();
    assert!(
        created.status.success(),
        "profile init failed: {}",
        String::from_utf8_lossy(&created.stderr)
    );
    // No IMPRINT_PASSPHRASE: the chat must ask.
    let tmux = Tmux::start(
        "line",
        home.path(),
        "-u IMPRINT_PASSPHRASE",
        "chat --line",
        (120, 30),
    );
    tmux.wait_for("the passphrase prompt", Duration::from_secs(60), |s| {
        s.contains("Profile passphrase:")
    });
    tmux.typed("line-test");
    tmux.keys(&["Enter"]);
    let screen = tmux.wait_for("the chat banner", Duration::from_secs(120), |s| {
        s.contains("/reset starts over")
            || s.contains("EXITED")
            || s.matches("Profile passphrase:").count() > 1
    });
    assert_eq!(
        screen.matches("Profile passphrase:").count(),
        1,
        "asked more than once, or the chat did not start:\n{screen}"
    );
    assert!(screen.contains("/reset starts over"), "{screen}");
    tmux.typed("/exit");
    tmux.keys(&["Enter"]);
    tmux.wait_for("the exit", Duration::from_secs(30), |s| {
        s.contains("EXITED 0")
    });
}
