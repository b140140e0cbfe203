//! Light Markdown for replies: fenced code blocks, bullet and numbered
//! lists, headings, `code`, **bold** and *emphasis*, wrapped to a width.
//!
//! Line by line on purpose: replies arrive token by token, and a half
//! received reply must render sensibly at every step (an unclosed fence is
//! simply code so far). A full CommonMark parser would reflow paragraphs
//! and buys nothing a chat needs. The wrapping is done here, not by the
//! widget, so the chat pane knows how many rows a message takes and can
//! scroll exactly.

use ratatui::style::{Modifier, Style};
use ratatui::text::{Line, Span};
use unicode_width::UnicodeWidthStr;

/// Styles, so NO_COLOR can turn every color off in one place.
#[derive(Debug, Clone, Copy)]
pub struct Theme {
    pub code: Style,
    pub heading: Style,
    pub bullet: Style,
}

impl Theme {
    pub fn new(color: bool) -> Self {
        use ratatui::style::Color;
        if color {
            Self {
                code: Style::default().fg(Color::Yellow),
                heading: Style::default()
                    .fg(Color::Cyan)
                    .add_modifier(Modifier::BOLD),
                bullet: Style::default().fg(Color::Cyan),
            }
        } else {
            Self {
                code: Style::default(),
                heading: Style::default().add_modifier(Modifier::BOLD),
                bullet: Style::default(),
            }
        }
    }
}

/// Renders `text` into lines no wider than `width` columns.
pub fn render(text: &str, width: usize, theme: &Theme) -> Vec<Line<'static>> {
    let width = width.max(8);
    let mut out = Vec::new();
    let mut in_code = false;
    for raw in text.split('\n') {
        let trimmed = raw.trim_start();
        if trimmed.starts_with("```") {
            in_code = !in_code;
            if in_code {
                let lang = trimmed.trim_start_matches('`').trim();
                out.push(Line::from(Span::styled(
                    if lang.is_empty() {
                        "┌─ code".to_string()
                    } else {
                        format!("┌─ {lang}")
                    },
                    theme.code,
                )));
            } else {
                out.push(Line::from(Span::styled("└─".to_string(), theme.code)));
            }
            continue;
        }
        if in_code {
            // Code is cut, not word-wrapped: its spacing matters.
            let mut rest = raw.replace('\t', "    ");
            loop {
                let (head, tail) = split_at_width(&rest, width.saturating_sub(2));
                out.push(Line::from(vec![
                    Span::styled("│ ".to_string(), theme.code),
                    Span::styled(head.to_string(), theme.code),
                ]));
                if tail.is_empty() {
                    break;
                }
                rest = tail.to_string();
            }
            continue;
        }
        let (prefix, body, style) = if let Some(h) = heading(trimmed) {
            (String::new(), h, Some(theme.heading))
        } else if let Some(item) = trimmed
            .strip_prefix("- ")
            .or_else(|| trimmed.strip_prefix("* "))
            .or_else(|| trimmed.strip_prefix("+ "))
        {
            let indent = raw.len() - trimmed.len();
            (format!("{}• ", " ".repeat(indent.min(8))), item, None)
        } else if let Some((n, item)) = numbered(trimmed) {
            let indent = raw.len() - trimmed.len();
            (format!("{}{n}. ", " ".repeat(indent.min(8))), item, None)
        } else {
            (String::new(), raw, None)
        };
        let spans = inline(body, style);
        out.extend(wrap(spans, &prefix, width, theme));
    }
    out
}

fn heading(line: &str) -> Option<&str> {
    let hashes = line.chars().take_while(|&c| c == '#').count();
    if (1..=6).contains(&hashes) && line[hashes..].starts_with(' ') {
        Some(line[hashes..].trim())
    } else {
        None
    }
}

fn numbered(line: &str) -> Option<(&str, &str)> {
    let digits = line.chars().take_while(char::is_ascii_digit).count();
    if digits == 0 || digits > 3 {
        return None;
    }
    let rest = &line[digits..];
    rest.strip_prefix(". ")
        .or_else(|| rest.strip_prefix(") "))
        .map(|item| (&line[..digits], item))
}

/// `code`, **bold**, *emphasis* / _emphasis_ as styled spans (unclosed
/// markers are kept as text).
fn inline(text: &str, base: Option<Style>) -> Vec<(String, Style)> {
    let base = base.unwrap_or_default();
    let mut spans: Vec<(String, Style)> = Vec::new();
    let mut rest = text;
    while !rest.is_empty() {
        let next = ["`", "**", "*", "_"]
            .iter()
            .filter_map(|m| rest.find(m).map(|i| (i, *m)))
            .min_by_key(|(i, m)| (*i, std::cmp::Reverse(m.len())));
        let Some((start, marker)) = next else {
            spans.push((rest.to_string(), base));
            break;
        };
        let after = &rest[start + marker.len()..];
        let close = after.find(marker).filter(|&end| end > 0);
        // `_` inside words (snake_case) is not emphasis.
        let word_inner = marker == "_"
            && rest[..start]
                .chars()
                .next_back()
                .is_some_and(char::is_alphanumeric);
        match close {
            Some(end) if !word_inner => {
                if start > 0 {
                    spans.push((rest[..start].to_string(), base));
                }
                let style = match marker {
                    "`" => base.add_modifier(Modifier::REVERSED),
                    "**" => base.add_modifier(Modifier::BOLD),
                    _ => base.add_modifier(Modifier::ITALIC),
                };
                spans.push((after[..end].to_string(), style));
                rest = &after[end + marker.len()..];
            }
            _ => {
                spans.push((rest[..start + marker.len()].to_string(), base));
                rest = after;
            }
        }
    }
    spans
}

/// Word-wraps styled spans; continuation lines are indented under the
/// prefix (so list items hang).
fn wrap(
    spans: Vec<(String, Style)>,
    prefix: &str,
    width: usize,
    theme: &Theme,
) -> Vec<Line<'static>> {
    let indent = " ".repeat(prefix.width());
    let mut lines = Vec::new();
    let mut current: Vec<Span<'static>> = Vec::new();
    let mut used = 0;
    let start_line = |current: &mut Vec<Span<'static>>, used: &mut usize, first: bool| {
        let p = if first {
            prefix.to_string()
        } else {
            indent.clone()
        };
        *used = p.width();
        if !p.is_empty() {
            current.push(Span::styled(p, theme.bullet));
        }
    };
    start_line(&mut current, &mut used, true);
    let mut line_has_text = false;
    for (text, style) in spans {
        for word in split_keep_spaces(&text) {
            let w = word.width();
            if used + w > width && line_has_text {
                lines.push(Line::from(std::mem::take(&mut current)));
                start_line(&mut current, &mut used, false);
                line_has_text = false;
                if word.trim().is_empty() {
                    continue;
                }
            }
            // A word longer than a whole line is cut.
            let mut word = word.to_string();
            while used + word.width() > width {
                let (head, tail) = split_at_width(&word, width - used);
                if head.is_empty() {
                    break;
                }
                current.push(Span::styled(head.to_string(), style));
                lines.push(Line::from(std::mem::take(&mut current)));
                start_line(&mut current, &mut used, false);
                word = tail.to_string();
            }
            used += word.width();
            line_has_text |= !word.trim().is_empty();
            current.push(Span::styled(word, style));
        }
    }
    lines.push(Line::from(current));
    lines
}

/// Splits into words with their trailing spaces attached.
fn split_keep_spaces(text: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut in_space = false;
    for (i, c) in text.char_indices() {
        if c == ' ' {
            in_space = true;
        } else if in_space {
            out.push(&text[start..i]);
            start = i;
            in_space = false;
        }
    }
    if start < text.len() {
        out.push(&text[start..]);
    }
    out
}

/// The longest prefix of `s` at most `width` columns wide, and the rest.
fn split_at_width(s: &str, width: usize) -> (&str, &str) {
    let mut used = 0;
    for (i, c) in s.char_indices() {
        let w = unicode_width::UnicodeWidthChar::width(c).unwrap_or(0);
        if used + w > width {
            return (&s[..i], &s[i..]);
        }
        used += w;
    }
    (s, "")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plain(lines: &[Line]) -> Vec<String> {
        lines
            .iter()
            .map(|l| l.spans.iter().map(|s| s.content.as_ref()).collect())
            .collect()
    }

    #[test]
    fn lists_code_and_emphasis() {
        let t = Theme::new(false);
        let text = "# Plan\n- one **bold** step\n2. two `x`\n```rust\nfn main() {}\n```\nend";
        let lines = render(text, 40, &t);
        assert_eq!(
            plain(&lines),
            vec![
                "Plan",
                "• one bold step",
                "2. two x",
                "┌─ rust",
                "│ fn main() {}",
                "└─",
                "end"
            ]
        );
        let bold = &lines[1].spans.iter().find(|s| s.content == "bold").unwrap();
        assert!(bold.style.add_modifier.contains(Modifier::BOLD));
    }

    #[test]
    fn wrapping_respects_the_width_and_hangs_list_items() {
        let t = Theme::new(false);
        let lines = render("- alpha beta gamma delta epsilon", 16, &t);
        let text = plain(&lines);
        assert!(text.iter().all(|l| l.width() <= 16), "{text:?}");
        assert_eq!(text[0], "• alpha beta ");
        assert!(text[1].starts_with("  "), "{text:?}");
        let long = render(&"x".repeat(50), 16, &t);
        assert!(plain(&long).iter().all(|l| l.width() <= 16));
        assert_eq!(plain(&long).concat(), "x".repeat(50));
    }

    #[test]
    fn unclosed_markers_and_snake_case_stay_text() {
        let t = Theme::new(false);
        assert_eq!(
            plain(&render("a *b and snake_case_name", 60, &t)),
            vec!["a *b and snake_case_name"]
        );
        // A fence still open mid-stream renders as code so far.
        assert_eq!(
            plain(&render("```\nlet x", 60, &t)),
            vec!["┌─ code", "│ let x"]
        );
    }
}
