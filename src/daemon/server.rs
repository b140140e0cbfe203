//! The socket server: accept, check who is calling, read frames without
//! trusting them, and dispatch each request to its method.
//!
//! Every connection gets two tasks: a reader that parses frames and starts
//! one handler task per request, and a writer that owns the socket's write
//! half and sends frames in the order the handlers produce them. Requests
//! on one connection therefore run concurrently (a `cancel` can overtake
//! the `send` it cancels), and a slow client only slows itself.
//!
//! A client that goes away mid-reply is noticed by the writer (the next
//! token cannot be written); its generations are cancelled at once, so the
//! inference thread moves on to the next client's reply.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc;

use super::inference::{GenerateEvent, GenerateTask, Task};
use super::protocol::{
    ErrorCode, Frame, Hello, Reply, Request, TokenEvent, Welcome, MAX_FRAME_BYTES, PROTOCOL_VERSION,
};
use super::runtime::{current_uid, RuntimeFiles};
use super::{DaemonError, DaemonEvent, Shared};
use crate::engine::{ChatMessage, GenerationParams, Role, Sampling, StopReason};
use crate::learn::review;
use crate::profile::{
    ClusterMember, NewPreference, Polarity, PreferenceStatus, ProfileError, SourceRef,
};

/// How long a frame may stay half-sent before the connection is closed.
fn frame_stall_limit() -> Duration {
    std::env::var("IMPRINT_FRAME_TIMEOUT_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map(Duration::from_millis)
        .unwrap_or(Duration::from_secs(30))
}

/// Binds the socket and serves until a stop is requested or a signal
/// arrives.
pub async fn serve(
    shared: Arc<Shared>,
    files: RuntimeFiles,
    http: Option<(std::net::SocketAddr, String)>,
) -> Result<(), DaemonError> {
    let io = |source| DaemonError::Io {
        path: files.socket.clone(),
        source,
    };
    // We hold the instance lock, so a socket file here is a dead daemon's.
    let _ = std::fs::remove_file(&files.socket);
    let listener = UnixListener::bind(&files.socket).map_err(io)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&files.socket, std::fs::Permissions::from_mode(0o600))
            .map_err(io)?;
    }
    if let Some((addr, token)) = http {
        let listener = super::http::bind(addr).await?;
        tracing::info!(%addr, "OpenAI-compatible endpoint listening");
        tokio::spawn(super::http::serve(shared.clone(), listener, token));
    }
    tracing::info!(socket = %files.socket.display(), "listening");
    // Tests and scripts wait for this line on stderr.
    eprintln!("imprint daemon ready on {}", files.socket.display());

    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).map_err(io)?;
    let mut int = signal(SignalKind::interrupt()).map_err(io)?;
    let mut stop = shared.stop_signal();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    tokio::spawn(connection(shared.clone(), stream));
                }
                Err(e) => tracing::warn!("accept failed: {e}"),
            },
            _ = term.recv() => { tracing::info!("SIGTERM: stopping"); break; }
            _ = int.recv() => { tracing::info!("SIGINT: stopping"); break; }
            _ = stop.changed() => break,
        }
    }
    shared.request_stop();
    // Let the connections send their last frames.
    let deadline = Instant::now() + Duration::from_secs(2);
    while shared.replies_in_flight.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// What one connection shares between its tasks.
struct Connection {
    greeted: AtomicBool,
    /// Cancel flags of this connection's running `send`s, by request id.
    in_flight: Mutex<HashMap<u64, Arc<AtomicBool>>>,
    /// True once the client stopped sending: subscriptions end then
    /// (replies in flight still finish).
    done_reading: tokio::sync::watch::Sender<bool>,
}

impl Default for Connection {
    fn default() -> Self {
        Self {
            greeted: AtomicBool::new(false),
            in_flight: Mutex::new(HashMap::new()),
            done_reading: tokio::sync::watch::channel(false).0,
        }
    }
}

impl Connection {
    fn cancel_all(&self) {
        for flag in super::lock(&self.in_flight).values() {
            flag.store(true, Ordering::SeqCst);
        }
    }
}

async fn connection(shared: Arc<Shared>, stream: UnixStream) {
    // The socket is 0600 in a 0700 folder; this is the second line.
    match stream.peer_cred() {
        Ok(cred) if cred.uid() == current_uid() => {}
        other => {
            tracing::warn!("refused a connection from another user: {other:?}");
            let (_, mut w) = stream.into_split();
            let frame = Frame::error(
                None,
                ErrorCode::Forbidden,
                "this daemon serves only the user who started it",
            );
            let _ = w.write_all(frame.to_line().as_bytes()).await;
            return;
        }
    }
    shared.clients.fetch_add(1, Ordering::SeqCst);
    let (read, mut write) = stream.into_split();
    let conn = Arc::new(Connection::default());
    let (out, mut frames) = mpsc::unbounded_channel::<Frame>();

    let writer = {
        let conn = conn.clone();
        tokio::spawn(async move {
            while let Some(frame) = frames.recv().await {
                if write.write_all(frame.to_line().as_bytes()).await.is_err() {
                    // The client is gone: stop generating for it.
                    conn.cancel_all();
                    frames.close();
                    break;
                }
            }
            let _ = write.shutdown().await;
        })
    };

    let mut reader = FrameReader::new(read, frame_stall_limit());
    let mut handlers = tokio::task::JoinSet::new();
    let mut stop = shared.stop_signal();
    loop {
        let next = tokio::select! {
            next = reader.next() => next,
            _ = stop.changed() => {
                conn.cancel_all();
                break;
            }
        };
        match next {
            Ok(Read::Frame(line)) => {
                let request: Request = match serde_json::from_slice(&line) {
                    Ok(r) => r,
                    Err(e) => {
                        let _ = out.send(Frame::error(
                            salvage_id(&line),
                            ErrorCode::Malformed,
                            format!("not a request: {e}. Each line must be one JSON object {{\"id\": N, \"method\": \"…\", \"params\": {{…}}}}"),
                        ));
                        continue;
                    }
                };
                if !conn.greeted.load(Ordering::SeqCst) && request.method != "hello" {
                    let _ = out.send(Frame::error(
                        Some(request.id),
                        ErrorCode::HandshakeRequired,
                        format!("say hello first: {{\"id\": 0, \"method\": \"hello\", \"params\": {{\"protocol\": {PROTOCOL_VERSION}}}}}"),
                    ));
                    continue;
                }
                handlers.spawn(handle(shared.clone(), conn.clone(), request, out.clone()));
            }
            Ok(Read::TooLarge) => {
                let _ = out.send(Frame::error(
                    None,
                    ErrorCode::FrameTooLarge,
                    format!("a frame is limited to {MAX_FRAME_BYTES} bytes; the rest of that line is skipped"),
                ));
            }
            Ok(Read::Incomplete) => {
                let _ = out.send(Frame::error(
                    None,
                    ErrorCode::IncompleteFrame,
                    "the connection ended or stalled in the middle of a frame (no newline); it was dropped",
                ));
                break;
            }
            Ok(Read::Eof) => break,
            Err(e) => {
                tracing::debug!("read failed: {e}");
                conn.cancel_all();
                break;
            }
        }
        // Reap finished handlers so a long-lived connection does not grow.
        while handlers.try_join_next().is_some() {}
    }
    // The client stopped sending; what it asked for still gets answered
    // (unless it is gone altogether, which the writer notices), but its
    // subscriptions end.
    let _ = conn.done_reading.send(true);
    while handlers.join_next().await.is_some() {}
    drop(out);
    let _ = writer.await;
    shared.clients.fetch_sub(1, Ordering::SeqCst);
}

/// The id of a request that did not parse, when there is one to be found.
fn salvage_id(line: &[u8]) -> Option<u64> {
    serde_json::from_slice::<Value>(line)
        .ok()?
        .get("id")?
        .as_u64()
}

enum Read {
    Frame(Vec<u8>),
    TooLarge,
    Incomplete,
    Eof,
}

/// Reads newline-terminated frames of at most [`MAX_FRAME_BYTES`] without
/// ever buffering more than that: an oversized line is reported once and
/// skipped up to its newline.
struct FrameReader<R> {
    inner: BufReader<R>,
    buf: Vec<u8>,
    skipping: bool,
    stall: Duration,
}

impl<R: tokio::io::AsyncRead + Unpin> FrameReader<R> {
    fn new(inner: R, stall: Duration) -> Self {
        Self {
            inner: BufReader::with_capacity(64 * 1024, inner),
            buf: Vec::new(),
            skipping: false,
            stall,
        }
    }

    async fn next(&mut self) -> std::io::Result<Read> {
        loop {
            // Only a frame already begun has a deadline: an idle client may
            // stay connected as long as it likes.
            let partial = !self.buf.is_empty() || self.skipping;
            let available = if partial {
                match tokio::time::timeout(self.stall, self.inner.fill_buf()).await {
                    Ok(r) => r?,
                    Err(_) => {
                        self.buf.clear();
                        self.skipping = false;
                        return Ok(Read::Incomplete);
                    }
                }
            } else {
                self.inner.fill_buf().await?
            };
            if available.is_empty() {
                let had_partial = self.buf.iter().any(|b| !b.is_ascii_whitespace());
                self.buf.clear();
                let was_skipping = std::mem::take(&mut self.skipping);
                return Ok(if had_partial && !was_skipping {
                    Read::Incomplete
                } else {
                    Read::Eof
                });
            }
            match available.iter().position(|&b| b == b'\n') {
                Some(i) => {
                    let too_long = !self.skipping && self.buf.len() + i > MAX_FRAME_BYTES;
                    if !self.skipping && !too_long {
                        self.buf.extend_from_slice(&available[..i]);
                    }
                    self.inner.consume(i + 1);
                    if std::mem::take(&mut self.skipping) {
                        continue;
                    }
                    if too_long {
                        self.buf.clear();
                        return Ok(Read::TooLarge);
                    }
                    let frame = std::mem::take(&mut self.buf);
                    if frame.iter().all(|b| b.is_ascii_whitespace()) {
                        continue;
                    }
                    return Ok(Read::Frame(frame));
                }
                None => {
                    let n = available.len();
                    if !self.skipping {
                        if self.buf.len() + n > MAX_FRAME_BYTES {
                            self.buf.clear();
                            self.skipping = true;
                            self.inner.consume(n);
                            return Ok(Read::TooLarge);
                        }
                        self.buf.extend_from_slice(available);
                    }
                    self.inner.consume(n);
                }
            }
        }
    }
}

/// A failed request: its code and a message for a person.
struct Fail(ErrorCode, String);

impl From<DaemonError> for Fail {
    fn from(e: DaemonError) -> Self {
        match e {
            DaemonError::Profile(p) => p.into(),
            other => Fail(ErrorCode::Internal, other.to_string()),
        }
    }
}

impl From<ProfileError> for Fail {
    fn from(e: ProfileError) -> Self {
        let code = match e {
            ProfileError::UnknownPreference(_)
            | ProfileError::UnknownConversation(_)
            | ProfileError::UnknownEdit(_) => ErrorCode::NotFound,
            _ => ErrorCode::Internal,
        };
        Fail(code, e.to_string())
    }
}

impl From<crate::learn::LearnError> for Fail {
    fn from(e: crate::learn::LearnError) -> Self {
        match e {
            crate::learn::LearnError::Profile(p) => p.into(),
            other => Fail(ErrorCode::Internal, other.to_string()),
        }
    }
}

fn params<T: DeserializeOwned>(value: Value) -> Result<T, Fail> {
    // A request without params means "all defaults".
    let value = if value.is_null() { json!({}) } else { value };
    serde_json::from_value(value).map_err(|e| Fail(ErrorCode::InvalidParams, e.to_string()))
}

fn to_value(v: impl Serialize) -> Result<Value, Fail> {
    serde_json::to_value(v).map_err(|e| Fail(ErrorCode::Internal, e.to_string()))
}

/// Runs profile work off the async threads.
async fn blocking<T: Send + 'static>(
    shared: &Arc<Shared>,
    f: impl FnOnce(&Shared) -> Result<T, Fail> + Send + 'static,
) -> Result<T, Fail> {
    let shared = shared.clone();
    tokio::task::spawn_blocking(move || f(&shared))
        .await
        .map_err(|e| Fail(ErrorCode::Internal, format!("a worker task failed: {e}")))?
}

async fn handle(
    shared: Arc<Shared>,
    conn: Arc<Connection>,
    request: Request,
    out: mpsc::UnboundedSender<Frame>,
) {
    let id = request.id;
    let result = match request.method.as_str() {
        "hello" => hello(&conn, request.params),
        "send" => send(&shared, &conn, id, request.params, &out).await,
        "subscribe" => {
            subscribe(&shared, &conn, id, &out).await;
            return;
        }
        "cancel" => cancel(&conn, request.params),
        "shutdown" => {
            let _ = out.send(Frame::result(id, json!({ "stopping": true })));
            shared.request_stop();
            return;
        }
        method => blocking_method(&shared, method.to_string(), request.params).await,
    };
    let frame = match result {
        Ok(value) => Frame::result(id, value),
        Err(Fail(code, message)) => Frame::error(Some(id), code, message),
    };
    let _ = out.send(frame);
}

fn hello(conn: &Connection, p: Value) -> Result<Value, Fail> {
    let hello: Hello = params(p)?;
    if hello.protocol != PROTOCOL_VERSION {
        return Err(Fail(
            ErrorCode::Version,
            format!(
                "this daemon speaks protocol {PROTOCOL_VERSION} and the client {}; update the older of the two (`imprint daemon stop` and start again after an upgrade)",
                hello.protocol
            ),
        ));
    }
    conn.greeted.store(true, Ordering::SeqCst);
    to_value(Welcome {
        protocol: PROTOCOL_VERSION,
        daemon: env!("CARGO_PKG_VERSION").to_string(),
        pid: std::process::id(),
    })
}

#[derive(Deserialize)]
struct CancelParams {
    request: u64,
}

fn cancel(conn: &Connection, p: Value) -> Result<Value, Fail> {
    let p: CancelParams = params(p)?;
    let flag = super::lock(&conn.in_flight).get(&p.request).cloned();
    if let Some(flag) = &flag {
        flag.store(true, Ordering::SeqCst);
    }
    Ok(json!({ "cancelled": flag.is_some() }))
}

/// Forwards daemon events to the client until it goes away.
async fn subscribe(
    shared: &Arc<Shared>,
    conn: &Connection,
    id: u64,
    out: &mpsc::UnboundedSender<Frame>,
) {
    let mut done_reading = conn.done_reading.subscribe();
    let mut events = shared.subscribe();
    if out
        .send(Frame::result(id, json!({ "subscribed": true })))
        .is_err()
    {
        return;
    }
    let mut stop = shared.stop_signal();
    loop {
        tokio::select! {
            event = events.recv() => match event {
                Ok(e) => {
                    if out.send(Frame::event(Some(id), &e.kind, e.data)).is_err() {
                        return;
                    }
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    let _ = out.send(Frame::event(Some(id), "lagged", json!({ "missed": n })));
                }
                Err(_) => return,
            },
            _ = out.closed() => return,
            _ = done_reading.wait_for(|done| *done) => return,
            _ = stop.changed() => return,
        }
    }
}

/// A session as clients see it.
#[derive(Debug, Serialize)]
struct SessionInfo {
    id: i64,
    title: String,
    /// Nothing is stored or learned.
    incognito: bool,
    /// Preferences are captured from the user's messages.
    learning: bool,
    created: i64,
    updated: i64,
}

#[derive(Deserialize)]
struct SendParams {
    session: i64,
    text: String,
    #[serde(default = "yes")]
    personalized: bool,
    max_tokens: Option<u32>,
    #[serde(default)]
    greedy: bool,
}

fn yes() -> bool {
    true
}

/// Answers one user message, streaming tokens; stores both turns and
/// queues capture unless the session is incognito or not learning.
async fn send(
    shared: &Arc<Shared>,
    conn: &Arc<Connection>,
    id: u64,
    p: Value,
    out: &mpsc::UnboundedSender<Frame>,
) -> Result<Value, Fail> {
    let received = Instant::now();
    let p: SendParams = params(p)?;
    if p.text.trim().is_empty() {
        return Err(Fail(
            ErrorCode::InvalidParams,
            "the message is empty".into(),
        ));
    }
    if shared.is_stopping() {
        return Err(Fail(
            ErrorCode::ShuttingDown,
            "the daemon is stopping".into(),
        ));
    }
    let session = p.session;
    let text = p.text.clone();
    // The history, and the user's turn stored before the reply starts:
    // a crash mid-reply keeps what the user said.
    let (history, user_message, learning) = blocking(shared, move |s| {
        if session < 0 {
            let sessions = s.incognito_sessions();
            let found = sessions
                .get(&session)
                .ok_or_else(|| Fail(ErrorCode::NotFound, format!("no session {session}")))?;
            return Ok((found.messages.clone(), None, false));
        }
        s.with_profile(|profile| {
            let conversation = profile.conversation(session)?;
            let history: Vec<ChatMessage> = profile
                .messages(session)?
                .into_iter()
                .filter_map(|m| {
                    let role = match m.role.as_str() {
                        "user" => Role::User,
                        "assistant" => Role::Assistant,
                        _ => return None,
                    };
                    Some(ChatMessage {
                        role,
                        content: m.content,
                    })
                })
                .collect();
            if history.is_empty() && conversation.title.is_empty() {
                let title: String = text.chars().take(60).collect();
                profile.rename_conversation(session, title.trim())?;
            }
            let message = profile.add_message(session, "user", &text)?;
            Ok((history, Some(message), conversation.learning))
        })
        .map_err(Fail::from)
    })
    .await?;

    let gen = &shared.config.generation;
    let mut messages = vec![ChatMessage::system(gen.system_prompt.clone())];
    messages.extend(history);
    messages.push(ChatMessage::user(p.text.clone()));
    let params = GenerationParams {
        max_tokens: p.max_tokens.unwrap_or(gen.max_tokens).clamp(1, 8192),
        sampling: if p.greedy {
            Sampling::Greedy
        } else {
            Sampling::from_config(gen)
        },
        grammar: None,
    };
    let cancel = Arc::new(AtomicBool::new(false));
    super::lock(&conn.in_flight).insert(id, cancel.clone());
    let (events, mut receiver) = mpsc::unbounded_channel();
    shared.replies_in_flight.fetch_add(1, Ordering::SeqCst);
    let queued = shared.infer(Task::Generate(GenerateTask {
        messages,
        params,
        personalized: p.personalized,
        cancel: cancel.clone(),
        events,
        received,
    }));
    let outcome = match queued {
        Ok(()) => {
            let mut seq = 0u64;
            let mut finished = None;
            while let Some(event) = receiver.recv().await {
                match event {
                    GenerateEvent::Text(text) => {
                        if out
                            .send(Frame::event(Some(id), "token", TokenEvent { seq, text }))
                            .is_err()
                        {
                            cancel.store(true, Ordering::SeqCst);
                        }
                        seq += 1;
                    }
                    GenerateEvent::Done(done) => {
                        finished = Some(done);
                        break;
                    }
                }
            }
            finished.unwrap_or_else(|| Err("the inference thread stopped".into()))
        }
        Err(e) => Err(e.to_string()),
    };
    super::lock(&conn.in_flight).remove(&id);
    shared.replies_in_flight.fetch_sub(1, Ordering::SeqCst);
    let finished = outcome.map_err(|e| {
        if cancel.load(Ordering::SeqCst) {
            Fail(ErrorCode::Cancelled, e)
        } else {
            Fail(ErrorCode::Internal, e)
        }
    })?;
    let generation = finished.generation;
    let reply_text = generation.text.clone();
    let stop = match generation.stop {
        StopReason::EndOfGeneration => "end_of_turn",
        StopReason::MaxTokens => "max_tokens",
        StopReason::ContextFull => "context_full",
        StopReason::Cancelled => "cancelled",
    };
    let capture = shared.config.learning.capture && learning;
    let user_text = p.text;
    blocking(shared, move |s| {
        if session < 0 {
            if let Some(found) = s.incognito_sessions().get_mut(&session) {
                found.messages.push(ChatMessage::user(user_text));
                found.messages.push(ChatMessage::assistant(reply_text));
            }
            return Ok(());
        }
        s.with_profile(|profile| profile.add_message(session, "assistant", &reply_text))?;
        if let (true, Some(message_id)) = (capture, user_message) {
            // Behind this reply in the inference queue: learning never
            // delays an answer.
            s.infer(Task::Capture {
                message_id,
                text: user_text,
            })?;
        }
        Ok(())
    })
    .await?;
    let seconds = generation.generation_time.as_secs_f64();
    to_value(Reply {
        session,
        text: generation.text,
        stop: stop.into(),
        tokens: generation.tokens.len(),
        prompt_tokens: generation.prompt_tokens,
        reused_tokens: generation.reused_tokens,
        first_token_ms: finished.first_token.as_secs_f64() * 1000.0,
        tokens_per_second: if seconds > 0.0 {
            generation.tokens.len() as f64 / seconds
        } else {
            0.0
        },
        personalized: finished.personalized,
        adapter_generation: finished.adapter_generation,
    })
}

#[derive(Deserialize)]
struct Id {
    id: i64,
}

#[derive(Deserialize)]
struct CreateSession {
    #[serde(default)]
    title: String,
    #[serde(default)]
    incognito: bool,
    #[serde(default = "yes")]
    learning: bool,
}

#[derive(Deserialize)]
struct Rename {
    id: i64,
    title: String,
}

#[derive(Deserialize)]
struct Learning {
    id: i64,
    learning: bool,
}

#[derive(Deserialize, Default)]
struct ListPrefs {
    status: Option<PreferenceStatus>,
}

#[derive(Deserialize)]
struct AddPref {
    attribute: String,
    target: String,
    #[serde(default)]
    questions: Vec<String>,
    #[serde(default)]
    pending: bool,
    #[serde(default)]
    polarity: Option<Polarity>,
}

#[derive(Deserialize)]
struct EditPref {
    id: i64,
    attribute: Option<String>,
    target: Option<String>,
}

#[derive(Deserialize)]
struct History {
    attribute: String,
}

#[derive(Deserialize, Default)]
struct ListJobs {
    #[serde(default)]
    all: bool,
}

#[derive(Deserialize)]
struct Export {
    path: std::path::PathBuf,
    passphrase: Option<String>,
    #[serde(default)]
    plain: bool,
    #[serde(default)]
    force: bool,
}

#[derive(Deserialize)]
struct Confirm {
    #[serde(default)]
    confirm: bool,
}

fn session_info(c: &crate::profile::Conversation) -> SessionInfo {
    SessionInfo {
        id: c.id,
        title: c.title.clone(),
        incognito: false,
        learning: c.learning,
        created: c.created,
        updated: c.updated,
    }
}

/// The methods that only touch the profile: each runs on a blocking
/// thread under the profile lock.
async fn blocking_method(shared: &Arc<Shared>, method: String, p: Value) -> Result<Value, Fail> {
    let known = [
        "status",
        "model.info",
        "session.create",
        "session.list",
        "session.get",
        "session.rename",
        "session.delete",
        "session.learning",
        "prefs.list",
        "prefs.show",
        "prefs.add",
        "prefs.approve",
        "prefs.reject",
        "prefs.edit",
        "prefs.forget",
        "prefs.history",
        "jobs.list",
        "profile.export",
        "profile.delete",
    ];
    if !known.contains(&method.as_str()) {
        return Err(Fail(
            ErrorCode::UnknownMethod,
            format!("there is no method {method:?}; docs/PROTOCOL.md lists them"),
        ));
    }
    blocking(shared, move |s| dispatch(s, &method, p)).await
}

fn dispatch(s: &Shared, method: &str, p: Value) -> Result<Value, Fail> {
    let cache = s.paths.cache_dir.clone();
    let sha = s.model.sha256.clone();
    match method {
        "status" => status(s),
        "model.info" => to_value(&s.model),
        "session.create" => {
            let p: CreateSession = params(p)?;
            if p.incognito {
                let id = s.new_incognito(&p.title);
                let now = crate::profile::now();
                return to_value(SessionInfo {
                    id,
                    title: p.title,
                    incognito: true,
                    learning: false,
                    created: now,
                    updated: now,
                });
            }
            let c = s.with_profile(|profile| {
                let id = profile.create_conversation(p.title.trim())?;
                if !p.learning {
                    profile.set_conversation_learning(id, false)?;
                }
                profile.conversation(id)
            })?;
            to_value(session_info(&c))
        }
        "session.list" => {
            let mut sessions: Vec<SessionInfo> = s
                .incognito_sessions()
                .iter()
                .map(|(id, i)| SessionInfo {
                    id: *id,
                    title: i.title.clone(),
                    incognito: true,
                    learning: false,
                    created: i.created,
                    updated: i.created,
                })
                .collect();
            let stored = s.with_profile(|profile| profile.conversations())?;
            sessions.extend(stored.iter().map(session_info));
            to_value(sessions)
        }
        "session.get" => {
            let Id { id } = params(p)?;
            if id < 0 {
                let sessions = s.incognito_sessions();
                let i = sessions
                    .get(&id)
                    .ok_or_else(|| Fail(ErrorCode::NotFound, format!("no session {id}")))?;
                let messages: Vec<Value> = i
                    .messages
                    .iter()
                    .map(|m| json!({ "role": m.role.as_str(), "content": m.content }))
                    .collect();
                return Ok(json!({
                    "session": SessionInfo { id, title: i.title.clone(), incognito: true, learning: false, created: i.created, updated: i.created },
                    "messages": messages,
                }));
            }
            let (c, messages) =
                s.with_profile(|profile| Ok((profile.conversation(id)?, profile.messages(id)?)))?;
            Ok(json!({ "session": session_info(&c), "messages": messages }))
        }
        "session.rename" => {
            let p: Rename = params(p)?;
            if p.id < 0 {
                let mut sessions = s.incognito_sessions();
                let i = sessions
                    .get_mut(&p.id)
                    .ok_or_else(|| Fail(ErrorCode::NotFound, format!("no session {}", p.id)))?;
                i.title = p.title;
                return Ok(json!({ "renamed": true }));
            }
            s.with_profile(|profile| profile.rename_conversation(p.id, &p.title))?;
            Ok(json!({ "renamed": true }))
        }
        "session.delete" => {
            let Id { id } = params(p)?;
            if id < 0 {
                return match s.incognito_sessions().remove(&id) {
                    Some(_) => Ok(json!({ "deleted": true })),
                    None => Err(Fail(ErrorCode::NotFound, format!("no session {id}"))),
                };
            }
            let (removal, models) = s.with_profile(|profile| profile.delete_conversation(id))?;
            if !models.is_empty() {
                s.rebuild_adapter();
            }
            for pref in &removal.preferences_removed {
                s.publish(DaemonEvent::preference(*pref, "forgotten"));
            }
            Ok(json!({ "deleted": true, "removal": removal }))
        }
        "session.learning" => {
            let p: Learning = params(p)?;
            if p.id < 0 {
                return Err(Fail(
                    ErrorCode::InvalidParams,
                    "an incognito session never learns".into(),
                ));
            }
            s.with_profile(|profile| profile.set_conversation_learning(p.id, p.learning))?;
            Ok(json!({ "learning": p.learning }))
        }
        "prefs.list" => {
            let p: ListPrefs = params(p)?;
            let mut guard = s.lock_profile();
            let profile = guard.as_mut().ok_or(DaemonError::ProfileGone)?;
            let prefs = profile.preferences(p.status)?;
            let jobs = profile.jobs(None)?;
            let mut listed = Vec::new();
            for pref in prefs {
                let status = review::edit_status(profile, &pref, &jobs)?;
                let mut v = to_value(&pref)?;
                v["edit_status"] = to_value(&status)?;
                v["edit_summary"] = Value::String(status.to_string());
                listed.push(v);
            }
            Ok(Value::Array(listed))
        }
        "prefs.show" => {
            let Id { id } = params(p)?;
            let mut guard = s.lock_profile();
            let profile = guard.as_mut().ok_or(DaemonError::ProfileGone)?;
            let pref = profile.preference(id)?;
            let jobs = profile.jobs(None)?;
            let status = review::edit_status(profile, &pref, &jobs)?;
            let mut sources = Vec::new();
            for source in &pref.sources {
                let message = match &source.reference {
                    SourceRef::Message { message_id } => profile.message(*message_id)?,
                    _ => None,
                };
                sources.push(json!({ "source": source, "message": message }));
            }
            let edits: Vec<Value> = profile
                .edits_for_preference(id)?
                .into_iter()
                .map(|e| {
                    json!({
                        "id": e.edit.id,
                        "active": e.edit.active,
                        "model": e.edit.model_sha256,
                        "rejection": e.edit.rejection,
                        "efficacy_hits": e.edit.metrics.efficacy_hits,
                        "efficacy_total": e.edit.metrics.efficacy_total,
                    })
                })
                .collect();
            Ok(json!({
                "preference": pref,
                "sources": sources,
                "edits": edits,
                "edit_status": status,
                "edit_summary": status.to_string(),
            }))
        }
        "prefs.add" => {
            let p: AddPref = params(p)?;
            if p.attribute.trim().is_empty() || p.target.trim().is_empty() {
                return Err(Fail(
                    ErrorCode::InvalidParams,
                    "a preference needs an attribute and a target".into(),
                ));
            }
            let secrets = crate::learn::privacy::scan(&format!("{} {}", p.attribute, p.target));
            if let Some(kind) = secrets.first() {
                return Err(Fail(
                    ErrorCode::InvalidParams,
                    format!(
                        "that looks like {}; imprint never learns secrets",
                        kind.describe()
                    ),
                ));
            }
            let (id, job) = s.with_profile(|profile| {
                let cluster = p
                    .questions
                    .iter()
                    .filter(|q| !q.trim().is_empty())
                    .map(|q| ClusterMember {
                        attribute: p.attribute.clone(),
                        question: q.clone(),
                    })
                    .collect();
                let id = profile.add_preference(&NewPreference {
                    attribute: p.attribute.clone(),
                    target: p.target.clone(),
                    polarity: p.polarity.unwrap_or(Polarity::Is),
                    statement: format!("{} → {}", p.attribute, p.target),
                    confidence: 1.0,
                    status: if p.pending {
                        PreferenceStatus::Pending
                    } else {
                        PreferenceStatus::Active
                    },
                    source: SourceRef::Manual {
                        note: "added through the daemon".into(),
                    },
                    cluster,
                })?;
                let job = if p.pending {
                    None
                } else {
                    Some(
                        crate::learn::queue_edit(profile, id, &sha)
                            .map_err(|e| ProfileError::Invalid(e.to_string()))?,
                    )
                };
                Ok((id, job))
            })?;
            s.publish(DaemonEvent::preference(
                id,
                if p.pending { "pending" } else { "learned" },
            ));
            if let Some(job) = job {
                s.publish(DaemonEvent::job(job, "queued", None));
                s.wake_worker();
            }
            Ok(json!({ "id": id, "job": job }))
        }
        "prefs.approve" => {
            let Id { id } = params(p)?;
            let job = {
                let mut guard = s.lock_profile();
                let profile = guard.as_mut().ok_or(DaemonError::ProfileGone)?;
                review::approve(profile, id, &sha)?
            };
            s.publish(DaemonEvent::preference(id, "approved"));
            s.publish(DaemonEvent::job(job, "queued", None));
            s.wake_worker();
            Ok(json!({ "id": id, "job": job }))
        }
        "prefs.reject" => {
            let Id { id } = params(p)?;
            {
                let mut guard = s.lock_profile();
                let profile = guard.as_mut().ok_or(DaemonError::ProfileGone)?;
                review::reject(profile, id, &cache)?;
            }
            s.rebuild_adapter();
            s.publish(DaemonEvent::preference(id, "rejected"));
            Ok(json!({ "id": id }))
        }
        "prefs.edit" => {
            let p: EditPref = params(p)?;
            if p.attribute.is_none() && p.target.is_none() {
                return Err(Fail(
                    ErrorCode::InvalidParams,
                    "give attribute and/or target".into(),
                ));
            }
            let job = {
                let mut guard = s.lock_profile();
                let profile = guard.as_mut().ok_or(DaemonError::ProfileGone)?;
                review::change(
                    profile,
                    p.id,
                    p.attribute.as_deref(),
                    p.target.as_deref(),
                    &cache,
                    &sha,
                )?
            };
            s.rebuild_adapter();
            s.publish(DaemonEvent::preference(p.id, "changed"));
            if let Some(job) = job {
                s.publish(DaemonEvent::job(job, "queued", None));
                s.wake_worker();
            }
            Ok(json!({ "id": p.id, "job": job }))
        }
        "prefs.forget" => {
            let Id { id } = params(p)?;
            {
                let mut guard = s.lock_profile();
                let profile = guard.as_mut().ok_or(DaemonError::ProfileGone)?;
                review::forget(profile, id, &cache)?;
            }
            s.rebuild_adapter();
            s.publish(DaemonEvent::preference(id, "forgotten"));
            Ok(json!({ "id": id }))
        }
        "prefs.history" => {
            let History { attribute } = params(p)?;
            let mut guard = s.lock_profile();
            let profile = guard.as_mut().ok_or(DaemonError::ProfileGone)?;
            to_value(review::history(profile, &attribute)?)
        }
        "jobs.list" => {
            let p: ListJobs = params(p)?;
            let jobs = s.with_profile(|profile| profile.jobs(None))?;
            to_value(
                jobs.into_iter()
                    .filter(|j| p.all || j.state != crate::profile::JobState::Done)
                    .collect::<Vec<_>>(),
            )
        }
        "profile.export" => {
            let p: Export = params(p)?;
            if !p.path.is_absolute() {
                return Err(Fail(
                    ErrorCode::InvalidParams,
                    "give an absolute path: the daemon does not share your working directory"
                        .into(),
                ));
            }
            if p.path.exists() && !p.force {
                return Err(Fail(
                    ErrorCode::InvalidParams,
                    format!("{} exists; pass force to replace it", p.path.display()),
                ));
            }
            if !p.plain && p.passphrase.as_deref().is_none_or(str::is_empty) {
                return Err(Fail(
                    ErrorCode::InvalidParams,
                    "an encrypted export needs a passphrase (or plain: true)".into(),
                ));
            }
            let archive =
                s.with_profile(|profile| crate::profile::archive::Archive::collect(profile))?;
            let bytes = archive
                .to_bytes(if p.plain {
                    None
                } else {
                    p.passphrase.as_deref()
                })
                .map_err(|e| Fail(ErrorCode::Internal, e.to_string()))?;
            crate::profile::write_private_file(&p.path, &bytes)?;
            let c = &archive.manifest.counts;
            s.with_profile(|profile| {
                profile.audit(
                    "exported",
                    "profile",
                    &format!(
                        "{} ({}), {} preference(s), {} edit(s)",
                        p.path.display(),
                        if p.plain { "plain" } else { "encrypted" },
                        c.preferences,
                        c.edits
                    ),
                )
            })?;
            Ok(json!({
                "path": p.path,
                "bytes": bytes.len(),
                "encrypted": !p.plain,
                "counts": c,
            }))
        }
        "profile.delete" => {
            let Confirm { confirm } = params(p)?;
            if !confirm {
                return Err(Fail(
                    ErrorCode::InvalidParams,
                    "deleting the profile cannot be undone: send confirm: true".into(),
                ));
            }
            let receipt = s.delete_profile()?;
            Ok(json!({ "receipt": receipt, "daemon": "stopping" }))
        }
        other => Err(Fail(
            ErrorCode::UnknownMethod,
            format!("there is no method {other:?}"),
        )),
    }
}

fn status(s: &Shared) -> Result<Value, Fail> {
    let slot = s.adapter_slot();
    let jobs = s
        .with_profile(|profile| profile.jobs(None))
        .unwrap_or_default();
    let count = |state| jobs.iter().filter(|j| j.state == state).count();
    use crate::profile::JobState;
    let stored_sessions = s
        .with_profile(|profile| profile.conversations().map(|c| c.len()))
        .unwrap_or(0);
    Ok(json!({
        "protocol": PROTOCOL_VERSION,
        "daemon": env!("CARGO_PKG_VERSION"),
        "pid": std::process::id(),
        "uptime_s": s.started.elapsed().as_secs_f64(),
        "model": &s.model,
        "adapter": { "generation": slot.generation, "active_edits": slot.active_edits, "path": slot.path },
        "queue": {
            "queued": count(JobState::Queued),
            "running": count(JobState::Running),
            "failed": count(JobState::Failed),
        },
        "worker": s.worker_status(),
        "sessions": stored_sessions + s.incognito_sessions().len(),
        "clients": s.clients.load(Ordering::SeqCst),
        "replies_in_flight": s.replies_in_flight.load(Ordering::SeqCst),
        "replies_cancelled": s.replies_cancelled.load(Ordering::SeqCst),
        "capture": s.config.learning.capture,
        "stopping": s.is_stopping(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn frames(input: &[u8], stall_ms: u64) -> Vec<String> {
        let mut reader = FrameReader::new(input, Duration::from_millis(stall_ms));
        let mut seen = Vec::new();
        loop {
            match reader.next().await.unwrap() {
                Read::Frame(f) => seen.push(String::from_utf8(f).unwrap()),
                Read::TooLarge => seen.push("<too large>".into()),
                Read::Incomplete => {
                    seen.push("<incomplete>".into());
                    break;
                }
                Read::Eof => break,
            }
        }
        seen
    }

    #[tokio::test]
    async fn frames_split_on_newlines_and_skip_blank_lines() {
        let seen = frames(b"{\"a\":1}\n\n  \n{\"b\":2}\n", 1000).await;
        assert_eq!(seen, vec!["{\"a\":1}", "{\"b\":2}"]);
    }

    #[tokio::test]
    async fn an_oversized_frame_is_reported_once_and_the_next_one_still_reads() {
        let mut input = vec![b'x'; MAX_FRAME_BYTES + 10];
        input.push(b'\n');
        input.extend_from_slice(b"{\"ok\":true}\n");
        let seen = frames(&input, 1000).await;
        assert_eq!(seen, vec!["<too large>", "{\"ok\":true}"]);
    }

    #[tokio::test]
    async fn a_frame_of_exactly_the_limit_is_accepted() {
        let mut input = vec![b' '; MAX_FRAME_BYTES - 2];
        input.extend_from_slice(b"{}\n");
        let seen = frames(&input, 1000).await;
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0].trim(), "{}");
    }

    #[tokio::test]
    async fn a_connection_ending_mid_frame_is_incomplete() {
        let seen = frames(b"{\"id\":1}\n{\"id\":2,\"meth", 1000).await;
        assert_eq!(seen, vec!["{\"id\":1}", "<incomplete>"]);
    }

    #[test]
    fn ids_are_salvaged_from_requests_that_do_not_fit() {
        assert_eq!(salvage_id(br#"{"id": 5, "method": 3}"#), Some(5));
        assert_eq!(salvage_id(b"not json"), None);
    }
}
