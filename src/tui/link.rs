//! The chat's connection to the daemon, run as one async task.
//!
//! It turns the app's [`Action`]s into requests and what the daemon says
//! into [`DaemonMsg`]s. Three kinds of connection:
//! - a control connection for short requests (sessions, preferences, status);
//! - a subscription that carries job progress and preference changes;
//! - one connection per reply, so a reply streams while other requests
//!   run, and Esc simply closes it: the daemon cancels a reply whose
//!   client hung up, and keeps what was written so far.
//!
//! When the daemon cannot be reached the link says so and tries again every
//! few seconds; the app keeps running (and keeps what the user typed).

use std::time::Duration;

use serde_json::{json, Value};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};
use tokio::task::JoinHandle;

use super::app::{Action, DaemonMsg, JobProgress, PrefItem, Session, StatusInfo};
use crate::daemon::client::{Client, SendOptions};
use crate::daemon::protocol::Frame;
use crate::daemon::DaemonError;
use crate::paths::Paths;

const RETRY: Duration = Duration::from_secs(3);
const STATUS_POLL: Duration = Duration::from_secs(2);

type Out = UnboundedSender<DaemonMsg>;

fn say(out: &Out, msg: DaemonMsg) {
    let _ = out.send(msg);
}

/// Things the link's own tasks report back to it.
enum Internal {
    ReplyFinished,
}

/// Starts the link on the current runtime. `start_args`: how to start a
/// daemon when none runs (e.g. `--model`).
pub fn spawn(
    paths: Paths,
    start_args: Vec<String>,
    passphrase: Option<zeroize::Zeroizing<String>>,
    out: Out,
) -> UnboundedSender<Action> {
    let (tx, rx) = unbounded_channel();
    tokio::spawn(run(paths, start_args, passphrase, rx, out));
    tx
}

fn is_disconnect(e: &DaemonError) -> bool {
    matches!(e, DaemonError::Connect(_) | DaemonError::Protocol(_))
}

async fn run(
    paths: Paths,
    start_args: Vec<String>,
    passphrase: Option<zeroize::Zeroizing<String>>,
    mut actions: UnboundedReceiver<Action>,
    out: Out,
) {
    let mut first = true;
    loop {
        let connected = if first {
            let passphrase = passphrase.as_deref().map(String::as_str);
            Client::connect_or_start(&paths, &start_args, passphrase).await
        } else {
            Client::connect(&paths).await
        };
        first = false;
        let mut ctl = match connected {
            Ok(c) => c,
            Err(e) => {
                say(&out, DaemonMsg::Unreachable(e.to_string()));
                if !wait_disconnected(&mut actions, &out).await {
                    return;
                }
                continue;
            }
        };
        let sub = match subscribe(&paths).await {
            Ok(s) => s,
            Err(e) => {
                say(&out, DaemonMsg::Unreachable(e.to_string()));
                if !wait_disconnected(&mut actions, &out).await {
                    return;
                }
                continue;
            }
        };
        let (mut events, sub_task) = sub;
        say(&out, DaemonMsg::Connected);
        let mut session = Session2::default();
        if let Err(e) = refresh_all(&mut ctl, &out).await {
            say(&out, DaemonMsg::Unreachable(e.to_string()));
            sub_task.abort();
            continue;
        }
        let (internal_tx, mut internal) = unbounded_channel::<Internal>();
        let mut poll = tokio::time::interval(STATUS_POLL);
        let reason = loop {
            tokio::select! {
                action = actions.recv() => {
                    let Some(action) = action else {
                        // The app quit.
                        if let Some(t) = session.reply.take() { t.abort(); }
                        sub_task.abort();
                        return;
                    };
                    if let Err(e) = act(action, &mut ctl, &paths, &out, &mut session, &internal_tx).await {
                        if is_disconnect(&e) {
                            break e.to_string();
                        }
                        say(&out, DaemonMsg::Notice(remote_message(&e)));
                    }
                }
                frame = events.recv() => {
                    let Some(frame) = frame else { break "the daemon went away".to_string() };
                    if let Err(e) = on_event(frame, &mut ctl, &out).await {
                        if is_disconnect(&e) { break e.to_string(); }
                    }
                }
                Some(Internal::ReplyFinished) = internal.recv() => {
                    session.reply = None;
                    let _ = refresh_sessions(&mut ctl, &out).await;
                }
                _ = poll.tick() => {
                    if let Err(e) = refresh_status(&mut ctl, &out).await {
                        if is_disconnect(&e) { break e.to_string(); }
                    }
                }
            }
        };
        sub_task.abort();
        if let Some(t) = session.reply.take() {
            t.abort();
            say(&out, DaemonMsg::ReplyFailed("the daemon went away".into()));
        }
        say(&out, DaemonMsg::Unreachable(reason));
        if !wait_disconnected(&mut actions, &out).await {
            return;
        }
    }
}

/// While disconnected: answer actions with a notice, until it is time to
/// retry. False when the app has quit.
async fn wait_disconnected(actions: &mut UnboundedReceiver<Action>, out: &Out) -> bool {
    let retry = tokio::time::sleep(RETRY);
    tokio::pin!(retry);
    loop {
        tokio::select! {
            _ = &mut retry => return true,
            action = actions.recv() => match action {
                None => return false,
                Some(Action::Cancel) => {}
                Some(_) => say(out, DaemonMsg::Notice("Not connected to the daemon; trying again in a moment.".into())),
            },
        }
    }
}

#[derive(Default)]
struct Session2 {
    reply: Option<JoinHandle<()>>,
}

async fn subscribe(
    paths: &Paths,
) -> Result<(UnboundedReceiver<Frame>, JoinHandle<()>), DaemonError> {
    let mut sub = Client::connect(paths).await?;
    sub.call("subscribe", json!({})).await?;
    let (tx, rx) = unbounded_channel();
    let task = tokio::spawn(async move {
        while let Ok(frame) = sub.next_frame().await {
            if tx.send(frame).is_err() {
                break;
            }
        }
    });
    Ok((rx, task))
}

fn remote_message(e: &DaemonError) -> String {
    match e {
        DaemonError::Remote { message, .. } => message.clone(),
        other => other.to_string(),
    }
}

async fn refresh_all(ctl: &mut Client, out: &Out) -> Result<(), DaemonError> {
    refresh_status(ctl, out).await?;
    refresh_sessions(ctl, out).await?;
    refresh_prefs(ctl, out).await
}

fn status_info(v: &Value) -> StatusInfo {
    let worker = &v["worker"];
    let job = (worker["state"] == "editing").then(|| JobProgress {
        preference: worker["preference"].as_i64(),
        stage: worker["stage"].as_str().unwrap_or("starting").to_string(),
        progress: worker["progress"].as_f64().unwrap_or(0.0),
    });
    StatusInfo {
        model: v["model"]["name"].as_str().unwrap_or("?").to_string(),
        gpu_layers: v["model"]["gpu_layers"].as_u64().unwrap_or(0),
        active_edits: v["adapter"]["active_edits"].as_u64().unwrap_or(0),
        queued: v["queue"]["queued"].as_u64().unwrap_or(0),
        job,
    }
}

async fn refresh_status(ctl: &mut Client, out: &Out) -> Result<(), DaemonError> {
    let v = ctl.call("status", json!({})).await?;
    say(out, DaemonMsg::Status(status_info(&v)));
    Ok(())
}

async fn refresh_sessions(ctl: &mut Client, out: &Out) -> Result<(), DaemonError> {
    let v = ctl.call("session.list", json!({})).await?;
    let sessions = v
        .as_array()
        .map(|a| a.iter().filter_map(Session::from_json).collect())
        .unwrap_or_default();
    say(out, DaemonMsg::Sessions(sessions));
    Ok(())
}

async fn refresh_prefs(ctl: &mut Client, out: &Out) -> Result<(), DaemonError> {
    let v = ctl.call("prefs.list", json!({})).await?;
    let prefs = v
        .as_array()
        .map(|a| a.iter().filter_map(PrefItem::from_json).collect())
        .unwrap_or_default();
    say(out, DaemonMsg::Prefs(prefs));
    Ok(())
}

async fn on_event(frame: Frame, ctl: &mut Client, out: &Out) -> Result<(), DaemonError> {
    let Frame::Event { event, data, .. } = frame else {
        return Ok(());
    };
    match event.as_str() {
        "job" => match data["state"].as_str() {
            Some("running") => {
                if let Some(stage) = data["stage"].as_str() {
                    say(
                        out,
                        DaemonMsg::Job(JobProgress {
                            preference: data["preference"].as_i64(),
                            stage: stage.to_string(),
                            progress: data["progress"].as_f64().unwrap_or(0.0),
                        }),
                    );
                }
            }
            Some("done") | Some("failed") => {
                say(out, DaemonMsg::JobFinished);
                if data["state"] == "failed" {
                    say(
                        out,
                        DaemonMsg::Notice(format!(
                            "Learning failed: {}",
                            data["detail"].as_str().unwrap_or("see `imprint jobs list`")
                        )),
                    );
                } else if data["accepted"] == false {
                    say(
                        out,
                        DaemonMsg::Notice(format!(
                            "An edit was computed but not applied: {}",
                            data["reason"]
                                .as_str()
                                .unwrap_or("the verification gate refused it")
                        )),
                    );
                }
                refresh_prefs(ctl, out).await?;
                refresh_status(ctl, out).await?;
            }
            _ => refresh_prefs(ctl, out).await?,
        },
        "preference" => refresh_prefs(ctl, out).await?,
        "adapter" => refresh_status(ctl, out).await?,
        "secrets_skipped" => say(
            out,
            DaemonMsg::Notice(format!(
                "Not learned: your message held {}. Secrets are never stored as preferences.",
                data["kinds"].as_str().unwrap_or("a secret")
            )),
        ),
        _ => {}
    }
    Ok(())
}

async fn act(
    action: Action,
    ctl: &mut Client,
    paths: &Paths,
    out: &Out,
    session: &mut Session2,
    internal: &UnboundedSender<Internal>,
) -> Result<(), DaemonError> {
    match action {
        Action::Send {
            session: id,
            text,
            personalized,
        } => {
            let id = match id {
                Some(id) => id,
                None => {
                    let created = ctl.call("session.create", json!({})).await?;
                    let id = created["id"].as_i64().unwrap_or(0);
                    say(out, DaemonMsg::Current(id));
                    refresh_sessions(ctl, out).await?;
                    id
                }
            };
            let paths = paths.clone();
            let out = out.clone();
            let internal = internal.clone();
            session.reply = Some(tokio::spawn(async move {
                let result = async {
                    let mut c = Client::connect(&paths).await?;
                    c.send(
                        id,
                        &text,
                        &SendOptions {
                            unpersonalized: !personalized,
                            ..Default::default()
                        },
                        |t| say(&out, DaemonMsg::Token(t.to_string())),
                    )
                    .await
                }
                .await;
                match result {
                    Ok(reply) => say(
                        &out,
                        DaemonMsg::ReplyDone {
                            text: reply.text,
                            stop: reply.stop,
                        },
                    ),
                    Err(e) => say(&out, DaemonMsg::ReplyFailed(remote_message(&e))),
                }
                let _ = internal.send(Internal::ReplyFinished);
            }));
        }
        Action::Cancel => {
            // Closing the reply's connection is the cancel: the daemon
            // stops at the next token and stores what was written.
            if let Some(t) = session.reply.take() {
                t.abort();
                say(out, DaemonMsg::ReplyCancelled);
            }
        }
        Action::NewSession { incognito } => {
            let created = ctl
                .call("session.create", json!({ "incognito": incognito }))
                .await?;
            let id = created["id"].as_i64().unwrap_or(0);
            refresh_sessions(ctl, out).await?;
            say(
                out,
                DaemonMsg::Opened {
                    id,
                    messages: vec![],
                },
            );
            if incognito {
                say(out, DaemonMsg::Notice("Incognito: this chat is not stored and nothing in it is learned. It is gone when the daemon stops.".into()));
            }
        }
        Action::OpenSession(id) => {
            let got = ctl.call("session.get", json!({ "id": id })).await?;
            let messages = got["messages"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|m| {
                            (
                                m["role"].as_str().unwrap_or("user").to_string(),
                                m["content"].as_str().unwrap_or("").to_string(),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
            say(out, DaemonMsg::Opened { id, messages });
        }
        Action::RenameSession { id, title } => {
            ctl.call("session.rename", json!({ "id": id, "title": title }))
                .await?;
            refresh_sessions(ctl, out).await?;
        }
        Action::DeleteSession(id) => {
            let removed = ctl.call("session.delete", json!({ "id": id })).await?;
            say(out, DaemonMsg::Closed(id));
            let forgotten = removed["removal"]["preferences_removed"]
                .as_array()
                .map_or(0, Vec::len);
            if forgotten > 0 {
                say(out, DaemonMsg::Notice(format!("Session deleted; {forgotten} preference(s) learned only from it are forgotten.")));
            }
            refresh_sessions(ctl, out).await?;
            refresh_prefs(ctl, out).await?;
        }
        Action::ApprovePref(id) => {
            ctl.call("prefs.approve", json!({ "id": id })).await?;
            say(
                out,
                DaemonMsg::Notice(format!(
                    "Approved #{id}: it is being written into the weights."
                )),
            );
            refresh_prefs(ctl, out).await?;
        }
        Action::RejectPref(id) => {
            ctl.call("prefs.reject", json!({ "id": id })).await?;
            say(out, DaemonMsg::Notice(format!("Rejected #{id}.")));
            refresh_prefs(ctl, out).await?;
        }
        Action::ForgetPref(id) => {
            ctl.call("prefs.forget", json!({ "id": id })).await?;
            say(
                out,
                DaemonMsg::Notice(format!(
                    "Forgot #{id}: it, its sources and its edit are gone."
                )),
            );
            refresh_prefs(ctl, out).await?;
            refresh_status(ctl, out).await?;
        }
        Action::EditPref {
            id,
            attribute,
            target,
        } => {
            ctl.call(
                "prefs.edit",
                json!({ "id": id, "attribute": attribute, "target": target }),
            )
            .await?;
            refresh_prefs(ctl, out).await?;
        }
        Action::ShowPref(id) => {
            let v = ctl.call("prefs.show", json!({ "id": id })).await?;
            let p = &v["preference"];
            let mut text = format!(
                "{} → {} ({}, {})\nedit: {}\n",
                p["attribute"].as_str().unwrap_or("?"),
                p["target"].as_str().unwrap_or("?"),
                p["polarity"].as_str().unwrap_or("?"),
                p["status"].as_str().unwrap_or("?"),
                v["edit_summary"].as_str().unwrap_or("?"),
            );
            for s in v["sources"].as_array().into_iter().flatten() {
                let line = match s["message"]["content"].as_str() {
                    Some(m) => format!("from your message: “{m}”"),
                    None => match s["source"]["kind"].as_str() {
                        Some("import") => format!(
                            "from an import: {}",
                            s["source"]["file"].as_str().unwrap_or("?")
                        ),
                        Some("manual") => "added by hand".to_string(),
                        _ => "from a message that was deleted".to_string(),
                    },
                };
                text.push_str(&line);
                text.push('\n');
            }
            say(
                out,
                DaemonMsg::Info {
                    title: format!("Preference #{id}"),
                    text,
                },
            );
        }
        Action::Export { path, passphrase } => {
            let path = if path.is_absolute() {
                path
            } else {
                std::env::current_dir()
                    .map(|d| d.join(&path))
                    .unwrap_or(path)
            };
            let v = ctl
                .call(
                    "profile.export",
                    json!({ "path": path, "passphrase": passphrase, "plain": passphrase.is_none() }),
                )
                .await?;
            say(
                out,
                DaemonMsg::Notice(format!(
                    "Exported {} bytes to {} ({}).",
                    v["bytes"],
                    path.display(),
                    if v["encrypted"] == true {
                        "encrypted"
                    } else {
                        "NOT encrypted"
                    }
                )),
            );
        }
        Action::Compare(question) => {
            for personalized in [true, false] {
                let paths = paths.clone();
                let out = out.clone();
                let question = question.clone();
                tokio::spawn(async move {
                    let result = async {
                        let mut c = Client::connect(&paths).await?;
                        let s = c
                            .call("session.create", json!({ "incognito": true }))
                            .await?;
                        let id = s["id"].as_i64().unwrap_or(-1);
                        let reply = c
                            .send(
                                id,
                                &question,
                                &SendOptions {
                                    unpersonalized: !personalized,
                                    greedy: true,
                                    ..Default::default()
                                },
                                |t| {
                                    say(
                                        &out,
                                        DaemonMsg::CompareToken {
                                            personalized,
                                            text: t.to_string(),
                                        },
                                    )
                                },
                            )
                            .await;
                        let _ = c.call("session.delete", json!({ "id": id })).await;
                        reply
                    }
                    .await;
                    if let Err(e) = result {
                        say(
                            &out,
                            DaemonMsg::CompareToken {
                                personalized,
                                text: format!("(failed: {})", remote_message(&e)),
                            },
                        );
                    }
                    say(&out, DaemonMsg::CompareDone { personalized });
                });
            }
        }
        Action::ModelInfo => {
            let v = ctl.call("status", json!({})).await?;
            let m = &v["model"];
            let text = format!(
                "model: {}\nfile: {}\nsha256: {}\narchitecture: {}, {} layers, context {} tokens\nGPU layers: {}\nactive edits: {} (adapter generation {})\nqueue: {} queued, {} running; editor {}",
                m["name"].as_str().unwrap_or("?"),
                m["path"].as_str().unwrap_or("?"),
                m["sha256"].as_str().unwrap_or("?"),
                m["architecture"].as_str().unwrap_or("?"),
                m["n_layer"],
                m["n_ctx"],
                m["gpu_layers"],
                v["adapter"]["active_edits"],
                v["adapter"]["generation"],
                v["queue"]["queued"],
                v["queue"]["running"],
                v["worker"]["state"].as_str().unwrap_or("?"),
            );
            say(
                out,
                DaemonMsg::Info {
                    title: "Model".into(),
                    text,
                },
            );
        }
        // The terminal itself does this one (mod.rs).
        Action::Copy(_) => {}
    }
    Ok(())
}
