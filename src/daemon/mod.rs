//! `imprint daemon`: one long-lived process that owns the model, the
//! profile and the learning queue, and serves any number of clients.
//!
//! ```text
//!  clients ──NDJSON over a 0600 Unix socket──┐
//!  (chat, CLI, tests)                        │           ┌──────────────────────┐
//!                                  server.rs: one task   │ inference thread      │
//!  OpenAI clients ──HTTP+SSE──┐    per connection ──────▶│ owns the chat model,  │
//!  (aichat, curl, openai)     │                          │ replies in order,     │
//!                       http.rs (loopback, bearer token)─▶│ captures after turns │
//!                                                        └──────────┬───────────┘
//!                                                    jobs (profile) │ adapter slot
//!                                                        ┌──────────▼───────────┐
//!                                                        │ editor worker thread  │
//!                                                        │ (nice 10): computes,  │
//!                                                        │ verifies, commits     │
//!                                                        └──────────────────────┘
//! ```
//!
//! The pieces:
//! - [`runtime`]: socket and lock locations, the single-instance lock.
//! - [`protocol`]: the frames (documented in `docs/PROTOCOL.md`).
//! - [`server`]: accepting, reading frames safely, dispatching methods.
//! - [`inference`]: the thread that owns llama.cpp for chat.
//! - [`worker`]: the thread that turns queued jobs into edits.
//! - [`http`]: the opt-in OpenAI-compatible endpoint.
//! - [`client`]: what the CLI (and the terminal chat) use to talk to it.
//!
//! Shared state lives in [`Shared`], behind one `Arc`. The profile has one
//! connection here (short calls from any task, under a mutex) and one in
//! the worker (long transactions, never blocking the server).

pub mod client;
pub mod http;
pub mod inference;
pub mod protocol;
pub mod runtime;
pub mod server;
pub mod token;
pub mod worker;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::Serialize;
use thiserror::Error;

use crate::config::Config;
use crate::editor::EditorSettings;
use crate::engine::{ChatMessage, EngineOptions};
use crate::paths::Paths;
use crate::profile::{PassphraseSource, Profile, ProfileError};

use inference::{AdapterSlot, Task};
use worker::WorkerStatus;

#[derive(Debug, Error)]
pub enum DaemonError {
    #[error("a daemon is already running{} (socket {}). `imprint daemon stop` stops it.", pid.map(|p| format!(" as pid {p}")).unwrap_or_default(), socket.display())]
    AlreadyRunning { pid: Option<u32>, socket: PathBuf },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Profile(#[from] ProfileError),
    #[error("the model could not be loaded: {0}")]
    Model(String),
    #[error("the HTTP endpoint must listen on a loopback address (127.0.0.1 or ::1), not {0}: it would expose your assistant to the network")]
    NotLoopback(std::net::SocketAddr),
    #[error("the profile has been deleted; the daemon is stopping")]
    ProfileGone,
    #[error("cannot reach the daemon: {0}")]
    Connect(String),
    #[error("the daemon answered with an error ({code:?}): {message}")]
    Remote {
        code: protocol::ErrorCode,
        message: String,
    },
    #[error("the daemon broke the protocol: {0}")]
    Protocol(String),
}

/// What the model the daemon serves is.
#[derive(Debug, Clone, Serialize)]
pub struct ModelInfo {
    /// The name clients see (`/v1/models`, status bar).
    pub name: String,
    pub path: PathBuf,
    pub sha256: String,
    pub architecture: String,
    pub gpu_layers: u32,
    /// Filled in once the inference thread has loaded the model.
    pub n_ctx: u32,
    pub n_layer: i32,
}

/// Everything `imprint daemon` needs to start.
pub struct DaemonOptions {
    pub paths: Paths,
    pub config: Config,
    pub engine: EngineOptions,
    pub editor: EditorSettings,
    pub model: ModelInfo,
    /// `--http ADDR`: serve the OpenAI-compatible API there, with this token.
    pub http: Option<(std::net::SocketAddr, String)>,
    /// How long a stopping daemon waits for an edit in progress.
    pub grace: Duration,
}

/// An event for subscribers (`subscribe`).
#[derive(Debug, Clone, Serialize)]
pub struct DaemonEvent {
    pub kind: String,
    pub data: serde_json::Value,
}

impl DaemonEvent {
    pub fn new(kind: &str, data: serde_json::Value) -> Self {
        Self {
            kind: kind.to_string(),
            data,
        }
    }

    pub fn preference(id: i64, change: &str) -> Self {
        Self::new(
            "preference",
            serde_json::json!({ "id": id, "change": change }),
        )
    }

    pub fn job(id: i64, state: &str, detail: Option<&str>) -> Self {
        Self::new(
            "job",
            serde_json::json!({ "job": id, "state": state, "detail": detail }),
        )
    }

    pub fn job_stage(id: i64, preference: Option<i64>, stage: &str, progress: f64) -> Self {
        Self::new(
            "job",
            serde_json::json!({
                "job": id,
                "preference": preference,
                "state": "running",
                "stage": stage,
                "progress": progress,
            }),
        )
    }
}

/// A conversation that exists only in memory (incognito).
#[derive(Debug, Clone)]
pub struct IncognitoSession {
    pub title: String,
    pub created: i64,
    pub messages: Vec<ChatMessage>,
}

/// State shared by the server tasks and the two threads.
pub struct Shared {
    pub paths: Paths,
    pub config: Config,
    pub model: ModelInfo,
    profile: Mutex<Option<Profile>>,
    /// For reopening the profile (deletion opens it once more to wipe it).
    passphrase: Arc<dyn PassphraseSource + Send + Sync>,
    adapter: Mutex<AdapterSlot>,
    events: tokio::sync::broadcast::Sender<DaemonEvent>,
    inference: Mutex<Option<std::sync::mpsc::Sender<Task>>>,
    worker_wake: Mutex<Option<std::sync::mpsc::Sender<()>>>,
    worker: Mutex<WorkerStatus>,
    /// Incognito sessions, by (negative) id.
    pub incognito: Mutex<HashMap<i64, IncognitoSession>>,
    next_incognito: AtomicI64,
    stopping: AtomicBool,
    stop: tokio::sync::watch::Sender<bool>,
    pub started: Instant,
    pub clients: AtomicUsize,
    pub replies_in_flight: AtomicUsize,
    /// Replies stopped early because the client cancelled or hung up.
    pub replies_cancelled: AtomicU64,
    /// A profile deletion is running: the process must not exit under it.
    deleting: AtomicBool,
    pub grace: Duration,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic elsewhere must not take the daemon down with it: the data
    // behind these locks is always left consistent between statements.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Shared {
    /// Runs `f` on the profile. Errors when the profile has been deleted.
    pub fn with_profile<T>(
        &self,
        f: impl FnOnce(&mut Profile) -> Result<T, ProfileError>,
    ) -> Result<T, DaemonError> {
        let mut guard = lock(&self.profile);
        let profile = guard.as_mut().ok_or(DaemonError::ProfileGone)?;
        Ok(f(profile)?)
    }

    /// The profile, locked, for callers that need it across several calls.
    pub fn lock_profile(&self) -> MutexGuard<'_, Option<Profile>> {
        lock(&self.profile)
    }

    pub fn adapter_slot(&self) -> AdapterSlot {
        lock(&self.adapter).clone()
    }

    /// Rebuilds the adapter from the profile's active edits and publishes
    /// it: the next reply uses it.
    pub fn rebuild_adapter(&self) {
        let built = self.with_profile(|p| {
            let path = p.assemble_adapter(
                &self.paths.cache_dir,
                &self.model.sha256,
                &self.model.architecture,
            )?;
            let ids: Vec<String> = p
                .active_edits(&self.model.sha256)?
                .into_iter()
                .map(|e| e.id)
                .collect();
            Ok((path, ids))
        });
        match built {
            Ok((path, edit_ids)) => {
                let active_edits = edit_ids.len();
                let generation = {
                    let mut slot = lock(&self.adapter);
                    slot.generation += 1;
                    slot.path = path;
                    slot.active_edits = active_edits;
                    slot.edit_ids = edit_ids;
                    slot.generation
                };
                self.publish(DaemonEvent::new(
                    "adapter",
                    serde_json::json!({ "generation": generation, "active_edits": active_edits }),
                ));
            }
            Err(e) => tracing::error!("cannot rebuild the adapter: {e}"),
        }
    }

    pub fn publish(&self, event: DaemonEvent) {
        // No subscribers is fine.
        let _ = self.events.send(event);
    }

    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<DaemonEvent> {
        self.events.subscribe()
    }

    /// Queues work for the inference thread.
    pub fn infer(&self, task: Task) -> Result<(), DaemonError> {
        match lock(&self.inference).as_ref() {
            Some(tx) => tx
                .send(task)
                .map_err(|_| DaemonError::Model("the inference thread has stopped".into())),
            None => Err(DaemonError::Model("the daemon is stopping".into())),
        }
    }

    pub fn wake_worker(&self) {
        if let Some(tx) = lock(&self.worker_wake).as_ref() {
            let _ = tx.send(());
        }
    }

    pub fn worker_status(&self) -> WorkerStatus {
        lock(&self.worker).clone()
    }

    pub fn set_worker(&self, f: impl FnOnce(&mut WorkerStatus)) {
        f(&mut lock(&self.worker));
    }

    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    /// Starts a graceful stop (SIGTERM, `shutdown`, profile deletion).
    pub fn request_stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        let _ = self.stop.send(true);
        self.wake_worker();
    }

    pub fn stop_signal(&self) -> tokio::sync::watch::Receiver<bool> {
        self.stop.subscribe()
    }

    pub fn new_incognito(&self, title: &str) -> i64 {
        let id = self.next_incognito.fetch_sub(1, Ordering::SeqCst);
        lock(&self.incognito).insert(
            id,
            IncognitoSession {
                title: title.to_string(),
                created: crate::profile::now(),
                messages: Vec::new(),
            },
        );
        id
    }

    /// Deletes the profile: stops the worker (waiting up to the grace
    /// period for an edit in progress), closes both connections, wipes and
    /// removes every file. The daemon stops afterwards.
    pub fn delete_profile(&self) -> Result<crate::profile::delete::DeletionReceipt, DaemonError> {
        self.deleting.store(true, Ordering::SeqCst);
        let result = self.delete_profile_inner();
        self.deleting.store(false, Ordering::SeqCst);
        result
    }

    fn delete_profile_inner(&self) -> Result<crate::profile::delete::DeletionReceipt, DaemonError> {
        self.request_stop();
        let deadline = Instant::now() + self.grace;
        while self.worker_status().state != "stopped" && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        if self.worker_status().state != "stopped" {
            return Err(DaemonError::Model(
                "the editor did not finish its edit in time, so nothing was deleted; the daemon is stopping: start it again and repeat the deletion".into(),
            ));
        }
        if let Some(profile) = lock(&self.profile).take() {
            profile.close()?;
        }
        let receipt =
            crate::profile::delete::delete_profile(&self.paths, self.passphrase.as_ref())?;
        let mut slot = lock(&self.adapter);
        slot.generation += 1;
        slot.path = None;
        slot.active_edits = 0;
        slot.edit_ids.clear();
        Ok(receipt)
    }

    pub fn incognito_sessions(&self) -> MutexGuard<'_, HashMap<i64, IncognitoSession>> {
        lock(&self.incognito)
    }
}

/// Runs the daemon until SIGTERM/SIGINT or a `shutdown` request.
pub fn run(
    options: DaemonOptions,
    passphrase: Arc<dyn PassphraseSource + Send + Sync>,
) -> Result<(), DaemonError> {
    let files = runtime::RuntimeFiles::new(&options.paths);
    let instance = runtime::InstanceLock::acquire(&files)?;
    tracing::info!(lock = %instance.path().display(), pid = std::process::id(), "daemon starting");

    // Two connections: the server's and the worker's. The second open
    // reuses the first one's passphrase (see `Remembered`).
    let (profile, notice) = Profile::open_or_create(&options.paths, passphrase.as_ref())?;
    if let Some(notice) = notice {
        tracing::warn!("{notice}");
        eprintln!("imprint: {notice}");
    }
    let requeued = profile.requeue_interrupted_jobs()?;
    if requeued > 0 {
        tracing::info!("{requeued} interrupted job(s) queued again");
    }
    let worker_profile = Profile::open(&options.paths, passphrase.as_ref())?;

    // The chat model first: a daemon that cannot load it must say so
    // before it accepts anyone.
    let (task_tx, task_rx) = std::sync::mpsc::channel();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let (shared_tx, shared_rx) = std::sync::mpsc::channel::<Arc<Shared>>();
    let inference = {
        let engine = options.engine.clone();
        std::thread::Builder::new()
            .name("inference".into())
            .spawn(move || inference::run(engine, shared_rx, task_rx, ready_tx))
            .map_err(|e| DaemonError::Model(format!("cannot start the inference thread: {e}")))?
    };
    let (n_ctx, n_layer) = ready_rx
        .recv()
        .map_err(|_| DaemonError::Model("the inference thread died while loading".into()))?
        .map_err(DaemonError::Model)?;
    let mut model = options.model.clone();
    model.n_ctx = n_ctx;
    model.n_layer = n_layer;

    let (events, _) = tokio::sync::broadcast::channel(1024);
    let (stop, _) = tokio::sync::watch::channel(false);
    let (wake_tx, wake_rx) = std::sync::mpsc::channel();
    let shared = Arc::new(Shared {
        paths: options.paths.clone(),
        config: options.config.clone(),
        model,
        profile: Mutex::new(Some(profile)),
        passphrase,
        adapter: Mutex::new(AdapterSlot::default()),
        events,
        inference: Mutex::new(Some(task_tx)),
        worker_wake: Mutex::new(Some(wake_tx)),
        worker: Mutex::new(WorkerStatus::default()),
        incognito: Mutex::new(HashMap::new()),
        next_incognito: AtomicI64::new(-1),
        stopping: AtomicBool::new(false),
        stop,
        started: Instant::now(),
        clients: AtomicUsize::new(0),
        replies_in_flight: AtomicUsize::new(0),
        replies_cancelled: AtomicU64::new(0),
        deleting: AtomicBool::new(false),
        grace: options.grace,
    });
    let _ = shared_tx.send(shared.clone());
    shared.rebuild_adapter();

    let (worker_done_tx, worker_done_rx) = std::sync::mpsc::channel::<()>();
    let worker = {
        let shared = shared.clone();
        let worker_options = worker::WorkerOptions {
            engine: options.engine.clone(),
            editor: options.editor.clone(),
            job: crate::learn::JobOptions::from_config(&options.config.learning),
        };
        std::thread::Builder::new()
            .name("editor".into())
            .spawn(move || {
                worker::run(shared, worker_options, worker_profile, wake_rx);
                let _ = worker_done_tx.send(());
            })
            .map_err(|e| DaemonError::Model(format!("cannot start the editor worker: {e}")))?
    };

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("imprint-io")
        .build()
        .map_err(|source| DaemonError::Io {
            path: files.dir.clone(),
            source,
        })?;
    let served = rt.block_on(server::serve(
        shared.clone(),
        files.clone(),
        options.http.clone(),
    ));

    // Stopping: no new replies, let the edit in progress finish (its
    // result is committed in one transaction) or leave it queued.
    shared.request_stop();
    *lock(&shared.inference) = None;
    *lock(&shared.worker_wake) = None;
    if worker_done_rx.recv_timeout(options.grace).is_err() {
        tracing::warn!(
            "the edit in progress did not finish within {:?}; it stays queued and runs again at the next start",
            options.grace
        );
    } else {
        let _ = worker.join();
    }
    let _ = inference.join();
    // A deletion asked for over the socket finishes, and its answer is
    // sent, before the process exits.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut waited = false;
    while shared.deleting.load(Ordering::SeqCst) && Instant::now() < deadline {
        waited = true;
        std::thread::sleep(Duration::from_millis(50));
    }
    if waited {
        std::thread::sleep(Duration::from_millis(300));
    }
    rt.shutdown_timeout(Duration::from_secs(2));
    let _ = std::fs::remove_file(&files.socket);
    // Closing the profile checkpoints the WAL.
    if let Some(profile) = lock(&shared.profile).take() {
        let _ = profile.close();
    }
    tracing::info!("daemon stopped");
    drop(instance);
    served
}
