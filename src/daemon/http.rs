//! The opt-in OpenAI-compatible endpoint (`imprint daemon --http ADDR`):
//! `GET /v1/models` and `POST /v1/chat/completions`, streamed as
//! server-sent events when the request says `"stream": true`.
//!
//! It exists so tools that already speak OpenAI's API (aichat, Open WebUI,
//! the `openai` Python client, curl) can talk to the personalized model.
//! It listens on loopback only and wants `Authorization: Bearer <token>`
//! (`imprint daemon token`). Conversations that arrive this way are not
//! stored and not learned from: the tools keep their own history, and
//! they may send text the user never meant for the profile.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::inference::{GenerateEvent, GenerateTask, Task};
use super::{DaemonError, Shared};
use crate::engine::{ChatMessage, GenerationParams, Role, Sampling, StopReason};

struct HttpState {
    shared: Arc<Shared>,
    token: String,
}

/// Binds the listener, refusing anything but loopback.
pub async fn bind(addr: std::net::SocketAddr) -> Result<tokio::net::TcpListener, DaemonError> {
    if !addr.ip().is_loopback() {
        return Err(DaemonError::NotLoopback(addr));
    }
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| DaemonError::Io {
            path: addr.to_string().into(),
            source,
        })
}

pub async fn serve(shared: Arc<Shared>, listener: tokio::net::TcpListener, token: String) {
    let mut stop = shared.stop_signal();
    let state = Arc::new(HttpState { shared, token });
    let app = Router::new()
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(chat_completions))
        .with_state(state);
    let result = axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            let _ = stop.changed().await;
        })
        .await;
    if let Err(e) = result {
        tracing::error!("the HTTP endpoint stopped: {e}");
    }
}

/// An error in OpenAI's shape, so clients show its message.
fn error(status: StatusCode, kind: &str, message: impl Into<String>) -> Response {
    (
        status,
        Json(json!({ "error": { "message": message.into(), "type": kind, "code": Value::Null } })),
    )
        .into_response()
}

fn authorized(headers: &HeaderMap, token: &str) -> bool {
    headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|given| super::token::same(given.trim(), token))
}

fn unauthorized() -> Response {
    error(
        StatusCode::UNAUTHORIZED,
        "invalid_request_error",
        "missing or wrong bearer token; `imprint daemon token` shows the right one",
    )
}

async fn models(State(st): State<Arc<HttpState>>, headers: HeaderMap) -> Response {
    if !authorized(&headers, &st.token) {
        return unauthorized();
    }
    Json(json!({
        "object": "list",
        "data": [{
            "id": st.shared.model.name,
            "object": "model",
            "created": 0,
            "owned_by": "imprint (personalized)",
        }],
    }))
    .into_response()
}

#[derive(Deserialize)]
struct ChatRequest {
    #[serde(default)]
    model: Option<String>,
    messages: Vec<InMessage>,
    #[serde(default)]
    stream: bool,
    max_tokens: Option<u32>,
    max_completion_tokens: Option<u32>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    seed: Option<u32>,
}

#[derive(Deserialize)]
struct InMessage {
    role: String,
    #[serde(default)]
    content: Content,
}

/// A string, or a list of parts of which the text parts count.
#[derive(Deserialize, Default)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
    #[default]
    Missing,
}

#[derive(Deserialize)]
struct Part {
    #[serde(default)]
    text: Option<String>,
}

impl Content {
    fn text(self) -> String {
        match self {
            Content::Text(t) => t,
            Content::Parts(parts) => parts
                .into_iter()
                .filter_map(|p| p.text)
                .collect::<Vec<_>>()
                .join("\n"),
            Content::Missing => String::new(),
        }
    }
}

async fn chat_completions(
    State(st): State<Arc<HttpState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if !authorized(&headers, &st.token) {
        return unauthorized();
    }
    let received = Instant::now();
    let request: ChatRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                format!("the body is not a chat completion request: {e}"),
            )
        }
    };
    let shared = &st.shared;
    if let Some(model) = &request.model {
        if model != &shared.model.name && !model.is_empty() {
            tracing::debug!(
                "request names model {model:?}; serving {}",
                shared.model.name
            );
        }
    }
    let mut messages = Vec::new();
    for m in request.messages {
        let role = match m.role.as_str() {
            "system" | "developer" => Role::System,
            "user" => Role::User,
            "assistant" => Role::Assistant,
            // Tool results and the like: this model has no tools.
            _ => continue,
        };
        messages.push(ChatMessage {
            role,
            content: m.content.text(),
        });
    }
    if messages.last().map(|m| m.role) != Some(Role::User) {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "the last message must be the user's",
        );
    }
    let gen = &shared.config.generation;
    if !messages.iter().any(|m| m.role == Role::System) {
        messages.insert(0, ChatMessage::system(gen.system_prompt.clone()));
    }
    let sampling = match request.temperature {
        Some(t) if t <= 0.0 => Sampling::Greedy,
        t => {
            let mut config = gen.clone();
            config.temperature = t.unwrap_or(gen.temperature);
            config.top_p = request.top_p.unwrap_or(gen.top_p);
            config.seed = request.seed.unwrap_or(gen.seed);
            Sampling::from_config(&config)
        }
    };
    let params = GenerationParams {
        max_tokens: request
            .max_completion_tokens
            .or(request.max_tokens)
            .unwrap_or(gen.max_tokens)
            .clamp(1, 8192),
        sampling,
        grammar: None,
    };
    let cancel = Arc::new(AtomicBool::new(false));
    let (events, receiver) = mpsc::unbounded_channel();
    if let Err(e) = shared.infer(Task::Generate(GenerateTask {
        messages,
        params,
        personalized: true,
        cancel: cancel.clone(),
        events,
        received,
    })) {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            e.to_string(),
        );
    }
    let id = format!("chatcmpl-{:x}", rand::random::<u64>());
    let created = crate::profile::now();
    let model = shared.model.name.clone();
    if request.stream {
        stream(receiver, cancel, id, created, model)
    } else {
        complete(receiver, id, created, model).await
    }
}

fn finish_reason(stop: StopReason) -> &'static str {
    match stop {
        StopReason::MaxTokens | StopReason::ContextFull => "length",
        _ => "stop",
    }
}

async fn complete(
    mut receiver: mpsc::UnboundedReceiver<GenerateEvent>,
    id: String,
    created: i64,
    model: String,
) -> Response {
    let mut done = None;
    while let Some(event) = receiver.recv().await {
        if let GenerateEvent::Done(d) = event {
            done = Some(d);
            break;
        }
    }
    match done {
        Some(Ok(f)) => {
            let g = f.generation;
            Json(json!({
                "id": id,
                "object": "chat.completion",
                "created": created,
                "model": model,
                "choices": [{
                    "index": 0,
                    "message": { "role": "assistant", "content": g.text },
                    "finish_reason": finish_reason(g.stop),
                }],
                "usage": {
                    "prompt_tokens": g.prompt_tokens,
                    "completion_tokens": g.tokens.len(),
                    "total_tokens": g.prompt_tokens + g.tokens.len(),
                },
            }))
            .into_response()
        }
        Some(Err(e)) => error(StatusCode::INTERNAL_SERVER_ERROR, "server_error", e),
        None => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "the daemon is stopping",
        ),
    }
}

/// Server-sent events: a role chunk, one chunk per piece of text, a final
/// chunk with the finish reason, then `[DONE]`. A client that hangs up
/// drops the stream, and with it the generation.
fn stream(
    mut receiver: mpsc::UnboundedReceiver<GenerateEvent>,
    cancel: Arc<AtomicBool>,
    id: String,
    created: i64,
    model: String,
) -> Response {
    let (tx, rx) = mpsc::unbounded_channel::<Result<Event, Infallible>>();
    let chunk = move |delta: Value, finish: Option<&str>| {
        Event::default().data(
            json!({
                "id": id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": [{ "index": 0, "delta": delta, "finish_reason": finish }],
            })
            .to_string(),
        )
    };
    tokio::spawn(async move {
        let send = |event: Event| tx.send(Ok(event)).is_ok();
        if !send(chunk(json!({ "role": "assistant", "content": "" }), None)) {
            cancel.store(true, Ordering::SeqCst);
            return;
        }
        while let Some(event) = receiver.recv().await {
            match event {
                GenerateEvent::Text(text) => {
                    if !send(chunk(json!({ "content": text }), None)) {
                        cancel.store(true, Ordering::SeqCst);
                        return;
                    }
                }
                GenerateEvent::Done(Ok(f)) => {
                    send(chunk(json!({}), Some(finish_reason(f.generation.stop))));
                    break;
                }
                GenerateEvent::Done(Err(e)) => {
                    send(Event::default().data(
                        json!({ "error": { "message": e, "type": "server_error" } }).to_string(),
                    ));
                    break;
                }
            }
        }
        send(Event::default().data("[DONE]"));
    });
    Sse::new(tokio_stream::wrappers::UnboundedReceiverStream::new(rx))
        .keep_alive(KeepAlive::default())
        .into_response()
}
