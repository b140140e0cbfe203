//! The editor worker: computes, verifies and commits edits from the
//! profile's job queue, one at a time, at a lower CPU priority than chat.
//!
//! It keeps its own profile connection and its own llama.cpp instance (the
//! editor verifies every candidate through llama.cpp), so an edit never
//! holds up a reply. Both are loaded on the first job: a daemon that has
//! nothing to learn does not pay for them.
//!
//! Crash safety comes from the queue (see `learn`): a job is claimed,
//! computed, and stored with its completion in one transaction. A daemon
//! killed mid-edit leaves the job `running`; the next start puts it back in
//! the queue, and it runs again from the start.

use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{DaemonEvent, Shared};
use crate::editor::{Editor, EditorSettings};
use crate::engine::{Engine, EngineOptions};
use crate::learn::{run_edit_job, JobResult};
use crate::profile::{edits::ModelRecord, Profile};

/// How often an idle worker looks at the queue even without a wake-up
/// (jobs queued by another process, e.g. `imprint import`).
const POLL: Duration = Duration::from_secs(5);

pub struct WorkerOptions {
    pub engine: EngineOptions,
    pub editor: EditorSettings,
    pub job: crate::learn::JobOptions,
}

/// What the worker is doing, for `status`.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct WorkerStatus {
    /// idle, loading, editing, stopped, failed
    pub state: String,
    pub job: Option<i64>,
    pub preference: Option<i64>,
    pub stage: Option<String>,
    /// 0–1, by stage.
    pub progress: f64,
    pub jobs_done: u64,
    pub last_error: Option<String>,
}

/// Lowers this thread's scheduling priority (and that of the threads it
/// starts: llama.cpp's and candle's pools inherit it), so typing in the
/// chat stays responsive while an edit trains.
fn lower_priority() {
    #[cfg(target_os = "linux")]
    // SAFETY: setpriority on our own thread id; no memory is involved.
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, 10);
    }
    #[cfg(target_os = "macos")]
    // SAFETY: as above; on macOS PRIO_DARWIN_THREAD applies to the caller.
    unsafe {
        libc::setpriority(libc::PRIO_DARWIN_THREAD, 0, libc::PRIO_DARWIN_BG);
    }
}

struct Loaded {
    engine: Engine,
    editor: Editor,
}

pub fn run(shared: Arc<Shared>, options: WorkerOptions, mut profile: Profile, wake: Receiver<()>) {
    lower_priority();
    let mut loaded: Option<Loaded> = None;
    shared.set_worker(|s| s.state = "idle".into());
    loop {
        if shared.is_stopping() {
            break;
        }
        let job = match profile.claim_job() {
            Ok(job) => job,
            Err(e) => {
                tracing::error!("the worker cannot read the job queue: {e}");
                shared.set_worker(|s| s.last_error = Some(e.to_string()));
                None
            }
        };
        let Some(job) = job else {
            match wake.recv_timeout(POLL) {
                Ok(()) => continue,
                Err(RecvTimeoutError::Timeout) => {
                    follow_other_processes(&shared, &profile);
                    continue;
                }
                Err(RecvTimeoutError::Disconnected) => break,
            }
        };
        if loaded.is_none() {
            shared.set_worker(|s| {
                s.state = "loading".into();
                s.job = Some(job.id);
            });
            match load(&shared, &options, &profile) {
                Ok(l) => loaded = Some(l),
                Err(e) => {
                    tracing::error!("the editor cannot start: {e}");
                    let _ =
                        profile.finish_job(job.id, Some(&format!("the editor cannot start: {e}")));
                    shared.publish(DaemonEvent::job(job.id, "failed", Some(&e)));
                    shared.set_worker(|s| {
                        s.state = "failed".into();
                        s.last_error = Some(e);
                    });
                    continue;
                }
            }
        }
        let Some(l) = loaded.as_mut() else { continue };
        run_one(&shared, &mut profile, l, &options.job, &job);
    }
    // The connection closes before anyone is told the worker stopped
    // (profile deletion waits for exactly that).
    drop(profile);
    shared.set_worker(|s| {
        s.state = "stopped".into();
        s.job = None;
        s.stage = None;
    });
    tracing::debug!("editor worker stopped");
}

/// Edits may change outside the daemon (`imprint prefs forget` in a
/// shell while it runs): when the profile's active edits differ from the
/// adapter's, the adapter is rebuilt, so chat never lags behind the CLI.
fn follow_other_processes(shared: &Shared, profile: &Profile) {
    let Ok(active) = profile.active_edits(&shared.model.sha256) else {
        return;
    };
    let ids: Vec<String> = active.into_iter().map(|e| e.id).collect();
    if ids != shared.adapter_slot().edit_ids {
        tracing::info!("the profile's edits changed outside the daemon; rebuilding the adapter");
        shared.rebuild_adapter();
    }
}

fn load(shared: &Shared, options: &WorkerOptions, profile: &Profile) -> Result<Loaded, String> {
    let engine = Engine::load(options.engine.clone()).map_err(|e| e.to_string())?;
    let editor = Editor::load(
        &options.engine.model_path,
        &shared.model.sha256,
        &shared.paths.cache_dir,
        options.editor.clone(),
    )
    .map_err(|e| e.to_string())?;
    let summary = engine.summary();
    profile
        .remember_model(&ModelRecord {
            sha256: shared.model.sha256.clone(),
            path: options.engine.model_path.display().to_string(),
            architecture: summary.architecture.clone(),
            n_layer: summary.n_layer as usize,
            n_embd: summary.n_embd as usize,
            n_ff: editor.model().config.n_ff,
        })
        .map_err(|e| e.to_string())?;
    Ok(Loaded { engine, editor })
}

/// Roughly how far an edit is at each stage the editor reports, from its
/// measured time split (training and verification dominate).
fn stage_progress(stage: &str) -> f64 {
    let at = [
        ("collecting reference answers", 0.05),
        ("collecting anchor answers", 0.15),
        ("preparing the null-space projector", 0.25),
        ("preparing the key covariance", 0.3),
        ("training", 0.35),
        ("verifying", 0.8),
    ];
    at.iter()
        .find(|(prefix, _)| stage.starts_with(prefix))
        .map(|(_, p)| *p)
        .unwrap_or(0.0)
}

fn run_one(
    shared: &Shared,
    profile: &mut Profile,
    loaded: &mut Loaded,
    job_options: &crate::learn::JobOptions,
    job: &crate::profile::Job,
) {
    let preference = crate::learn::EditJob::from_job(job)
        .ok()
        .map(|j| j.preference_id);
    shared.set_worker(|s| {
        s.state = "editing".into();
        s.job = Some(job.id);
        s.preference = preference;
        s.stage = None;
        s.progress = 0.0;
    });
    shared.publish(DaemonEvent::job(job.id, "running", None));
    let started = Instant::now();
    let result = run_edit_job(
        profile,
        &mut loaded.engine,
        &mut loaded.editor,
        job,
        job_options,
        |stage| {
            let progress = stage_progress(stage);
            shared.set_worker(|s| {
                s.stage = Some(stage.to_string());
                s.progress = progress;
            });
            // The server's connection records it (the worker's own is busy
            // inside the job), so `prefs.list` shows it too.
            let _ = shared.with_profile(|p| p.set_job_progress(job.id, progress));
            shared.publish(DaemonEvent::job_stage(job.id, preference, stage, progress));
        },
    );
    match result {
        Ok(JobResult::Edited(outcome)) => {
            tracing::info!(
                job = job.id,
                accepted = outcome.accepted,
                seconds = started.elapsed().as_secs_f64(),
                "edit computed"
            );
            if outcome.accepted {
                shared.rebuild_adapter();
            }
            shared.publish(DaemonEvent::new(
                "job",
                serde_json::json!({
                    "job": job.id,
                    "preference": preference,
                    "state": "done",
                    "accepted": outcome.accepted,
                    "reason": outcome.reason,
                    "edit": outcome.edit.id,
                    "seconds": started.elapsed().as_secs_f64(),
                }),
            ));
        }
        Ok(JobResult::Skipped(why)) => {
            shared.publish(DaemonEvent::job(job.id, "done", Some(&why)));
        }
        Err(e) => {
            tracing::warn!(job = job.id, "edit job failed: {e}");
            shared.publish(DaemonEvent::job(job.id, "failed", Some(&e.to_string())));
            shared.set_worker(|s| s.last_error = Some(e.to_string()));
        }
    }
    shared.set_worker(|s| {
        s.state = "idle".into();
        s.job = None;
        s.preference = None;
        s.stage = None;
        s.jobs_done += 1;
    });
}
