//! The chat's state and what keys do to it. No I/O and no drawing here:
//! a key turns into state changes plus [`Action`]s for the daemon link,
//! and what the daemon says comes back as [`DaemonMsg`]. `ui.rs` draws
//! whatever state this is in, so every screen can be tested by building
//! the state and rendering it.

use std::path::PathBuf;

use ratatui::crossterm::event::{KeyCode, KeyEvent, KeyEventKind, KeyModifiers, MouseEventKind};
use serde_json::Value;

use super::input::{History, Input};

/// A conversation in the sidebar.
#[derive(Debug, Clone, PartialEq)]
pub struct Session {
    pub id: i64,
    pub title: String,
    pub incognito: bool,
    pub learning: bool,
}

impl Session {
    pub fn from_json(v: &Value) -> Option<Self> {
        Some(Self {
            id: v["id"].as_i64()?,
            title: v["title"].as_str().unwrap_or("").to_string(),
            incognito: v["incognito"].as_bool().unwrap_or(false),
            learning: v["learning"].as_bool().unwrap_or(false),
        })
    }

    pub fn label(&self) -> String {
        let title = if self.title.trim().is_empty() {
            "(new chat)".to_string()
        } else {
            self.title.clone()
        };
        if self.incognito {
            format!("◌ {title}")
        } else {
            title
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Speaker {
    User,
    Assistant,
    /// Something imprint itself says in the chat (errors, results of commands).
    Notice,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ChatEntry {
    pub speaker: Speaker,
    pub text: String,
    /// Still streaming.
    pub streaming: bool,
    /// Answered on the base weights (personalization off for this one).
    pub unpersonalized: bool,
}

/// A preference in the side pane.
#[derive(Debug, Clone, PartialEq)]
pub struct PrefItem {
    pub id: i64,
    pub attribute: String,
    pub target: String,
    pub status: String,
    /// queued / computing / verified / failed / refused / none
    pub edit_state: String,
    pub edit_summary: String,
    pub progress: f64,
}

impl PrefItem {
    pub fn from_json(v: &Value) -> Option<Self> {
        Some(Self {
            id: v["id"].as_i64()?,
            attribute: v["attribute"].as_str()?.to_string(),
            target: v["target"].as_str()?.to_string(),
            status: v["status"].as_str().unwrap_or("?").to_string(),
            edit_state: v["edit_status"]["state"]
                .as_str()
                .unwrap_or("none")
                .to_string(),
            edit_summary: v["edit_summary"].as_str().unwrap_or("").to_string(),
            progress: v["edit_status"]["progress"].as_f64().unwrap_or(0.0),
        })
    }

    /// The one-word edit status the pane shows.
    pub fn edit_word(&self) -> &str {
        match self.edit_state.as_str() {
            "none" if self.status == "pending" => "awaiting review",
            "none" => "no edit",
            other => other,
        }
    }
}

/// An edit being computed, for the status bar's gauge.
#[derive(Debug, Clone, PartialEq)]
pub struct JobProgress {
    pub preference: Option<i64>,
    pub stage: String,
    pub progress: f64,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct StatusInfo {
    pub model: String,
    pub gpu_layers: u64,
    pub active_edits: u64,
    pub queued: u64,
    pub job: Option<JobProgress>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Connection {
    Connecting,
    Connected,
    /// Why, and when the next try is.
    Unreachable(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Focus {
    Input,
    Sessions,
    Prefs,
}

/// `/compare`: one question, answered with and without the profile.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Compare {
    pub question: String,
    pub personalized: String,
    pub base: String,
    pub done: [bool; 2],
}

/// What covers the screen, if anything.
#[derive(Debug, Clone, PartialEq)]
pub enum Overlay {
    Help,
    ConfirmDelete {
        id: i64,
        title: String,
    },
    Rename {
        id: i64,
        input: Input,
    },
    /// "attribute → target", edited in place.
    EditPref {
        id: i64,
        input: Input,
    },
    Info {
        title: String,
        text: String,
    },
    Compare(Compare),
    /// The export's passphrase, typed masked.
    Passphrase {
        path: PathBuf,
        input: Input,
    },
}

/// Work for the daemon link.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// `session`: None creates a stored session first.
    Send {
        session: Option<i64>,
        text: String,
        personalized: bool,
    },
    Cancel,
    NewSession {
        incognito: bool,
    },
    OpenSession(i64),
    RenameSession {
        id: i64,
        title: String,
    },
    DeleteSession(i64),
    ApprovePref(i64),
    RejectPref(i64),
    ForgetPref(i64),
    EditPref {
        id: i64,
        attribute: String,
        target: String,
    },
    ShowPref(i64),
    /// None: a plain (unencrypted) export, asked for explicitly.
    Export {
        path: PathBuf,
        passphrase: Option<String>,
    },
    Compare(String),
    ModelInfo,
    /// Put text on the clipboard (the terminal does it, via OSC 52).
    Copy(String),
}

/// What the daemon link reports.
#[derive(Debug, Clone, PartialEq)]
pub enum DaemonMsg {
    Connected,
    Unreachable(String),
    Status(StatusInfo),
    Sessions(Vec<Session>),
    /// A session was opened (or created): its id and messages (role, text).
    Opened {
        id: i64,
        messages: Vec<(String, String)>,
    },
    /// The chat in view is now this (newly created) session.
    Current(i64),
    /// This session was deleted.
    Closed(i64),
    Token(String),
    ReplyDone {
        text: String,
        stop: String,
    },
    /// Esc: the reply stops where it is.
    ReplyCancelled,
    ReplyFailed(String),
    Prefs(Vec<PrefItem>),
    Job(JobProgress),
    JobFinished,
    CompareToken {
        personalized: bool,
        text: String,
    },
    CompareDone {
        personalized: bool,
    },
    /// A line for the chat from imprint itself.
    Notice(String),
    Info {
        title: String,
        text: String,
    },
}

pub struct App {
    pub sessions: Vec<Session>,
    pub current: Option<i64>,
    pub chat: Vec<ChatEntry>,
    pub input: Input,
    pub history: History,
    pub prefs: Vec<PrefItem>,
    pub selected_session: usize,
    pub selected_pref: usize,
    pub status: StatusInfo,
    pub connection: Connection,
    pub focus: Focus,
    pub overlay: Option<Overlay>,
    pub show_sidebar: bool,
    /// Rows scrolled up from the bottom of the chat; 0 follows new text.
    pub scroll: usize,
    pub generating: bool,
    /// The next message is answered without the profile (Ctrl+P).
    pub unpersonalized_next: bool,
    pub color: bool,
    pub quit: bool,
    /// Rows the chat pane showed last time (for PgUp/PgDn steps).
    pub chat_rows: usize,
    /// Rows the whole chat took last time: when it grows while the user
    /// is scrolled up, the view is moved with it so it stays put.
    pub chat_total: usize,
}

impl App {
    pub fn new(color: bool) -> Self {
        Self {
            sessions: Vec::new(),
            current: None,
            chat: Vec::new(),
            input: Input::default(),
            history: History::default(),
            prefs: Vec::new(),
            selected_session: 0,
            selected_pref: 0,
            status: StatusInfo::default(),
            connection: Connection::Connecting,
            focus: Focus::Input,
            overlay: None,
            show_sidebar: true,
            scroll: 0,
            generating: false,
            unpersonalized_next: false,
            color,
            quit: false,
            chat_rows: 10,
            chat_total: 0,
        }
    }

    pub fn current_session(&self) -> Option<&Session> {
        self.current
            .and_then(|id| self.sessions.iter().find(|s| s.id == id))
    }

    pub fn incognito(&self) -> bool {
        self.current.is_some_and(|id| id < 0)
    }

    /// Pending first (they need the user), then active; others are hidden.
    pub fn visible_prefs(&self) -> Vec<&PrefItem> {
        let mut v: Vec<&PrefItem> = self
            .prefs
            .iter()
            .filter(|p| p.status == "pending")
            .collect();
        v.extend(self.prefs.iter().filter(|p| p.status == "active"));
        v
    }

    fn notice(&mut self, text: impl Into<String>) {
        self.chat.push(ChatEntry {
            speaker: Speaker::Notice,
            text: text.into(),
            streaming: false,
            unpersonalized: false,
        });
        self.scroll = 0;
    }

    pub fn last_answer(&self) -> Option<&str> {
        self.chat
            .iter()
            .rev()
            .find(|e| e.speaker == Speaker::Assistant && !e.text.is_empty())
            .map(|e| e.text.as_str())
    }

    /// Applies what the daemon said.
    pub fn on_daemon(&mut self, msg: DaemonMsg) {
        match msg {
            DaemonMsg::Connected => self.connection = Connection::Connected,
            DaemonMsg::Unreachable(why) => {
                self.connection = Connection::Unreachable(why);
                if self.generating {
                    self.generating = false;
                    if let Some(e) = self.chat.last_mut() {
                        e.streaming = false;
                    }
                }
            }
            DaemonMsg::Status(s) => {
                // Job progress comes from events between polls; keep it.
                let job = self.status.job.take();
                self.status = s;
                if self.status.job.is_none() {
                    self.status.job = job;
                }
            }
            DaemonMsg::Sessions(s) => {
                self.sessions = s;
                self.selected_session = self
                    .selected_session
                    .min(self.sessions.len().saturating_sub(1));
            }
            DaemonMsg::Opened { id, messages } => {
                self.current = Some(id);
                if let Some(i) = self.sessions.iter().position(|s| s.id == id) {
                    self.selected_session = i;
                }
                self.chat = messages
                    .into_iter()
                    .map(|(role, text)| ChatEntry {
                        speaker: if role == "user" {
                            Speaker::User
                        } else {
                            Speaker::Assistant
                        },
                        text,
                        streaming: false,
                        unpersonalized: false,
                    })
                    .collect();
                self.scroll = 0;
            }
            DaemonMsg::Current(id) => self.current = Some(id),
            DaemonMsg::Closed(id) => {
                if self.current == Some(id) {
                    self.current = None;
                    self.chat.clear();
                    self.generating = false;
                }
            }
            DaemonMsg::ReplyCancelled => {
                self.generating = false;
                if let Some(e) = self
                    .chat
                    .last_mut()
                    .filter(|e| e.speaker == Speaker::Assistant)
                {
                    e.streaming = false;
                }
                self.notice("(stopped)");
            }
            DaemonMsg::Token(t) => {
                if let Some(e) = self
                    .chat
                    .last_mut()
                    .filter(|e| e.speaker == Speaker::Assistant && e.streaming)
                {
                    e.text.push_str(&t);
                }
            }
            DaemonMsg::ReplyDone { text, stop } => {
                self.generating = false;
                if let Some(e) = self
                    .chat
                    .last_mut()
                    .filter(|e| e.speaker == Speaker::Assistant)
                {
                    e.text = text;
                    e.streaming = false;
                }
                if stop == "cancelled" {
                    self.notice("(stopped)");
                } else if stop == "context_full" || stop == "max_tokens" {
                    self.notice(format!("(the reply was cut: {})", stop.replace('_', " ")));
                }
            }
            DaemonMsg::ReplyFailed(why) => {
                self.generating = false;
                if let Some(e) = self
                    .chat
                    .last_mut()
                    .filter(|e| e.speaker == Speaker::Assistant)
                {
                    e.streaming = false;
                }
                self.notice(format!("No reply: {why}"));
            }
            DaemonMsg::Prefs(p) => {
                self.prefs = p;
                self.selected_pref = self
                    .selected_pref
                    .min(self.visible_prefs().len().saturating_sub(1));
            }
            DaemonMsg::Job(j) => {
                if let Some(id) = j.preference {
                    if let Some(p) = self.prefs.iter_mut().find(|p| p.id == id) {
                        p.edit_state = "computing".into();
                        p.progress = j.progress;
                    }
                }
                self.status.job = Some(j);
            }
            DaemonMsg::JobFinished => self.status.job = None,
            DaemonMsg::CompareToken { personalized, text } => {
                if let Some(Overlay::Compare(c)) = &mut self.overlay {
                    if personalized {
                        c.personalized.push_str(&text);
                    } else {
                        c.base.push_str(&text);
                    }
                }
            }
            DaemonMsg::CompareDone { personalized } => {
                if let Some(Overlay::Compare(c)) = &mut self.overlay {
                    c.done[usize::from(!personalized)] = true;
                }
            }
            DaemonMsg::Notice(n) => self.notice(n),
            DaemonMsg::Info { title, text } => self.overlay = Some(Overlay::Info { title, text }),
        }
    }

    pub fn on_mouse(&mut self, kind: MouseEventKind) {
        match kind {
            MouseEventKind::ScrollUp => self.scroll += 3,
            MouseEventKind::ScrollDown => self.scroll = self.scroll.saturating_sub(3),
            _ => {}
        }
    }

    pub fn on_paste(&mut self, text: &str) {
        if self.overlay.is_none() {
            self.focus = Focus::Input;
            self.input.insert_str(&text.replace('\r', ""));
        }
    }

    /// Handles one key; returns the work it asks of the daemon.
    pub fn on_key(&mut self, key: KeyEvent) -> Vec<Action> {
        if key.kind == KeyEventKind::Release {
            return Vec::new();
        }
        let ctrl = key.modifiers.contains(KeyModifiers::CONTROL);
        // Quitting works from everywhere.
        if ctrl && matches!(key.code, KeyCode::Char('c') | KeyCode::Char('q')) {
            self.quit = true;
            return vec![];
        }
        if let Some(overlay) = self.overlay.take() {
            return self.on_overlay_key(overlay, key);
        }
        match key.code {
            KeyCode::F(1) => {
                self.overlay = Some(Overlay::Help);
                return vec![];
            }
            KeyCode::Esc if self.generating => return vec![Action::Cancel],
            KeyCode::Esc => {
                self.focus = Focus::Input;
                return vec![];
            }
            KeyCode::PageUp => {
                self.scroll += self.chat_rows.saturating_sub(2).max(1);
                return vec![];
            }
            KeyCode::PageDown => {
                self.scroll = self
                    .scroll
                    .saturating_sub(self.chat_rows.saturating_sub(2).max(1));
                return vec![];
            }
            KeyCode::Tab => {
                self.focus = match self.focus {
                    Focus::Input if self.show_sidebar => Focus::Sessions,
                    Focus::Sessions => Focus::Prefs,
                    _ => Focus::Input,
                };
                return vec![];
            }
            KeyCode::BackTab => {
                self.focus = match self.focus {
                    Focus::Input if self.show_sidebar => Focus::Prefs,
                    Focus::Prefs => Focus::Sessions,
                    _ => Focus::Input,
                };
                return vec![];
            }
            _ => {}
        }
        if ctrl {
            match key.code {
                KeyCode::Char('n') => return vec![Action::NewSession { incognito: false }],
                KeyCode::Char('b') => {
                    self.show_sidebar = !self.show_sidebar;
                    if !self.show_sidebar {
                        self.focus = Focus::Input;
                    }
                    return vec![];
                }
                KeyCode::Char('p') => {
                    self.unpersonalized_next = !self.unpersonalized_next;
                    return vec![];
                }
                KeyCode::Char('y') => {
                    return match self.last_answer() {
                        Some(a) => vec![Action::Copy(a.to_string())],
                        None => {
                            self.notice("Nothing to copy yet.");
                            vec![]
                        }
                    }
                }
                KeyCode::Char('l') => {
                    self.scroll = 0;
                    return vec![];
                }
                _ => {}
            }
        }
        match self.focus {
            Focus::Input => self.on_input_key(key),
            Focus::Sessions => self.on_sessions_key(key),
            Focus::Prefs => self.on_prefs_key(key),
        }
    }

    fn on_input_key(&mut self, key: KeyEvent) -> Vec<Action> {
        let alt = key.modifiers.contains(KeyModifiers::ALT);
        let ctrl = key.modifiers.contains(KeyModifiers::CONTROL);
        let shift = key.modifiers.contains(KeyModifiers::SHIFT);
        match key.code {
            KeyCode::Enter if alt || shift => self.input.insert('\n'),
            KeyCode::Char('j') if ctrl => self.input.insert('\n'),
            KeyCode::Enter => return self.submit(),
            KeyCode::Char('w') if ctrl => self.input.delete_word(),
            KeyCode::Char('u') if ctrl => {
                self.input.take();
            }
            KeyCode::Char('a') if ctrl => self.input.home(),
            KeyCode::Char('e') if ctrl => self.input.end(),
            KeyCode::Char('?') if self.input.is_empty() => self.overlay = Some(Overlay::Help),
            KeyCode::Char(c) if !ctrl => self.input.insert(c),
            KeyCode::Backspace => self.input.backspace(),
            KeyCode::Delete => self.input.delete(),
            KeyCode::Left => self.input.left(),
            KeyCode::Right => self.input.right(),
            KeyCode::Home => self.input.home(),
            KeyCode::End if self.input.is_empty() => self.scroll = 0,
            KeyCode::End => self.input.end(),
            KeyCode::Up if !self.input.is_multiline() => {
                let current = self.input.text().to_string();
                if let Some(older) = self.history.older(&current).map(str::to_string) {
                    self.input.set(&older);
                }
            }
            KeyCode::Down if !self.input.is_multiline() => {
                if let Some(newer) = self.history.newer().map(str::to_string) {
                    self.input.set(&newer);
                }
            }
            _ => {}
        }
        vec![]
    }

    /// Enter in the input: a command, or a message.
    fn submit(&mut self) -> Vec<Action> {
        let text = self.input.text().trim().to_string();
        if text.is_empty() {
            return vec![];
        }
        self.history.push(&text);
        self.input.take();
        if let Some(command) = text.strip_prefix('/') {
            return self.command(command);
        }
        if self.generating {
            self.input.set(&text);
            self.notice("Wait for the reply to finish (Esc stops it).");
            return vec![];
        }
        if self.connection != Connection::Connected {
            self.input.set(&text);
            self.notice(
                "Not connected to the daemon yet; your message is kept. It retries by itself.",
            );
            return vec![];
        }
        let personalized = !std::mem::take(&mut self.unpersonalized_next);
        self.chat.push(ChatEntry {
            speaker: Speaker::User,
            text: text.clone(),
            streaming: false,
            unpersonalized: false,
        });
        self.chat.push(ChatEntry {
            speaker: Speaker::Assistant,
            text: String::new(),
            streaming: true,
            unpersonalized: !personalized,
        });
        self.generating = true;
        self.scroll = 0;
        vec![Action::Send {
            session: self.current,
            text,
            personalized,
        }]
    }

    fn command(&mut self, command: &str) -> Vec<Action> {
        let (name, arg) = command
            .split_once(char::is_whitespace)
            .map(|(n, a)| (n, a.trim()))
            .unwrap_or((command, ""));
        match name {
            "new" => vec![Action::NewSession { incognito: false }],
            "incognito" => vec![Action::NewSession { incognito: true }],
            "help" | "?" => {
                self.overlay = Some(Overlay::Help);
                vec![]
            }
            "quit" | "exit" => {
                self.quit = true;
                vec![]
            }
            "model" => vec![Action::ModelInfo],
            "forget" => match arg.trim_start_matches('#').parse() {
                Ok(id) => vec![Action::ForgetPref(id)],
                Err(_) => {
                    self.notice("Usage: /forget ID (the number shown beside the preference)");
                    vec![]
                }
            },
            "export" => {
                if let Some(path) = arg.strip_prefix("--plain").map(str::trim) {
                    if !path.is_empty() {
                        return vec![Action::Export {
                            path: PathBuf::from(path),
                            passphrase: None,
                        }];
                    }
                }
                if arg.is_empty() || arg.starts_with("--plain") {
                    self.notice("Usage: /export PATH (asks for a passphrase to encrypt it), or /export --plain PATH");
                    return vec![];
                }
                self.overlay = Some(Overlay::Passphrase {
                    path: PathBuf::from(arg),
                    input: Input::default(),
                });
                vec![]
            }
            "compare" => {
                if arg.is_empty() {
                    self.notice("Usage: /compare QUESTION — the same question with and without your profile");
                    return vec![];
                }
                self.overlay = Some(Overlay::Compare(Compare {
                    question: arg.to_string(),
                    ..Default::default()
                }));
                vec![Action::Compare(arg.to_string())]
            }
            other => {
                self.notice(format!("Unknown command /{other}. Press F1 for the list."));
                vec![]
            }
        }
    }

    fn on_sessions_key(&mut self, key: KeyEvent) -> Vec<Action> {
        let n = self.sessions.len();
        match key.code {
            KeyCode::Up | KeyCode::Char('k') => {
                self.selected_session = self.selected_session.saturating_sub(1)
            }
            KeyCode::Down | KeyCode::Char('j') => {
                self.selected_session = (self.selected_session + 1).min(n.saturating_sub(1))
            }
            KeyCode::Enter => {
                if let Some(s) = self.sessions.get(self.selected_session) {
                    self.focus = Focus::Input;
                    return vec![Action::OpenSession(s.id)];
                }
            }
            KeyCode::Char('n') => return vec![Action::NewSession { incognito: false }],
            KeyCode::Char('i') => return vec![Action::NewSession { incognito: true }],
            KeyCode::Char('r') => {
                if let Some(s) = self.sessions.get(self.selected_session) {
                    let mut input = Input::default();
                    input.set(&s.title);
                    self.overlay = Some(Overlay::Rename { id: s.id, input });
                }
            }
            KeyCode::Char('d') | KeyCode::Delete => {
                if let Some(s) = self.sessions.get(self.selected_session) {
                    self.overlay = Some(Overlay::ConfirmDelete {
                        id: s.id,
                        title: s.label(),
                    });
                }
            }
            _ => {}
        }
        vec![]
    }

    fn on_prefs_key(&mut self, key: KeyEvent) -> Vec<Action> {
        let visible: Vec<PrefItem> = self.visible_prefs().into_iter().cloned().collect();
        let selected = visible.get(self.selected_pref).cloned();
        match key.code {
            KeyCode::Up | KeyCode::Char('k') => {
                self.selected_pref = self.selected_pref.saturating_sub(1)
            }
            KeyCode::Down | KeyCode::Char('j') => {
                self.selected_pref = (self.selected_pref + 1).min(visible.len().saturating_sub(1))
            }
            KeyCode::Char('a') => {
                if let Some(p) = selected.filter(|p| p.status == "pending") {
                    return vec![Action::ApprovePref(p.id)];
                }
            }
            KeyCode::Char('x') => {
                if let Some(p) = selected {
                    return vec![Action::RejectPref(p.id)];
                }
            }
            KeyCode::Char('f') => {
                if let Some(p) = selected.filter(|p| p.status == "active") {
                    return vec![Action::ForgetPref(p.id)];
                }
            }
            KeyCode::Char('e') => {
                if let Some(p) = selected {
                    let mut input = Input::default();
                    input.set(&format!("{} → {}", p.attribute, p.target));
                    self.overlay = Some(Overlay::EditPref { id: p.id, input });
                }
            }
            KeyCode::Enter => {
                if let Some(p) = selected {
                    return vec![Action::ShowPref(p.id)];
                }
            }
            _ => {}
        }
        vec![]
    }

    fn on_overlay_key(&mut self, overlay: Overlay, key: KeyEvent) -> Vec<Action> {
        match overlay {
            Overlay::ConfirmDelete { id, title } => match key.code {
                KeyCode::Char('y') | KeyCode::Char('Y') => return vec![Action::DeleteSession(id)],
                KeyCode::Char('n') | KeyCode::Char('N') | KeyCode::Esc => {}
                _ => self.overlay = Some(Overlay::ConfirmDelete { id, title }),
            },
            Overlay::Rename { id, mut input } => match key.code {
                KeyCode::Enter => {
                    let title = input.take().trim().to_string();
                    if !title.is_empty() {
                        return vec![Action::RenameSession { id, title }];
                    }
                }
                KeyCode::Esc => {}
                _ => {
                    edit_line(&mut input, key);
                    self.overlay = Some(Overlay::Rename { id, input });
                }
            },
            Overlay::EditPref { id, mut input } => match key.code {
                KeyCode::Enter => {
                    let text = input.text().to_string();
                    match text.split_once('→').or_else(|| text.split_once("->")) {
                        Some((a, t)) if !a.trim().is_empty() && !t.trim().is_empty() => {
                            return vec![Action::EditPref {
                                id,
                                attribute: a.trim().to_string(),
                                target: t.trim().to_string(),
                            }]
                        }
                        _ => {
                            self.overlay = Some(Overlay::EditPref { id, input });
                        }
                    }
                }
                KeyCode::Esc => {}
                _ => {
                    edit_line(&mut input, key);
                    self.overlay = Some(Overlay::EditPref { id, input });
                }
            },
            Overlay::Passphrase { path, mut input } => match key.code {
                KeyCode::Enter if !input.is_empty() => {
                    return vec![Action::Export {
                        path,
                        passphrase: Some(input.take()),
                    }]
                }
                KeyCode::Esc => self.notice("Export cancelled."),
                _ => {
                    edit_line(&mut input, key);
                    self.overlay = Some(Overlay::Passphrase { path, input });
                }
            },
            Overlay::Compare(c) => {
                // Stays up until both answers are in and a key is pressed.
                if !(c.done[0] && c.done[1]) && key.code != KeyCode::Esc {
                    self.overlay = Some(Overlay::Compare(c));
                }
            }
            // Help and info close on any key.
            Overlay::Help | Overlay::Info { .. } => {}
        }
        vec![]
    }
}

fn edit_line(input: &mut Input, key: KeyEvent) {
    match key.code {
        KeyCode::Char(c) if !key.modifiers.contains(KeyModifiers::CONTROL) => input.insert(c),
        KeyCode::Backspace => input.backspace(),
        KeyCode::Delete => input.delete(),
        KeyCode::Left => input.left(),
        KeyCode::Right => input.right(),
        KeyCode::Home => input.home(),
        KeyCode::End => input.end(),
        _ => {}
    }
}

/// Every key, for the help overlay (and the README).
pub const KEYS: &[(&str, &str)] = &[
    ("Enter", "send the message"),
    ("Alt+Enter, Ctrl+J", "new line in the message"),
    ("Up / Down", "messages you sent before"),
    ("Esc", "stop the reply being written"),
    ("PgUp/PgDn, wheel", "scroll; Ctrl+L follows the end again"),
    ("Tab / Shift+Tab", "message, sessions, preferences"),
    ("Ctrl+N", "new chat"),
    ("Ctrl+B", "hide or show the side panes"),
    ("Ctrl+P", "next answer without your profile"),
    ("Ctrl+Y", "copy the last answer"),
    ("F1, ? (empty input)", "this help"),
    ("Ctrl+C, Ctrl+Q", "quit"),
    (
        "Sessions: Enter",
        "open; n new, i incognito, r rename, d delete",
    ),
    (
        "Preferences: Enter",
        "source; a approve, x reject, e edit, f forget",
    ),
    (
        "/new, /incognito",
        "new chat; incognito: not stored, not learned",
    ),
    ("/forget ID", "forget a preference, out of the weights too"),
    (
        "/export PATH",
        "export the profile (encrypted; --plain: not)",
    ),
    ("/compare QUESTION", "answers with and without your profile"),
    ("/model", "model, GPU layers, edits in use"),
    ("/quit", "quit"),
];

#[cfg(test)]
mod tests {
    use super::*;

    fn key(code: KeyCode) -> KeyEvent {
        KeyEvent::new(code, KeyModifiers::NONE)
    }

    fn ctrl(c: char) -> KeyEvent {
        KeyEvent::new(KeyCode::Char(c), KeyModifiers::CONTROL)
    }

    fn typed(app: &mut App, text: &str) {
        for c in text.chars() {
            app.on_key(key(KeyCode::Char(c)));
        }
    }

    fn connected() -> App {
        let mut app = App::new(true);
        app.on_daemon(DaemonMsg::Connected);
        app
    }

    #[test]
    fn enter_sends_and_tokens_stream_into_the_reply() {
        let mut app = connected();
        typed(&mut app, "Hello");
        app.on_key(KeyEvent::new(KeyCode::Enter, KeyModifiers::ALT));
        typed(&mut app, "there");
        let actions = app.on_key(key(KeyCode::Enter));
        assert_eq!(
            actions,
            vec![Action::Send {
                session: None,
                text: "Hello\nthere".into(),
                personalized: true
            }]
        );
        assert!(app.generating && app.input.is_empty());
        app.on_daemon(DaemonMsg::Token("Hi".into()));
        app.on_daemon(DaemonMsg::Token("!".into()));
        assert_eq!(app.chat.last().unwrap().text, "Hi!");
        assert_eq!(app.on_key(key(KeyCode::Esc)), vec![Action::Cancel]);
        app.on_daemon(DaemonMsg::ReplyDone {
            text: "Hi!".into(),
            stop: "cancelled".into(),
        });
        assert!(!app.generating);
        assert_eq!(app.chat.last().unwrap().speaker, Speaker::Notice);
    }

    #[test]
    fn ctrl_p_turns_personalization_off_for_one_message() {
        let mut app = connected();
        app.on_key(ctrl('p'));
        typed(&mut app, "a");
        let first = app.on_key(key(KeyCode::Enter));
        assert!(matches!(
            &first[0],
            Action::Send {
                personalized: false,
                ..
            }
        ));
        app.on_daemon(DaemonMsg::ReplyDone {
            text: "x".into(),
            stop: "end_of_turn".into(),
        });
        typed(&mut app, "b");
        let second = app.on_key(key(KeyCode::Enter));
        assert!(matches!(
            &second[0],
            Action::Send {
                personalized: true,
                ..
            }
        ));
    }

    #[test]
    fn a_message_typed_while_disconnected_is_kept() {
        let mut app = App::new(true);
        app.on_daemon(DaemonMsg::Unreachable("no socket".into()));
        typed(&mut app, "hello");
        assert!(app.on_key(key(KeyCode::Enter)).is_empty());
        assert_eq!(app.input.text(), "hello");
    }

    #[test]
    fn commands_become_actions() {
        let mut app = connected();
        for (line, want) in [
            ("/new", Action::NewSession { incognito: false }),
            ("/incognito", Action::NewSession { incognito: true }),
            ("/forget #12", Action::ForgetPref(12)),
            (
                "/export --plain /tmp/p.imprint",
                Action::Export {
                    path: "/tmp/p.imprint".into(),
                    passphrase: None,
                },
            ),
            ("/model", Action::ModelInfo),
        ] {
            typed(&mut app, line);
            assert_eq!(app.on_key(key(KeyCode::Enter)), vec![want], "{line}");
        }
        typed(&mut app, "/export /tmp/e.imprint");
        assert!(app.on_key(key(KeyCode::Enter)).is_empty());
        typed(&mut app, "s3cret");
        assert_eq!(
            app.on_key(key(KeyCode::Enter)),
            vec![Action::Export {
                path: "/tmp/e.imprint".into(),
                passphrase: Some("s3cret".into())
            }]
        );
        typed(&mut app, "/compare Where do I live?");
        assert_eq!(
            app.on_key(key(KeyCode::Enter)),
            vec![Action::Compare("Where do I live?".into())]
        );
        assert!(matches!(app.overlay, Some(Overlay::Compare(_))));
        typed(&mut app, "/bogus");
        assert!(app.on_key(key(KeyCode::Enter)).is_empty());
    }

    #[test]
    fn deleting_a_session_asks_first() {
        let mut app = connected();
        app.on_daemon(DaemonMsg::Sessions(vec![Session {
            id: 4,
            title: "trip".into(),
            incognito: false,
            learning: true,
        }]));
        app.on_key(key(KeyCode::Tab));
        assert_eq!(app.focus, Focus::Sessions);
        assert!(app.on_key(key(KeyCode::Char('d'))).is_empty());
        assert!(matches!(
            app.overlay,
            Some(Overlay::ConfirmDelete { id: 4, .. })
        ));
        assert!(
            app.on_key(key(KeyCode::Char('z'))).is_empty(),
            "other keys keep asking"
        );
        assert_eq!(
            app.on_key(key(KeyCode::Char('y'))),
            vec![Action::DeleteSession(4)]
        );
        assert!(app.overlay.is_none());
    }

    #[test]
    fn pending_preferences_come_first_and_can_be_approved_or_edited() {
        let mut app = connected();
        let pref = |id, status: &str| PrefItem {
            id,
            attribute: "food".into(),
            target: format!("dish {id}"),
            status: status.into(),
            edit_state: "none".into(),
            edit_summary: String::new(),
            progress: 0.0,
        };
        app.on_daemon(DaemonMsg::Prefs(vec![
            pref(1, "active"),
            pref(2, "pending"),
            pref(3, "rejected"),
        ]));
        let visible: Vec<i64> = app.visible_prefs().iter().map(|p| p.id).collect();
        assert_eq!(visible, vec![2, 1]);
        app.focus = Focus::Prefs;
        assert_eq!(
            app.on_key(key(KeyCode::Char('a'))),
            vec![Action::ApprovePref(2)]
        );
        assert!(
            app.on_key(key(KeyCode::Char('f'))).is_empty(),
            "a pending one is not forgotten, it is rejected"
        );
        app.on_key(key(KeyCode::Down));
        assert_eq!(
            app.on_key(key(KeyCode::Char('f'))),
            vec![Action::ForgetPref(1)]
        );
        app.on_key(key(KeyCode::Char('e')));
        for _ in 0.."dish 1".len() {
            app.on_key(key(KeyCode::Backspace));
        }
        typed(&mut app, "ramen");
        assert_eq!(
            app.on_key(key(KeyCode::Enter)),
            vec![Action::EditPref {
                id: 1,
                attribute: "food".into(),
                target: "ramen".into()
            }]
        );
    }

    #[test]
    fn history_recalls_sent_messages() {
        let mut app = connected();
        typed(&mut app, "first");
        app.on_key(key(KeyCode::Enter));
        app.on_daemon(DaemonMsg::ReplyDone {
            text: "x".into(),
            stop: "end_of_turn".into(),
        });
        app.on_key(key(KeyCode::Up));
        assert_eq!(app.input.text(), "first");
        app.on_key(key(KeyCode::Down));
        assert_eq!(app.input.text(), "");
    }
}
