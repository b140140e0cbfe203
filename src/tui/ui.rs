//! Drawing: the whole screen from the [`App`] state, nothing else.
//!
//! ```text
//! ┌ Sessions ──────┐┌ chat title ──────────────────────────────┐
//! │ sessions       ││ you / imprint, Markdown, streaming ▌      │
//! ├ Preferences ───┤│                                           │
//! │ review, active ││                                           │
//! │ + edit status  │└───────────────────────────────────────────┘
//! │                │┌ Message ─────────────────────────────────┐
//! └────────────────┘└───────────────────────────────────────────┘
//!  model · GPU · edits · [gauge] · incognito · connection
//! ```

use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Borders, Clear, List, ListItem, ListState, Paragraph, Wrap};
use ratatui::Frame;

use super::app::{App, ChatEntry, Connection, Focus, Overlay, Speaker, KEYS};
use super::markdown::{self, Theme};

/// Narrower than this, the side panes give their room to the chat.
const SIDE_MIN_WIDTH: u16 = 70;
const SIDE_WIDTH: u16 = 26;

struct Styles {
    color: bool,
}

impl Styles {
    fn fg(&self, c: Color) -> Style {
        if self.color {
            Style::default().fg(c)
        } else {
            Style::default()
        }
    }

    fn focused(&self, yes: bool) -> Style {
        if yes {
            self.fg(Color::Cyan).add_modifier(Modifier::BOLD)
        } else {
            self.fg(Color::DarkGray)
        }
    }

    fn selected(&self) -> Style {
        Style::default().add_modifier(Modifier::REVERSED)
    }
}

pub fn draw(frame: &mut Frame, app: &mut App) {
    let st = Styles { color: app.color };
    let area = frame.area();
    let input_lines = app.input.text().split('\n').count().clamp(1, 6) as u16;
    let [main, input_area, status_area] = Layout::vertical([
        Constraint::Min(3),
        Constraint::Length(input_lines + 2),
        Constraint::Length(1),
    ])
    .areas(area);
    let side = app.show_sidebar && area.width >= SIDE_MIN_WIDTH;
    let (side_area, chat_area) = if side {
        let [s, c] =
            Layout::horizontal([Constraint::Length(SIDE_WIDTH), Constraint::Min(20)]).areas(main);
        (Some(s), c)
    } else {
        (None, main)
    };
    if let Some(side_area) = side_area {
        let [sessions, prefs] =
            Layout::vertical([Constraint::Percentage(40), Constraint::Percentage(60)])
                .areas(side_area);
        draw_sessions(frame, app, &st, sessions);
        draw_prefs(frame, app, &st, prefs);
    }
    draw_chat(frame, app, &st, chat_area);
    draw_input(frame, app, &st, input_area);
    draw_status(frame, app, &st, status_area);
    if let Some(overlay) = &app.overlay {
        draw_overlay(frame, overlay, &st, area, app.color);
    }
}

fn draw_sessions(frame: &mut Frame, app: &App, st: &Styles, area: Rect) {
    let items: Vec<ListItem> = app
        .sessions
        .iter()
        .map(|s| {
            let marker = if Some(s.id) == app.current {
                "▸ "
            } else {
                "  "
            };
            ListItem::new(format!("{marker}{}", s.label()))
        })
        .collect();
    let empty = items.is_empty();
    let list = List::new(items)
        .block(
            Block::default()
                .borders(Borders::ALL)
                .title(" Sessions ")
                .border_style(st.focused(app.focus == Focus::Sessions)),
        )
        .highlight_style(st.selected());
    let mut state = ListState::default();
    if app.focus == Focus::Sessions && !empty {
        state.select(Some(app.selected_session));
    }
    frame.render_stateful_widget(list, area, &mut state);
    if empty {
        placeholder(frame, st, area, "no chats yet");
    }
}

fn draw_prefs(frame: &mut Frame, app: &App, st: &Styles, area: Rect) {
    let visible = app.visible_prefs();
    let pending = visible.iter().filter(|p| p.status == "pending").count();
    let mut items = Vec::new();
    // Index in `items` of each visible preference, for the selection.
    let mut rows = Vec::new();
    if pending > 0 {
        items.push(ListItem::new(Line::from(Span::styled(
            format!("Review ({pending})"),
            st.fg(Color::Yellow).add_modifier(Modifier::BOLD),
        ))));
    }
    for (i, p) in visible.iter().enumerate() {
        if i == pending {
            items.push(ListItem::new(Line::from(Span::styled(
                format!("Active ({})", visible.len() - pending),
                st.fg(Color::Green).add_modifier(Modifier::BOLD),
            ))));
        }
        rows.push(items.len());
        let state_color = match p.edit_state.as_str() {
            "verified" => Color::Green,
            "failed" | "refused" => Color::Red,
            "queued" | "computing" => Color::Yellow,
            _ => Color::DarkGray,
        };
        let detail = if p.edit_state == "computing" && p.progress > 0.0 {
            format!("computing {:.0}%", p.progress * 100.0)
        } else {
            p.edit_word().to_string()
        };
        items.push(ListItem::new(vec![
            Line::from(format!("#{} {} → {}", p.id, p.attribute, p.target)),
            Line::from(Span::styled(format!("   {detail}"), st.fg(state_color))),
        ]));
    }
    let title = if app.focus == Focus::Prefs {
        " Preferences (a x e f ⏎) "
    } else {
        " Preferences "
    };
    let empty = items.is_empty();
    let list = List::new(items)
        .block(
            Block::default()
                .borders(Borders::ALL)
                .title(title)
                .border_style(st.focused(app.focus == Focus::Prefs)),
        )
        .highlight_style(st.selected());
    let mut state = ListState::default();
    if app.focus == Focus::Prefs {
        state.select(rows.get(app.selected_pref).copied());
    }
    frame.render_stateful_widget(list, area, &mut state);
    if empty {
        placeholder(frame, st, area, "nothing learned yet");
    }
}

/// A dim line inside an empty pane's border.
fn placeholder(frame: &mut Frame, st: &Styles, area: Rect, text: &str) {
    let inner = Rect {
        x: area.x + 2,
        y: area.y + 1,
        width: area.width.saturating_sub(4),
        height: area.height.saturating_sub(2).min(1),
    };
    frame.render_widget(Paragraph::new(text).style(st.fg(Color::DarkGray)), inner);
}

/// The chat as wrapped lines, for a pane `width` columns wide.
pub fn chat_lines(chat: &[ChatEntry], width: usize, color: bool) -> Vec<Line<'static>> {
    let theme = Theme::new(color);
    let st = Styles { color };
    let mut lines = Vec::new();
    for entry in chat {
        match entry.speaker {
            Speaker::User => {
                lines.push(Line::from(Span::styled(
                    "you",
                    st.fg(Color::Green).add_modifier(Modifier::BOLD),
                )));
                lines.extend(markdown::render(&entry.text, width, &theme));
            }
            Speaker::Assistant => {
                let mut header = vec![Span::styled(
                    "imprint",
                    st.fg(Color::Magenta).add_modifier(Modifier::BOLD),
                )];
                if entry.unpersonalized {
                    header.push(Span::styled(
                        " (without your profile)",
                        st.fg(Color::DarkGray),
                    ));
                }
                lines.push(Line::from(header));
                let mut body = markdown::render(&entry.text, width, &theme);
                if entry.streaming {
                    match body.last_mut() {
                        Some(last) if !entry.text.is_empty() => last.spans.push(Span::raw("▌")),
                        _ => body = vec![Line::from(Span::styled("…", st.fg(Color::DarkGray)))],
                    }
                }
                lines.extend(body);
            }
            Speaker::Notice => {
                for l in markdown::render(&entry.text, width, &theme) {
                    lines.push(l.style(st.fg(Color::DarkGray).add_modifier(Modifier::ITALIC)));
                }
            }
        }
        lines.push(Line::default());
    }
    lines
}

fn draw_chat(frame: &mut Frame, app: &mut App, st: &Styles, area: Rect) {
    let title = match app.current_session() {
        Some(s) => format!(" {} ", s.label()),
        None => " imprint ".to_string(),
    };
    let width = area.width.saturating_sub(2) as usize;
    let rows = area.height.saturating_sub(2) as usize;
    app.chat_rows = rows;
    let lines = chat_lines(&app.chat, width, app.color);
    let total = lines.len();
    if app.scroll > 0 && total > app.chat_total {
        // Scrolled up: what the user is reading stays where it is.
        app.scroll += total - app.chat_total;
    }
    app.chat_total = total;
    app.scroll = app.scroll.min(total.saturating_sub(rows));
    let mut block = Block::default()
        .borders(Borders::ALL)
        .title(title)
        .border_style(st.focused(app.focus == Focus::Input));
    if app.scroll > 0 {
        block = block.title_bottom(Line::from(" ↓ more below (End) ").right_aligned());
    }
    if app.chat.is_empty() {
        let hint = match &app.connection {
            Connection::Unreachable(why) => vec![
                Line::from(Span::styled("The daemon cannot be reached.", st.fg(Color::Red).add_modifier(Modifier::BOLD))),
                Line::from(why.clone()),
                Line::from("imprint keeps retrying; `imprint daemon status` in another terminal says more."),
            ],
            Connection::Connecting => vec![Line::from("Connecting to the daemon (starting it if needed)…")],
            Connection::Connected => vec![
                Line::from(Span::styled("Say something.", Style::default().add_modifier(Modifier::BOLD))),
                Line::from(""),
                Line::from("imprint learns what you tell it about yourself (\"I live in Porto\") and writes it into the model's weights, privately, on this machine."),
                Line::from("Preferences appear on the left; F1 lists every key and command."),
            ],
        };
        frame.render_widget(
            Paragraph::new(hint).block(block).wrap(Wrap { trim: false }),
            area,
        );
        return;
    }
    let start = total.saturating_sub(rows + app.scroll);
    let visible: Vec<Line> = lines.into_iter().skip(start).take(rows).collect();
    frame.render_widget(Paragraph::new(visible).block(block), area);
}

fn draw_input(frame: &mut Frame, app: &App, st: &Styles, area: Rect) {
    let title = if app.generating {
        " Message — Esc stops the reply ".to_string()
    } else if app.unpersonalized_next {
        " Message — next answer WITHOUT your profile (Ctrl+P) ".to_string()
    } else {
        " Message — Enter sends, Alt+Enter new line, F1 help ".to_string()
    };
    let block = Block::default()
        .borders(Borders::ALL)
        .title(title)
        .border_style(st.focused(app.focus == Focus::Input));
    let inner_width = area.width.saturating_sub(2) as usize;
    let rows = area.height.saturating_sub(2) as usize;
    let (line, col) = app.input.cursor_position();
    let lines: Vec<&str> = app.input.text().split('\n').collect();
    // Keep the cursor's line in view.
    let first = line.saturating_sub(rows.saturating_sub(1));
    let shown: Vec<Line> = lines
        .iter()
        .skip(first)
        .take(rows)
        .map(|l| {
            // Long lines scroll horizontally around the cursor.
            let chars: Vec<char> = l.chars().collect();
            let offset = if chars.len() > inner_width {
                chars.len() - inner_width
            } else {
                0
            };
            Line::from(chars[offset..].iter().collect::<String>())
        })
        .collect();
    frame.render_widget(Paragraph::new(shown).block(block), area);
    if app.overlay.is_none() && app.focus == Focus::Input {
        let cur_line_len = lines.get(line).map_or(0, |l| l.chars().count());
        let offset = cur_line_len.saturating_sub(inner_width);
        let x = area.x + 1 + (col.saturating_sub(offset)).min(inner_width) as u16;
        let y = area.y + 1 + (line - first) as u16;
        frame.set_cursor_position((x, y));
    }
}

/// A text gauge: `[█████░░░░░] 50%`.
pub fn gauge(progress: f64, cells: usize) -> String {
    let filled = ((progress.clamp(0.0, 1.0)) * cells as f64).round() as usize;
    format!("[{}{}]", "█".repeat(filled), "░".repeat(cells - filled))
}

fn draw_status(frame: &mut Frame, app: &App, st: &Styles, area: Rect) {
    let s = &app.status;
    let sep = || Span::styled(" · ", st.fg(Color::DarkGray));
    // What must always show comes first: the connection and incognito.
    let mut spans = vec![
        Span::raw(" "),
        match &app.connection {
            Connection::Connected => Span::styled("● connected", st.fg(Color::Green)),
            Connection::Connecting => Span::styled("○ connecting", st.fg(Color::Yellow)),
            Connection::Unreachable(_) => Span::styled(
                "✕ daemon unreachable, retrying",
                st.fg(Color::Red).add_modifier(Modifier::BOLD),
            ),
        },
    ];
    if app.incognito() {
        spans.push(sep());
        spans.push(Span::styled(
            "INCOGNITO",
            st.fg(Color::Magenta)
                .add_modifier(Modifier::BOLD | Modifier::REVERSED),
        ));
    }
    let mut tail = vec![
        sep(),
        Span::raw(format!("GPU layers {}", s.gpu_layers)),
        sep(),
        Span::raw(format!(
            "{} edit{}",
            s.active_edits,
            if s.active_edits == 1 { "" } else { "s" }
        )),
    ];
    if let Some(job) = &s.job {
        tail.push(sep());
        tail.push(Span::styled(
            format!(
                "learning {} {:.0}%",
                gauge(job.progress, 10),
                job.progress * 100.0
            ),
            st.fg(Color::Yellow),
        ));
    } else if s.queued > 0 {
        tail.push(sep());
        tail.push(Span::raw(format!("{} queued", s.queued)));
    }
    // The model's name gets what room is left.
    let used: usize = spans
        .iter()
        .chain(&tail)
        .map(|sp| sp.width())
        .sum::<usize>()
        + 3;
    let room = (area.width as usize).saturating_sub(used);
    let model = if s.model.is_empty() {
        "model ?".to_string()
    } else {
        s.model.clone()
    };
    let model = if model.chars().count() > room {
        let keep: String = model.chars().take(room.saturating_sub(1)).collect();
        format!("{keep}…")
    } else {
        model
    };
    if room > 1 {
        spans.push(sep());
        spans.push(Span::styled(
            model,
            Style::default().add_modifier(Modifier::BOLD),
        ));
    }
    spans.extend(tail);
    frame.render_widget(Paragraph::new(Line::from(spans)), area);
}

fn centered(area: Rect, width: u16, height: u16) -> Rect {
    let w = width.min(area.width);
    let h = height.min(area.height);
    Rect {
        x: area.x + (area.width - w) / 2,
        y: area.y + (area.height - h) / 2,
        width: w,
        height: h,
    }
}

fn draw_overlay(frame: &mut Frame, overlay: &Overlay, st: &Styles, area: Rect, color: bool) {
    let boxed = |title: &str| {
        Block::default()
            .borders(Borders::ALL)
            .title(format!(" {title} "))
            .border_style(st.fg(Color::Cyan))
    };
    match overlay {
        Overlay::Help => {
            let rect = centered(area, 72, KEYS.len() as u16 + 2);
            let key_width = 21;
            let lines: Vec<Line> = KEYS
                .iter()
                .map(|(k, what)| {
                    Line::from(vec![
                        Span::styled(
                            format!("{k:<key_width$}"),
                            st.fg(Color::Cyan).add_modifier(Modifier::BOLD),
                        ),
                        Span::raw(*what),
                    ])
                })
                .collect();
            frame.render_widget(Clear, rect);
            frame.render_widget(
                Paragraph::new(lines).block(boxed("Keys and commands — any key closes this")),
                rect,
            );
        }
        Overlay::ConfirmDelete { title, .. } => {
            let rect = centered(area, 60, 7);
            frame.render_widget(Clear, rect);
            frame.render_widget(
                Paragraph::new(vec![
                    Line::from(format!("Delete “{title}”?")),
                    Line::from(
                        "Its messages go, and preferences learned only from it are forgotten.",
                    ),
                    Line::from(""),
                    Line::from(Span::styled(
                        "y: delete    n / Esc: keep",
                        Style::default().add_modifier(Modifier::BOLD),
                    )),
                ])
                .block(boxed("Delete session"))
                .wrap(Wrap { trim: false }),
                rect,
            );
        }
        Overlay::Rename { input, .. } => {
            line_editor(
                frame,
                area,
                boxed("Rename session — Enter saves, Esc cancels"),
                input.text(),
                input.cursor_position().1,
            );
        }
        Overlay::EditPref { input, .. } => {
            line_editor(
                frame,
                area,
                boxed("Edit preference: attribute → target — Enter saves"),
                input.text(),
                input.cursor_position().1,
            );
        }
        Overlay::Passphrase { path, input } => {
            let masked = "•".repeat(input.text().chars().count());
            line_editor(
                frame,
                area,
                boxed(&format!(
                    "Passphrase for {} — Enter exports",
                    path.display()
                )),
                &masked,
                input.cursor_position().1,
            );
        }
        Overlay::Info { title, text } => {
            let lines = text.lines().count() as u16;
            let rect = centered(area, 72, lines + 4);
            frame.render_widget(Clear, rect);
            let mut body: Vec<Line> = text.lines().map(|l| Line::from(l.to_string())).collect();
            body.push(Line::from(Span::styled(
                "any key closes this",
                st.fg(Color::DarkGray),
            )));
            frame.render_widget(
                Paragraph::new(body)
                    .block(boxed(title))
                    .wrap(Wrap { trim: false }),
                rect,
            );
        }
        Overlay::Compare(c) => {
            let rect = centered(
                area,
                area.width.saturating_sub(4),
                area.height.saturating_sub(2),
            );
            frame.render_widget(Clear, rect);
            let outer = boxed(&format!("Compare: {}", c.question));
            let inner = outer.inner(rect);
            frame.render_widget(outer, rect);
            let [left, right] =
                Layout::horizontal([Constraint::Percentage(50), Constraint::Percentage(50)])
                    .areas(inner);
            let theme = Theme::new(color);
            for (side, text, done, title) in [
                (left, &c.personalized, c.done[0], "With your profile"),
                (right, &c.base, c.done[1], "Without it"),
            ] {
                let width = side.width.saturating_sub(2) as usize;
                let mut lines = markdown::render(text, width, &theme);
                if !done {
                    lines.push(Line::from(Span::styled("…", st.fg(Color::DarkGray))));
                }
                frame.render_widget(
                    Paragraph::new(lines).block(
                        Block::default()
                            .borders(Borders::ALL)
                            .title(format!(" {title} ")),
                    ),
                    side,
                );
            }
        }
    }
}

fn line_editor(frame: &mut Frame, area: Rect, block: Block, text: &str, cursor_col: usize) {
    let rect = centered(area, 70, 3);
    frame.render_widget(Clear, rect);
    let inner_width = rect.width.saturating_sub(2) as usize;
    let chars: Vec<char> = text.chars().collect();
    let offset = cursor_col.saturating_sub(inner_width.saturating_sub(1));
    let shown: String = chars.iter().skip(offset).take(inner_width).collect();
    frame.render_widget(Paragraph::new(shown).block(block), rect);
    frame.set_cursor_position((rect.x + 1 + (cursor_col - offset) as u16, rect.y + 1));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tui::app::{DaemonMsg, JobProgress, PrefItem, Session, StatusInfo};
    use ratatui::backend::TestBackend;
    use ratatui::Terminal;

    fn screen(app: &mut App, width: u16, height: u16) -> String {
        let mut terminal = Terminal::new(TestBackend::new(width, height)).unwrap();
        terminal.draw(|f| draw(f, app)).unwrap();
        let buffer = terminal.backend().buffer().clone();
        let mut out = String::new();
        for y in 0..buffer.area.height {
            for x in 0..buffer.area.width {
                out.push_str(buffer[(x, y)].symbol());
            }
            out.push('\n');
        }
        out
    }

    fn status() -> StatusInfo {
        StatusInfo {
            model: "SmolLM2-135M-Instruct.Q4_1".into(),
            gpu_layers: 0,
            active_edits: 2,
            queued: 0,
            job: None,
        }
    }

    fn connected_app() -> App {
        let mut app = App::new(false);
        app.on_daemon(DaemonMsg::Connected);
        app.on_daemon(DaemonMsg::Status(status()));
        app
    }

    #[test]
    fn the_empty_screen_invites_a_first_message_and_shows_the_status() {
        let mut app = connected_app();
        let s = screen(&mut app, 80, 24);
        assert!(s.contains("Say something."), "{s}");
        assert!(
            s.contains("no chats yet") && s.contains("nothing learned yet"),
            "{s}"
        );
        assert!(
            s.contains("SmolLM2-135M-Instruct.Q4_1")
                && s.contains("GPU layers 0")
                && s.contains("2 edits"),
            "{s}"
        );
        assert!(s.contains("● connected"));
        assert!(!s.contains("INCOGNITO"));
    }

    #[test]
    fn a_streaming_reply_shows_its_text_so_far_with_a_cursor() {
        let mut app = connected_app();
        for c in "What is **Porto**?".chars() {
            app.input.insert(c);
        }
        let _ = app.on_key(ratatui::crossterm::event::KeyEvent::from(
            ratatui::crossterm::event::KeyCode::Enter,
        ));
        app.on_daemon(DaemonMsg::Token("Porto is a city in ".into()));
        app.on_daemon(DaemonMsg::Token("**Portugal**".into()));
        let s = screen(&mut app, 80, 24);
        assert!(s.contains("you") && s.contains("What is Porto?"), "{s}");
        assert!(s.contains("Porto is a city in Portugal▌"), "{s}");
        assert!(s.contains("Esc stops the reply"));
    }

    #[test]
    fn the_review_queue_lists_pending_preferences_before_active_ones() {
        let mut app = connected_app();
        let pref = |id: i64, attr: &str, target: &str, status: &str, edit: &str| PrefItem {
            id,
            attribute: attr.into(),
            target: target.into(),
            status: status.into(),
            edit_state: edit.into(),
            edit_summary: String::new(),
            progress: 0.0,
        };
        app.on_daemon(DaemonMsg::Prefs(vec![
            pref(1, "city", "Porto", "active", "verified"),
            pref(2, "food", "sushi", "pending", "none"),
        ]));
        app.on_daemon(DaemonMsg::Job(JobProgress {
            preference: Some(1),
            stage: "training".into(),
            progress: 0.5,
        }));
        let s = screen(&mut app, 100, 30);
        let review = s.find("Review (1)").expect("review header");
        let sushi = s.find("#2 food → sushi").expect("pending item");
        let active = s.find("Active (1)").expect("active header");
        let porto = s.find("#1 city → Porto").expect("active item");
        assert!(review < sushi && sushi < active && active < porto, "{s}");
        assert!(s.contains("awaiting review"));
        assert!(s.contains("computing 50%"), "{s}");
        assert!(s.contains("learning [█████░░░░░] 50%"), "{s}");
        // At 80 columns the model's name gives way, not the connection state.
        let s = screen(&mut app, 80, 24);
        let status = s.lines().last().unwrap();
        assert!(
            status.contains("● connected") && status.contains("50%"),
            "{status}"
        );
        assert!(status.contains("SmolLM2"), "{status}");
    }

    #[test]
    fn help_lists_every_key() {
        let mut app = connected_app();
        app.overlay = Some(Overlay::Help);
        // All of it fits the smallest supported terminal.
        let s = screen(&mut app, 80, 24);
        for (k, what) in KEYS {
            assert!(s.contains(k) && s.contains(what), "{k} missing:\n{s}");
        }
    }

    #[test]
    fn an_unreachable_daemon_is_said_plainly_and_not_fatal() {
        let mut app = App::new(false);
        app.on_daemon(DaemonMsg::Unreachable(
            "no daemon at /run/imprint/daemon.sock".into(),
        ));
        let s = screen(&mut app, 80, 24);
        assert!(s.contains("The daemon cannot be reached."), "{s}");
        assert!(s.contains("no daemon at /run/imprint/daemon.sock"));
        assert!(s.contains("daemon unreachable, retrying"));
    }

    #[test]
    fn incognito_and_deletion_are_visible() {
        let mut app = connected_app();
        app.on_daemon(DaemonMsg::Sessions(vec![Session {
            id: -1,
            title: "private".into(),
            incognito: true,
            learning: false,
        }]));
        app.on_daemon(DaemonMsg::Opened {
            id: -1,
            messages: vec![],
        });
        app.overlay = Some(Overlay::ConfirmDelete {
            id: -1,
            title: "◌ private".into(),
        });
        let s = screen(&mut app, 80, 24);
        assert!(s.contains("INCOGNITO"), "{s}");
        assert!(
            s.contains("Delete “◌ private”?") && s.contains("y: delete"),
            "{s}"
        );
    }

    #[test]
    fn small_and_tiny_terminals_do_not_break_the_layout() {
        let mut app = connected_app();
        app.on_daemon(DaemonMsg::Opened {
            id: 1,
            messages: (0..40)
                .map(|i| {
                    (
                        "user".to_string(),
                        format!("message number {i} with some words to wrap around"),
                    )
                })
                .collect(),
        });
        let s = screen(&mut app, 80, 24);
        assert!(
            s.contains("message number 39"),
            "the view follows the end: {s}"
        );
        app.scroll = 10_000;
        let s = screen(&mut app, 80, 24);
        assert!(
            s.contains("message number 0") && s.contains("more below"),
            "{s}"
        );
        // Narrow: the side panes make room; tiny: nothing panics.
        let s = screen(&mut app, 60, 20);
        assert!(!s.contains("Sessions"));
        for (w, h) in [(20, 8), (10, 5), (1, 1)] {
            screen(&mut app, w, h);
        }
    }

    #[test]
    fn no_color_means_no_color() {
        let mut app = connected_app();
        app.on_daemon(DaemonMsg::Opened {
            id: 1,
            messages: vec![("assistant".into(), "```\ncode\n```".into())],
        });
        let mut terminal = Terminal::new(TestBackend::new(80, 24)).unwrap();
        terminal.draw(|f| draw(f, &mut app)).unwrap();
        let buffer = terminal.backend().buffer();
        for cell in buffer.content() {
            assert_eq!(
                cell.fg,
                Color::Reset,
                "a colored cell with NO_COLOR: {cell:?}"
            );
            assert_eq!(cell.bg, Color::Reset);
        }
    }

    #[test]
    fn the_gauge_fills_in_proportion() {
        assert_eq!(gauge(0.0, 4), "[░░░░]");
        assert_eq!(gauge(0.5, 4), "[██░░]");
        assert_eq!(gauge(1.5, 4), "[████]");
    }
}
