//! The message being typed: a multi-line buffer with a cursor, and the
//! history of sent messages (Up/Down), the way a shell recalls commands.

/// A text buffer with a cursor at a char boundary.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Input {
    text: String,
    /// Byte offset of the cursor, always on a char boundary.
    cursor: usize,
}

impl Input {
    pub fn text(&self) -> &str {
        &self.text
    }

    pub fn is_empty(&self) -> bool {
        self.text.is_empty()
    }

    pub fn set(&mut self, text: &str) {
        self.text = text.to_string();
        self.cursor = self.text.len();
    }

    /// Empties the buffer and returns what it held.
    pub fn take(&mut self) -> String {
        self.cursor = 0;
        std::mem::take(&mut self.text)
    }

    pub fn insert(&mut self, c: char) {
        self.text.insert(self.cursor, c);
        self.cursor += c.len_utf8();
    }

    pub fn insert_str(&mut self, s: &str) {
        self.text.insert_str(self.cursor, s);
        self.cursor += s.len();
    }

    pub fn backspace(&mut self) {
        if let Some((i, _)) = self.text[..self.cursor].char_indices().next_back() {
            self.text.remove(i);
            self.cursor = i;
        }
    }

    pub fn delete(&mut self) {
        if self.cursor < self.text.len() {
            self.text.remove(self.cursor);
        }
    }

    pub fn left(&mut self) {
        if let Some((i, _)) = self.text[..self.cursor].char_indices().next_back() {
            self.cursor = i;
        }
    }

    pub fn right(&mut self) {
        if let Some(c) = self.text[self.cursor..].chars().next() {
            self.cursor += c.len_utf8();
        }
    }

    /// To the start of the current line.
    pub fn home(&mut self) {
        self.cursor = self.text[..self.cursor].rfind('\n').map_or(0, |i| i + 1);
    }

    /// To the end of the current line.
    pub fn end(&mut self) {
        self.cursor = self.text[self.cursor..]
            .find('\n')
            .map_or(self.text.len(), |i| self.cursor + i);
    }

    /// Deletes the word before the cursor (Ctrl+W).
    pub fn delete_word(&mut self) {
        let before = &self.text[..self.cursor];
        let trimmed = before.trim_end();
        let start = trimmed.rfind(char::is_whitespace).map_or(0, |i| {
            i + trimmed[i..].chars().next().map_or(1, char::len_utf8)
        });
        self.text.replace_range(start..self.cursor, "");
        self.cursor = start;
    }

    pub fn is_multiline(&self) -> bool {
        self.text.contains('\n')
    }

    /// (line, column in chars) of the cursor, for placing the terminal's.
    pub fn cursor_position(&self) -> (usize, usize) {
        let before = &self.text[..self.cursor];
        let line = before.matches('\n').count();
        let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count());
        (line, col)
    }
}

/// Sent messages, newest last, and where Up/Down currently is.
#[derive(Debug, Clone, Default)]
pub struct History {
    entries: Vec<String>,
    /// None: editing a new message.
    position: Option<usize>,
    /// What was being typed before browsing started.
    draft: String,
}

impl History {
    pub fn push(&mut self, entry: &str) {
        if !entry.trim().is_empty() && self.entries.last().map(String::as_str) != Some(entry) {
            self.entries.push(entry.to_string());
        }
        self.position = None;
    }

    /// The previous entry, remembering `current` as the draft on the first step.
    pub fn older(&mut self, current: &str) -> Option<&str> {
        if self.entries.is_empty() {
            return None;
        }
        let next = match self.position {
            None => {
                self.draft = current.to_string();
                self.entries.len() - 1
            }
            Some(0) => 0,
            Some(p) => p - 1,
        };
        self.position = Some(next);
        self.entries.get(next).map(String::as_str)
    }

    /// The next entry, or the draft after the newest.
    pub fn newer(&mut self) -> Option<&str> {
        match self.position {
            None => None,
            Some(p) if p + 1 < self.entries.len() => {
                self.position = Some(p + 1);
                self.entries.get(p + 1).map(String::as_str)
            }
            Some(_) => {
                self.position = None;
                Some(self.draft.as_str())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn editing_keeps_the_cursor_on_char_boundaries() {
        let mut i = Input::default();
        for c in "héllo".chars() {
            i.insert(c);
        }
        i.left();
        i.left();
        i.left();
        i.backspace();
        assert_eq!(i.text(), "hllo");
        i.insert('é');
        assert_eq!(i.text(), "héllo");
        i.end();
        i.insert('\n');
        i.insert_str("wörld");
        assert_eq!(i.cursor_position(), (1, 5));
        i.home();
        assert_eq!(i.cursor_position(), (1, 0));
        i.delete();
        assert_eq!(i.text(), "héllo\nörld");
        assert!(i.is_multiline());
    }

    #[test]
    fn ctrl_w_deletes_the_last_word() {
        let mut i = Input::default();
        i.set("I live in  Porto ");
        i.delete_word();
        assert_eq!(i.text(), "I live in  ");
        i.delete_word();
        assert_eq!(i.text(), "I live ");
    }

    #[test]
    fn history_walks_back_and_returns_to_the_draft() {
        let mut h = History::default();
        h.push("one");
        h.push("two");
        h.push("two");
        assert_eq!(h.older("draft"), Some("two"));
        assert_eq!(h.older("two"), Some("one"));
        assert_eq!(h.older("one"), Some("one"), "stops at the oldest");
        assert_eq!(h.newer(), Some("two"));
        assert_eq!(h.newer(), Some("draft"));
        assert_eq!(h.newer(), None);
    }
}
