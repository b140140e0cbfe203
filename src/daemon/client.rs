//! A client of the daemon's socket: connect (starting the daemon when
//! none runs), say hello, call methods, stream replies.
//!
//! One request at a time per `Client`; frames that belong to other
//! requests (a subscription's events) are handed to the caller's
//! `on_event` or dropped. The terminal chat keeps two clients: one for
//! requests, one subscribed to events.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;

use super::protocol::{Frame, Reply, Request, TokenEvent, Welcome, PROTOCOL_VERSION};
use super::runtime::RuntimeFiles;
use super::DaemonError;
use crate::paths::Paths;

pub struct Client {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    next_id: u64,
    pub welcome: Welcome,
}

/// Options for one `send`.
#[derive(Debug, Clone, Default)]
pub struct SendOptions {
    /// Answer on the base weights.
    pub unpersonalized: bool,
    pub max_tokens: Option<u32>,
    pub greedy: bool,
}

/// Where the daemon started by a client writes its log.
pub fn log_file(paths: &Paths) -> PathBuf {
    paths.data_dir.join("logs").join("daemon.log")
}

impl Client {
    /// Connects to a running daemon. Errors when none runs.
    pub async fn connect(paths: &Paths) -> Result<Self, DaemonError> {
        let files = RuntimeFiles::new(paths);
        let stream = UnixStream::connect(&files.socket).await.map_err(|e| {
            DaemonError::Connect(format!(
                "{} ({e}); is it running? `imprint daemon start` starts it",
                files.socket.display()
            ))
        })?;
        Self::handshake(stream).await
    }

    /// Connects, starting a daemon in the background first when none runs.
    /// `args`: extra arguments for `imprint daemon run` (e.g. `--model`);
    /// `passphrase`: the profile's, when it has one and the daemon (with
    /// no terminal to ask on) must be given it.
    pub async fn connect_or_start(
        paths: &Paths,
        args: &[String],
        passphrase: Option<&str>,
    ) -> Result<Self, DaemonError> {
        if let Ok(client) = Self::connect(paths).await {
            return Ok(client);
        }
        start_in_background(paths, args, passphrase).await?;
        Self::connect(paths).await
    }

    async fn handshake(stream: UnixStream) -> Result<Self, DaemonError> {
        let (read, writer) = stream.into_split();
        let mut client = Self {
            reader: BufReader::new(read),
            writer,
            next_id: 1,
            welcome: Welcome {
                protocol: 0,
                daemon: String::new(),
                pid: 0,
            },
        };
        let welcome = client
            .call(
                "hello",
                json!({ "protocol": PROTOCOL_VERSION, "client": format!("imprint {}", env!("CARGO_PKG_VERSION")) }),
            )
            .await?;
        client.welcome = serde_json::from_value(welcome)
            .map_err(|e| DaemonError::Protocol(format!("bad hello answer: {e}")))?;
        Ok(client)
    }

    /// Writes one request; returns its id.
    pub async fn request(&mut self, method: &str, params: Value) -> Result<u64, DaemonError> {
        let id = self.next_id;
        self.next_id += 1;
        let mut line = serde_json::to_string(&Request {
            id,
            method: method.to_string(),
            params,
        })
        .map_err(|e| DaemonError::Protocol(e.to_string()))?;
        line.push('\n');
        if let Err(e) = self.writer.write_all(line.as_bytes()).await {
            // A daemon that refuses a connection (another user's) says why and
            // closes it, sometimes before this write: the reason is still
            // waiting to be read, and it is what the person needs to see.
            let said = tokio::time::timeout(std::time::Duration::from_secs(2), self.next_frame());
            if let Ok(Ok(Frame::Error { id: None, error })) = said.await {
                return Err(DaemonError::Remote {
                    code: error.code,
                    message: error.message,
                });
            }
            return Err(DaemonError::Connect(format!("the daemon hung up: {e}")));
        }
        Ok(id)
    }

    /// The next frame, whichever request it belongs to.
    pub async fn next_frame(&mut self) -> Result<Frame, DaemonError> {
        let mut line = String::new();
        let n = self
            .reader
            .read_line(&mut line)
            .await
            .map_err(|e| DaemonError::Connect(format!("the daemon hung up: {e}")))?;
        if n == 0 {
            return Err(DaemonError::Connect(
                "the daemon closed the connection".into(),
            ));
        }
        serde_json::from_str(&line)
            .map_err(|e| DaemonError::Protocol(format!("unreadable frame ({e}): {}", line.trim())))
    }

    /// Calls a method and waits for its result.
    pub async fn call(&mut self, method: &str, params: Value) -> Result<Value, DaemonError> {
        let id = self.request(method, params).await?;
        self.wait(id, |_, _| {}).await
    }

    /// Waits for request `id`'s final frame, passing its events on.
    pub async fn wait(
        &mut self,
        id: u64,
        mut on_event: impl FnMut(&str, &Value),
    ) -> Result<Value, DaemonError> {
        loop {
            match self.next_frame().await? {
                Frame::Result { id: got, result } if got == id => return Ok(result),
                Frame::Error { id: got, error } if got == Some(id) || got.is_none() => {
                    return Err(DaemonError::Remote {
                        code: error.code,
                        message: error.message,
                    })
                }
                Frame::Event {
                    id: Some(got),
                    event,
                    data,
                } if got == id => on_event(&event, &data),
                _ => {}
            }
        }
    }

    /// Sends a user message and streams the reply's text to `on_text`.
    pub async fn send(
        &mut self,
        session: i64,
        text: &str,
        options: &SendOptions,
        mut on_text: impl FnMut(&str),
    ) -> Result<Reply, DaemonError> {
        let id = self
            .request(
                "send",
                json!({
                    "session": session,
                    "text": text,
                    "personalized": !options.unpersonalized,
                    "max_tokens": options.max_tokens,
                    "greedy": options.greedy,
                }),
            )
            .await?;
        let mut expected = 0u64;
        let mut gap = None;
        let result = self
            .wait(id, |event, data| {
                if event == "token" {
                    if let Ok(t) = serde_json::from_value::<TokenEvent>(data.clone()) {
                        if t.seq != expected && gap.is_none() {
                            gap = Some((expected, t.seq));
                        }
                        expected = t.seq + 1;
                        on_text(&t.text);
                    }
                }
            })
            .await?;
        if let Some((want, got)) = gap {
            return Err(DaemonError::Protocol(format!(
                "token {want} was expected and {got} arrived"
            )));
        }
        serde_json::from_value(result).map_err(|e| DaemonError::Protocol(e.to_string()))
    }
}

/// Starts `imprint daemon run` detached from this terminal (its own
/// session, output appended to the log file) and waits for its socket.
/// `passphrase` reaches the daemon through its environment (readable only
/// by this user), the one way to hand it over without a terminal.
pub async fn start_in_background(
    paths: &Paths,
    args: &[String],
    passphrase: Option<&str>,
) -> Result<(), DaemonError> {
    let files = RuntimeFiles::new(paths);
    let log = log_file(paths);
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| DaemonError::Io { path, source }
    };
    if let Some(dir) = log.parent() {
        crate::paths::create_private_dir(dir).map_err(io(dir))?;
    }
    let mut options = std::fs::OpenOptions::new();
    options.create(true).append(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let out = options.open(&log).map_err(io(&log))?;
    let err = out.try_clone().map_err(io(&log))?;
    let exe = std::env::current_exe().map_err(io(Path::new("imprint")))?;
    let mut command = std::process::Command::new(exe);
    command
        .arg("daemon")
        .arg("run")
        .args(args)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err);
    if let Some(p) = passphrase {
        command.env("IMPRINT_PASSPHRASE", p);
    }
    #[cfg(unix)]
    {
        use std::os::unix::process::CommandExt;
        // SAFETY: setsid is async-signal-safe and touches no memory; it
        // detaches the daemon from the terminal's job control (Ctrl-C).
        unsafe {
            command.pre_exec(|| {
                libc::setsid();
                Ok(())
            });
        }
    }
    let mut child = command.spawn().map_err(io(&log))?;
    // Loading the model takes seconds; a profile behind a passphrase or a
    // broken model makes the daemon exit, which the log explains.
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline {
        if UnixStream::connect(&files.socket).await.is_ok() {
            return Ok(());
        }
        if let Ok(Some(status)) = child.try_wait() {
            let tail = std::fs::read_to_string(&log)
                .map(|t| {
                    let lines: Vec<&str> = t.lines().collect();
                    lines[lines.len().saturating_sub(8)..].join("\n")
                })
                .unwrap_or_default();
            return Err(DaemonError::Connect(format!(
                "the daemon exited ({status}) before it was ready. The end of {}:\n{tail}",
                log.display()
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(DaemonError::Connect(format!(
        "the daemon did not open {} within 120 s; see {}",
        files.socket.display(),
        log.display()
    )))
}
