//! The wire format between clients and the daemon: newline-delimited JSON,
//! one object per line, described for people in `docs/PROTOCOL.md`.
//!
//! A client sends requests `{"id": 7, "method": "send", "params": {…}}`.
//! The daemon answers each with exactly one final frame, `{"id": 7,
//! "result": …}` or `{"id": 7, "error": {"code": …, "message": …}}`, and
//! may send `{"id": 7, "event": "token", "data": …}` frames before it.
//! Frames of different requests interleave; frames of one request arrive
//! in order.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Bumped when a change would break an existing client.
pub const PROTOCOL_VERSION: u32 = 1;

/// Longest frame either side accepts, newline excluded.
pub const MAX_FRAME_BYTES: usize = 1024 * 1024;

/// A request as it arrives. `params` stays untyped until the method is
/// known, so an unknown method is an error frame and not a parse failure.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Request {
    pub id: u64,
    pub method: String,
    #[serde(default)]
    pub params: Value,
}

/// Anything the daemon sends.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum Frame {
    Result {
        id: u64,
        result: Value,
    },
    Error {
        /// None when the request could not even be read (no id known).
        id: Option<u64>,
        error: ErrorBody,
    },
    Event {
        /// None for events not tied to a request (`subscribe` streams
        /// carry the subscribing request's id).
        id: Option<u64>,
        event: String,
        data: Value,
    },
}

impl Frame {
    pub fn result(id: u64, result: impl Serialize) -> Self {
        Frame::Result {
            id,
            result: serde_json::to_value(result).unwrap_or(Value::Null),
        }
    }

    pub fn error(id: Option<u64>, code: ErrorCode, message: impl Into<String>) -> Self {
        Frame::Error {
            id,
            error: ErrorBody {
                code,
                message: message.into(),
            },
        }
    }

    pub fn event(id: Option<u64>, event: &str, data: impl Serialize) -> Self {
        Frame::Event {
            id,
            event: event.to_string(),
            data: serde_json::to_value(data).unwrap_or(Value::Null),
        }
    }

    /// The frame as one line, newline included.
    pub fn to_line(&self) -> String {
        let mut line = serde_json::to_string(self).unwrap_or_else(|e| {
            format!(r#"{{"id":null,"error":{{"code":"internal","message":"cannot encode a frame: {e}"}}}}"#)
        });
        line.push('\n');
        line
    }

    /// The request this frame belongs to.
    pub fn id(&self) -> Option<u64> {
        match self {
            Frame::Result { id, .. } => Some(*id),
            Frame::Error { id, .. } | Frame::Event { id, .. } => *id,
        }
    }

    /// Whether this frame ends its request.
    pub fn is_final(&self) -> bool {
        !matches!(self, Frame::Event { .. })
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ErrorBody {
    pub code: ErrorCode,
    pub message: String,
}

/// Machine-readable error kinds; the message says what to do.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The line is not a JSON request object.
    Malformed,
    /// The line is longer than [`MAX_FRAME_BYTES`].
    FrameTooLarge,
    /// The connection ended (or stalled) in the middle of a frame.
    IncompleteFrame,
    /// The first request must be `hello`.
    HandshakeRequired,
    /// The client speaks another protocol version.
    Version,
    UnknownMethod,
    /// The params do not fit the method.
    InvalidParams,
    /// No such session, preference, …
    NotFound,
    /// The request was cancelled (by `cancel`, or the daemon stopping).
    Cancelled,
    /// Another Unix user tried to connect.
    Forbidden,
    /// The daemon is shutting down.
    ShuttingDown,
    /// Something failed inside the daemon; the message says what.
    Internal,
}

/// What `hello` sends.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Hello {
    pub protocol: u32,
    #[serde(default)]
    pub client: String,
}

/// What `hello` answers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Welcome {
    pub protocol: u32,
    pub daemon: String,
    pub pid: u32,
}

/// One event of a streamed reply (`send`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TokenEvent {
    /// 0, 1, 2, … within the reply: a client can check nothing is missing.
    pub seq: u64,
    pub text: String,
}

/// The final frame of `send`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Reply {
    pub session: i64,
    pub text: String,
    /// end_of_turn, max_tokens, context_full or cancelled.
    pub stop: String,
    pub tokens: usize,
    pub prompt_tokens: usize,
    pub reused_tokens: usize,
    /// Time from the request reaching the daemon to the first token.
    pub first_token_ms: f64,
    pub tokens_per_second: f64,
    /// Whether the reply was computed with the profile's edits.
    pub personalized: bool,
    /// The adapter generation the reply used (see `status`).
    pub adapter_generation: u64,
}
