//! Chat-history importers: other assistants' exports, read as a stream of
//! messages.
//!
//! Formats: the ChatGPT data export (`conversations.json`, a mapping tree
//! per conversation), the Claude export (`conversations.json` with
//! `chat_messages`), generic JSONL (a `{role, content}` message per line,
//! or a `{messages: [...]}` conversation per line), Markdown transcripts
//! (`User:` / `**User:**` / `## User` speakers) and plain text (one user
//! message per line).
//!
//! Memory stays bounded whatever the file size: JSON exports are walked one
//! conversation at a time (`serde_json`'s streaming deserializer), line
//! formats one line at a time, and a line longer than [`MAX_LINE`] is
//! skipped (and counted) without being held. Every error names the file and
//! the position (line and column, or line), and nothing is written to the
//! profile by the reader itself.

use std::fmt;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::LazyLock;

use regex::Regex;
use serde::de::{DeserializeSeed, SeqAccess, Visitor};
use serde::Serialize;
use thiserror::Error;

/// Longest line (or message) the line formats read, in bytes.
pub const MAX_LINE: usize = 256 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Chatgpt,
    Claude,
    Jsonl,
    Markdown,
    Text,
}

#[derive(Debug, Error)]
pub enum ImportError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} looks like binary data (a NUL byte at offset {offset}), not a chat export; pass --format to insist")]
    Binary { path: PathBuf, offset: usize },
    #[error("{path}, line {line}: not valid UTF-8 text")]
    Utf8 { path: PathBuf, line: usize },
    #[error("{path}, line {line}, column {column}: {message}")]
    Json {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("{path}: {message}")]
    Schema { path: PathBuf, message: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Speaker {
    User,
    Assistant,
    Other,
}

/// One message of an imported history.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ImportedMessage {
    /// The conversation's id or title in the export.
    pub conversation: String,
    /// The message's position in its conversation (0-based).
    pub index: usize,
    pub speaker: Speaker,
    pub text: String,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct ReadStats {
    pub conversations: usize,
    pub messages: usize,
    /// Lines over [`MAX_LINE`] bytes, skipped.
    pub oversized_lines: usize,
}

fn speaker(role: &str) -> Speaker {
    match role.to_ascii_lowercase().as_str() {
        "user" | "human" | "you" | "me" => Speaker::User,
        "assistant" | "ai" | "bot" | "chatgpt" | "claude" | "model" | "gpt" => Speaker::Assistant,
        _ => Speaker::Other,
    }
}

/// Guesses the format from the name and the first bytes.
pub fn detect(path: &Path) -> Result<Format, ImportError> {
    let io = |source| ImportError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut head = vec![0u8; 8192];
    let mut f = std::fs::File::open(path).map_err(io)?;
    let n = f.read(&mut head).map_err(io)?;
    head.truncate(n);
    if let Some(offset) = head.iter().position(|b| *b == 0) {
        return Err(ImportError::Binary {
            path: path.to_path_buf(),
            offset,
        });
    }
    let text = String::from_utf8_lossy(&head);
    let trimmed = text.trim_start_matches('\u{feff}').trim_start();
    let ext = path
        .extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    Ok(if trimmed.starts_with('[') {
        if text.contains("\"chat_messages\"") {
            Format::Claude
        } else {
            Format::Chatgpt
        }
    } else if ext == "jsonl" || ext == "ndjson" || trimmed.starts_with('{') {
        Format::Jsonl
    } else if ext == "md" || ext == "markdown" || MD_SPEAKER.is_match(&text) {
        Format::Markdown
    } else {
        Format::Text
    })
}

/// Reads `path` as `format`, calling `on_message` for every message in
/// order. Stops at the first error of the file or of the callback.
pub fn read<E>(
    path: &Path,
    format: Format,
    mut on_message: impl FnMut(ImportedMessage) -> Result<(), E>,
) -> Result<ReadStats, ReadError<E>> {
    let io = |source| ImportError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = std::fs::File::open(path).map_err(|e| ReadError::Import(io(e)))?;
    let reader = BufReader::with_capacity(64 * 1024, file);
    let mut stats = ReadStats::default();
    match format {
        Format::Chatgpt | Format::Claude => {
            read_json_array(path, reader, format, &mut stats, &mut on_message)?
        }
        Format::Jsonl => read_lines(path, reader, &mut stats, |line_no, line, stats| {
            jsonl_line(path, line_no, line, stats, &mut on_message)
        })?,
        Format::Markdown => read_markdown(path, reader, &mut stats, &mut on_message)?,
        Format::Text => {
            let name = file_name(path);
            stats.conversations = 1;
            read_lines(path, reader, &mut stats, |line_no, line, stats| {
                let text = line.trim();
                if text.is_empty() {
                    return Ok(());
                }
                stats.messages += 1;
                on_message(ImportedMessage {
                    conversation: name.clone(),
                    index: line_no - 1,
                    speaker: Speaker::User,
                    text: text.to_string(),
                })
                .map_err(ReadError::Callback)
            })?
        }
    }
    Ok(stats)
}

/// An error of the file, or of what the caller did with a message.
#[derive(Debug)]
pub enum ReadError<E> {
    Import(ImportError),
    Callback(E),
}

impl<E: fmt::Display> fmt::Display for ReadError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReadError::Import(e) => e.fmt(f),
            ReadError::Callback(e) => e.fmt(f),
        }
    }
}

impl<E: fmt::Debug + fmt::Display> std::error::Error for ReadError<E> {}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string())
}

/// Calls `each(line_number, line)` for every line, bounded by [`MAX_LINE`].
fn read_lines<R: BufRead, E>(
    path: &Path,
    mut reader: R,
    stats: &mut ReadStats,
    mut each: impl FnMut(usize, &str, &mut ReadStats) -> Result<(), ReadError<E>>,
) -> Result<(), ReadError<E>> {
    let mut buf = Vec::new();
    let mut line_no = 0;
    loop {
        buf.clear();
        line_no += 1;
        let n = (&mut reader)
            .take(MAX_LINE as u64 + 1)
            .read_until(b'\n', &mut buf)
            .map_err(|source| {
                ReadError::Import(ImportError::Io {
                    path: path.to_path_buf(),
                    source,
                })
            })?;
        if n == 0 {
            return Ok(());
        }
        if buf.len() > MAX_LINE && buf.last() != Some(&b'\n') {
            // Skip the rest of an oversized line without holding it.
            stats.oversized_lines += 1;
            loop {
                let chunk = reader.fill_buf().map_err(|source| {
                    ReadError::Import(ImportError::Io {
                        path: path.to_path_buf(),
                        source,
                    })
                })?;
                if chunk.is_empty() {
                    return Ok(());
                }
                match chunk.iter().position(|b| *b == b'\n') {
                    Some(i) => {
                        reader.consume(i + 1);
                        break;
                    }
                    None => {
                        let len = chunk.len();
                        reader.consume(len);
                    }
                }
            }
            continue;
        }
        if buf.contains(&0) {
            return Err(ReadError::Import(ImportError::Binary {
                path: path.to_path_buf(),
                offset: 0,
            }));
        }
        let line = std::str::from_utf8(&buf).map_err(|_| {
            ReadError::Import(ImportError::Utf8 {
                path: path.to_path_buf(),
                line: line_no,
            })
        })?;
        each(line_no, line.trim_end_matches(['\n', '\r']), stats)?;
    }
}

fn json_error(path: &Path, e: &serde_json::Error) -> ImportError {
    ImportError::Json {
        path: path.to_path_buf(),
        line: e.line(),
        column: e.column(),
        message: e.to_string(),
    }
}

fn jsonl_line<E>(
    path: &Path,
    line_no: usize,
    line: &str,
    stats: &mut ReadStats,
    on_message: &mut impl FnMut(ImportedMessage) -> Result<(), E>,
) -> Result<(), ReadError<E>> {
    if line.trim().is_empty() {
        return Ok(());
    }
    let value: serde_json::Value = serde_json::from_str(line).map_err(|e| {
        ReadError::Import(ImportError::Json {
            path: path.to_path_buf(),
            line: line_no,
            column: e.column(),
            message: e.to_string(),
        })
    })?;
    let schema = |message: String| {
        ReadError::Import(ImportError::Schema {
            path: path.to_path_buf(),
            message: format!("line {line_no}: {message}"),
        })
    };
    let message_of = |v: &serde_json::Value| -> Option<(Speaker, String)> {
        let role = v.get("role").and_then(|r| r.as_str())?;
        let content = match v.get("content")? {
            serde_json::Value::String(s) => s.clone(),
            // OpenAI-style content parts.
            serde_json::Value::Array(parts) => parts
                .iter()
                .filter_map(|p| p.get("text").and_then(|t| t.as_str()).or(p.as_str()))
                .collect::<Vec<_>>()
                .join("\n"),
            _ => return None,
        };
        Some((speaker(role), content))
    };
    if let Some(messages) = value.get("messages").and_then(|m| m.as_array()) {
        stats.conversations += 1;
        let conversation = value
            .get("id")
            .or_else(|| value.get("title"))
            .map(|v| {
                v.as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| v.to_string())
            })
            .unwrap_or_else(|| format!("line {line_no}"));
        for (index, m) in messages.iter().enumerate() {
            let (speaker, text) = message_of(m)
                .ok_or_else(|| schema(format!("message {index} has no role and text content")))?;
            stats.messages += 1;
            on_message(ImportedMessage {
                conversation: conversation.clone(),
                index,
                speaker,
                text,
            })
            .map_err(ReadError::Callback)?;
        }
        return Ok(());
    }
    let (speaker, text) = message_of(&value).ok_or_else(|| {
        schema("expected {\"role\", \"content\"} or {\"messages\": [...]}".into())
    })?;
    if stats.conversations == 0 {
        stats.conversations = 1;
    }
    stats.messages += 1;
    on_message(ImportedMessage {
        conversation: file_name(path),
        index: line_no - 1,
        speaker,
        text,
    })
    .map_err(ReadError::Callback)
}

static MD_SPEAKER: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"(?im)^\s*(?:#{1,6}\s*|\*\*|__)?(user|you|me|human|assistant|chatgpt|claude|ai|bot|model)(?:\*\*|__)?\s*:?\s*(?:\*\*|__)?\s*:?\s*(.*)$")
        .unwrap_or_else(|e| panic!("bad markdown speaker pattern: {e}"))
});

fn read_markdown<R: BufRead, E>(
    path: &Path,
    reader: R,
    stats: &mut ReadStats,
    on_message: &mut impl FnMut(ImportedMessage) -> Result<(), E>,
) -> Result<(), ReadError<E>> {
    let name = file_name(path);
    let mut current: Option<(Speaker, String)> = None;
    let mut index = 0;
    let mut flush = |current: &mut Option<(Speaker, String)>,
                     stats: &mut ReadStats|
     -> Result<(), ReadError<E>> {
        if let Some((speaker, text)) = current.take() {
            let text = text.trim().to_string();
            if !text.is_empty() {
                stats.messages += 1;
                on_message(ImportedMessage {
                    conversation: name.clone(),
                    index,
                    speaker,
                    text,
                })
                .map_err(ReadError::Callback)?;
                index += 1;
            }
        }
        Ok(())
    };
    stats.conversations = 1;
    read_lines(path, reader, stats, |_, line, stats| {
        // A speaker line must say who speaks and end the label with ':'
        // or be a heading; plain prose that starts with "You" is not one.
        let is_label = line.contains(':') || line.trim_start().starts_with('#');
        match MD_SPEAKER.captures(line).filter(|_| is_label) {
            Some(c) => {
                flush(&mut current, stats)?;
                let who = speaker(c.get(1).map(|m| m.as_str()).unwrap_or(""));
                let rest = c.get(2).map(|m| m.as_str()).unwrap_or("").to_string();
                current = Some((who, rest));
            }
            None => {
                if let Some((_, text)) = &mut current {
                    if text.len() < MAX_LINE {
                        text.push('\n');
                        text.push_str(line);
                    }
                }
            }
        }
        Ok(())
    })?;
    flush(&mut current, stats)
}

/// Walks a top-level JSON array one conversation at a time.
fn read_json_array<R: Read, E>(
    path: &Path,
    reader: R,
    format: Format,
    stats: &mut ReadStats,
    on_message: &mut impl FnMut(ImportedMessage) -> Result<(), E>,
) -> Result<(), ReadError<E>> {
    struct Walk<'a, F, E> {
        path: &'a Path,
        format: Format,
        stats: &'a mut ReadStats,
        on_message: &'a mut F,
        failure: Option<ReadError<E>>,
    }
    impl<'de, F: FnMut(ImportedMessage) -> Result<(), E>, E> Visitor<'de> for &mut Walk<'_, F, E> {
        type Value = ();
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a JSON array of conversations")
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
            let mut position = 0;
            while let Some(conversation) = seq.next_element::<serde_json::Value>()? {
                let result = match self.format {
                    Format::Claude => claude(self.path, position, &conversation),
                    _ => chatgpt(self.path, position, &conversation),
                };
                position += 1;
                let messages = match result {
                    Ok(m) => m,
                    Err(e) => {
                        self.failure = Some(ReadError::Import(e));
                        return Err(serde::de::Error::custom("schema"));
                    }
                };
                self.stats.conversations += 1;
                for m in messages {
                    self.stats.messages += 1;
                    if let Err(e) = (self.on_message)(m) {
                        self.failure = Some(ReadError::Callback(e));
                        return Err(serde::de::Error::custom("stopped"));
                    }
                }
            }
            Ok(())
        }
    }
    impl<'de, F: FnMut(ImportedMessage) -> Result<(), E>, E> DeserializeSeed<'de>
        for &mut Walk<'_, F, E>
    {
        type Value = ();
        fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
            d.deserialize_seq(self)
        }
    }
    let mut walk = Walk {
        path,
        format,
        stats,
        on_message,
        failure: None,
    };
    let mut de = serde_json::Deserializer::from_reader(reader);
    let result = (&mut walk).deserialize(&mut de).and_then(|_| de.end());
    if let Some(failure) = walk.failure {
        return Err(failure);
    }
    result.map_err(|e| ReadError::Import(json_error(path, &e)))
}

fn text_of(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Array(parts) => parts
            .iter()
            .map(text_of)
            .filter(|s| !s.is_empty())
            .collect::<Vec<_>>()
            .join("\n"),
        serde_json::Value::Object(o) => o.get("text").map(text_of).unwrap_or_default(),
        _ => String::new(),
    }
}

/// A ChatGPT conversation: `mapping` holds the message tree; the thread
/// shown to the user is followed from `current_node` up to the root (or,
/// without one, messages are ordered by `create_time`).
fn chatgpt(
    path: &Path,
    position: usize,
    c: &serde_json::Value,
) -> Result<Vec<ImportedMessage>, ImportError> {
    let schema = |message: String| ImportError::Schema {
        path: path.to_path_buf(),
        message: format!("conversation {position}: {message}"),
    };
    let mapping = c
        .get("mapping")
        .and_then(|m| m.as_object())
        .ok_or_else(|| {
            schema("no \"mapping\" object: is this a ChatGPT conversations.json?".into())
        })?;
    let id = c
        .get("conversation_id")
        .or_else(|| c.get("id"))
        .or_else(|| c.get("title"))
        .and_then(|v| v.as_str())
        .map(str::to_string)
        .unwrap_or_else(|| format!("conversation {position}"));
    let mut chain: Vec<&serde_json::Value> = Vec::new();
    if let Some(mut node) = c.get("current_node").and_then(|n| n.as_str()) {
        let mut guard = 0;
        while let Some(entry) = mapping.get(node) {
            chain.push(entry);
            guard += 1;
            match entry.get("parent").and_then(|p| p.as_str()) {
                Some(parent) if guard <= mapping.len() => node = parent,
                _ => break,
            }
        }
        chain.reverse();
    } else {
        chain = mapping.values().collect();
        chain.sort_by(|a, b| {
            let t = |v: &serde_json::Value| {
                v.pointer("/message/create_time")
                    .and_then(|t| t.as_f64())
                    .unwrap_or(f64::MAX)
            };
            t(a).total_cmp(&t(b))
        });
    }
    let mut out = Vec::new();
    // The index counts every message of the thread, shown or not (the
    // hidden system message is index 0), so it points into the export.
    let mut index = 0;
    for entry in chain {
        let Some(message) = entry.get("message").filter(|m| !m.is_null()) else {
            continue;
        };
        index += 1;
        let role = message
            .pointer("/author/role")
            .and_then(|r| r.as_str())
            .unwrap_or("");
        let text = message
            .pointer("/content/parts")
            .map(text_of)
            .or_else(|| message.pointer("/content/text").map(text_of))
            .unwrap_or_default();
        if text.trim().is_empty() {
            continue;
        }
        out.push(ImportedMessage {
            conversation: id.clone(),
            index: index - 1,
            speaker: speaker(role),
            text,
        });
    }
    Ok(out)
}

/// A Claude conversation: `chat_messages` in order, `sender` human or
/// assistant, the words in `text` (or in `content` blocks).
fn claude(
    path: &Path,
    position: usize,
    c: &serde_json::Value,
) -> Result<Vec<ImportedMessage>, ImportError> {
    let messages = c
        .get("chat_messages")
        .and_then(|m| m.as_array())
        .ok_or_else(|| ImportError::Schema {
            path: path.to_path_buf(),
            message: format!(
                "conversation {position}: no \"chat_messages\" array: is this a Claude conversations.json?"
            ),
        })?;
    let id = c
        .get("uuid")
        .or_else(|| c.get("name"))
        .and_then(|v| v.as_str())
        .map(str::to_string)
        .unwrap_or_else(|| format!("conversation {position}"));
    Ok(messages
        .iter()
        .enumerate()
        .filter_map(|(index, m)| {
            let role = m.get("sender").and_then(|s| s.as_str()).unwrap_or("");
            let text = m
                .get("text")
                .map(text_of)
                .filter(|t| !t.trim().is_empty())
                .or_else(|| m.get("content").map(text_of))
                .unwrap_or_default();
            (!text.trim().is_empty()).then(|| ImportedMessage {
                conversation: id.clone(),
                index,
                speaker: speaker(role),
                text,
            })
        })
        .collect())
}

/// What importing one file did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ImportSummary {
    pub read: ReadStats,
    /// User messages looked at (assistant and system turns are never learned from).
    pub user_messages: usize,
    /// User messages skipped because an earlier import already saw them.
    pub already_imported: usize,
    pub capture: super::capture::CaptureReport,
}

/// Imports one chat-history file: every user message not seen before goes
/// through capture, with its provenance (file, conversation, index).
/// `progress` gets the number of messages read so far.
pub fn import_history(
    profile: &mut crate::profile::Profile,
    path: &Path,
    format: Format,
    settings: &super::capture::CaptureSettings,
    model_sha256: Option<&str>,
    mut progress: impl FnMut(usize),
) -> Result<ImportSummary, ReadError<super::LearnError>> {
    use sha2::{Digest, Sha256};
    let file = path
        .canonicalize()
        .unwrap_or_else(|_| path.to_path_buf())
        .display()
        .to_string();
    let mut summary = ImportSummary::default();
    let mut seen = 0usize;
    let read = read(path, format, |m: ImportedMessage| {
        seen += 1;
        progress(seen);
        if m.speaker != Speaker::User {
            return Ok(());
        }
        summary.user_messages += 1;
        // The same message of the same conversation: a re-import, or an
        // overlapping newer export.
        let hash = hex::encode(Sha256::digest(format!("{}\u{0}{}", m.conversation, m.text)));
        if profile
            .was_imported(&hash)
            .map_err(super::LearnError::from)?
        {
            summary.already_imported += 1;
            return Ok(());
        }
        let source = crate::profile::SourceRef::Import {
            file: file.clone(),
            conversation: m.conversation.clone(),
            message_index: m.index as i64,
        };
        super::capture::capture_text(
            profile,
            &source,
            &m.text,
            settings,
            model_sha256,
            None,
            &mut summary.capture,
        )?;
        // Marked after capture: a crash in between re-captures the message
        // on the next import, which only adds a duplicate source.
        profile
            .mark_imported(&hash, &file)
            .map_err(super::LearnError::from)?;
        Ok(())
    })?;
    summary.read = read;
    profile
        .audit(
            "imported",
            &format!("history {file}"),
            &format!(
                "{} conversation(s), {} user message(s), {} new preference(s), {} pending, {} already imported",
                summary.read.conversations,
                summary.user_messages,
                summary.capture.learned.len(),
                summary.capture.pending.len(),
                summary.already_imported
            ),
        )
        .map_err(|e| ReadError::Callback(e.into()))?;
    Ok(summary)
}
