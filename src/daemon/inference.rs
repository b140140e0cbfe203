//! The inference thread: the one owner of the chat model and its context.
//!
//! llama.cpp's context is not shareable, so every reply, for every client,
//! is a task on this thread's queue, answered in arrival order. Between
//! two tasks the thread looks at the adapter slot: when the editor worker
//! has published a new adapter generation, it is attached here, so a reply
//! in flight always finishes on the weights it started with and the next
//! one uses the new weights.
//!
//! Capture also runs here (after the reply that follows the user's turn):
//! it needs the model when the LLM extractor is on, and queuing it behind
//! the reply keeps it out of the reply's way.

use std::ops::ControlFlow;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc::UnboundedSender;

use super::{DaemonEvent, Shared};
use crate::engine::{ChatMessage, Engine, EngineOptions, Generation, GenerationParams};
use crate::learn::capture::{capture_message, CaptureSettings};

/// Work for the inference thread.
pub enum Task {
    Generate(GenerateTask),
    /// Learn from a stored user message.
    Capture {
        message_id: i64,
        text: String,
    },
}

pub struct GenerateTask {
    pub messages: Vec<ChatMessage>,
    pub params: GenerationParams,
    /// With the profile's edits (the default) or on the base weights.
    pub personalized: bool,
    /// Set by the connection when the client cancels or goes away.
    pub cancel: Arc<AtomicBool>,
    pub events: UnboundedSender<GenerateEvent>,
    /// When the request arrived, for time-to-first-token.
    pub received: Instant,
}

/// What a generation task reports back.
pub enum GenerateEvent {
    Text(String),
    Done(Result<Finished, String>),
}

pub struct Finished {
    pub generation: Generation,
    pub first_token: Duration,
    pub personalized: bool,
    pub adapter_generation: u64,
}

/// The adapter the chat should use: rebuilt by whoever changes the active
/// edits, picked up by the inference thread between replies.
#[derive(Debug, Clone, Default)]
pub struct AdapterSlot {
    /// Bumped on every change.
    pub generation: u64,
    /// None: no active edits, base weights.
    pub path: Option<PathBuf>,
    pub active_edits: usize,
    /// The ids of the edits in it, to notice changes made by other
    /// processes (`imprint prefs …` while the daemon runs).
    pub edit_ids: Vec<String>,
}

/// What is attached right now.
struct Attached {
    generation: u64,
    path: Option<PathBuf>,
}

/// Loads the model and serves tasks until the queue closes. `ready`
/// receives the load result, so the daemon fails fast on a bad model.
pub fn run(
    options: EngineOptions,
    shared: std::sync::mpsc::Receiver<Arc<Shared>>,
    tasks: std::sync::mpsc::Receiver<Task>,
    ready: std::sync::mpsc::Sender<Result<(u32, i32), String>>,
) {
    let mut engine = match Engine::load(options) {
        Ok(engine) => {
            let _ = ready.send(Ok((engine.n_ctx(), engine.summary().n_layer as i32)));
            engine
        }
        Err(e) => {
            let _ = ready.send(Err(e.to_string()));
            return;
        }
    };
    // The shared state exists only once the model is known to load.
    let Ok(shared) = shared.recv() else { return };
    let mut attached = Attached {
        generation: 0,
        path: None,
    };
    while let Ok(task) = tasks.recv() {
        match task {
            Task::Generate(task) => generate(&shared, &mut engine, &mut attached, task),
            Task::Capture { message_id, text } => capture(&shared, &mut engine, message_id, &text),
        }
    }
    tracing::debug!("inference thread stops: the queue is closed");
}

/// Makes the engine's weights match what the task asks for. Returns the
/// adapter generation in use.
fn sync_adapter(
    shared: &Shared,
    engine: &mut Engine,
    attached: &mut Attached,
    personalized: bool,
) -> Result<u64, String> {
    let slot = shared.adapter_slot();
    let wanted = if personalized {
        slot.path.clone()
    } else {
        None
    };
    let stale =
        attached.path != wanted || (wanted.is_some() && attached.generation != slot.generation);
    if stale {
        engine
            .set_adapter(wanted.as_deref())
            .map_err(|e| format!("cannot attach the profile's adapter: {e}"))?;
        tracing::info!(
            generation = slot.generation,
            personalized,
            "weights switched between replies"
        );
        attached.path = wanted;
    }
    attached.generation = slot.generation;
    Ok(slot.generation)
}

fn generate(shared: &Shared, engine: &mut Engine, attached: &mut Attached, task: GenerateTask) {
    if task.cancel.load(Ordering::Relaxed) {
        let _ = task.events.send(GenerateEvent::Done(Err(
            "cancelled before it started".into()
        )));
        return;
    }
    let generation = match sync_adapter(shared, engine, attached, task.personalized) {
        Ok(g) => g,
        Err(e) => {
            let _ = task.events.send(GenerateEvent::Done(Err(e)));
            return;
        }
    };
    let mut first_token = None;
    let result = engine.chat(&task.messages, &task.params, &mut |text| {
        first_token.get_or_insert_with(|| task.received.elapsed());
        // A closed channel means the connection is gone: stop decoding.
        if task
            .events
            .send(GenerateEvent::Text(text.to_string()))
            .is_err()
            || task.cancel.load(Ordering::Relaxed)
        {
            return ControlFlow::Break(());
        }
        ControlFlow::Continue(())
    });
    if matches!(&result, Ok(g) if g.stop == crate::engine::StopReason::Cancelled) {
        shared.replies_cancelled.fetch_add(1, Ordering::SeqCst);
    }
    let done = result
        .map(|generation_result| Finished {
            first_token: first_token.unwrap_or_else(|| task.received.elapsed()),
            generation: generation_result,
            personalized: task.personalized,
            adapter_generation: generation,
        })
        .map_err(|e| e.to_string());
    let _ = task.events.send(GenerateEvent::Done(done));
}

fn capture(shared: &Shared, engine: &mut Engine, message_id: i64, text: &str) {
    let learning = &shared.config.learning;
    let settings = CaptureSettings::from(learning);
    let report = shared.with_profile(|profile| {
        capture_message(
            profile,
            message_id,
            text,
            &settings,
            Some(&shared.model.sha256),
            learning.llm_extractor.then_some(engine),
        )
        .map_err(|e| match e {
            crate::learn::LearnError::Profile(p) => p,
            other => crate::profile::ProfileError::Invalid(other.to_string()),
        })
    });
    let report = match report {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!("capture of message {message_id} failed: {e}");
            return;
        }
    };
    for (change, ids) in [
        ("learned", &report.learned),
        ("pending", &report.pending),
        ("reinforced", &report.reinforced),
    ] {
        for id in ids {
            shared.publish(DaemonEvent::preference(*id, change));
        }
    }
    for (old, new) in &report.superseded {
        shared.publish(DaemonEvent::preference(*old, "superseded"));
        shared.publish(DaemonEvent::preference(*new, "learned"));
    }
    if report.secrets_skipped.total() > 0 {
        shared.publish(DaemonEvent::new(
            "secrets_skipped",
            serde_json::json!({
                "message": message_id,
                "kinds": report.secrets_skipped.describe(),
            }),
        ));
    }
    if !report.superseded.is_empty() {
        // The superseded preferences' edits left the weights.
        shared.rebuild_adapter();
    }
    for job in &report.jobs {
        shared.publish(DaemonEvent::job(*job, "queued", None));
    }
    if !report.jobs.is_empty() {
        shared.wake_worker();
    }
}
