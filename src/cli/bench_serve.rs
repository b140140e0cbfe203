//! `imprint bench serve`: what the socket costs. The same greedy requests
//! are answered in this process (llama.cpp called directly) and through the
//! daemon's socket, with 1 client and with N concurrent clients, and the
//! time to first token and the generation speed are compared.
//!
//! Both sides run the base weights (`personalized: false`, incognito
//! sessions), the same prompts in the same order, and the same prefix
//! reuse, so the difference is the daemon: framing, the queue hop to the
//! inference thread, and the socket. With N clients both sides serve the
//! requests one after another (one context), so a client's time to first
//! token includes waiting for the ones before it, in both columns.

use std::ops::ControlFlow;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde::Serialize;
use serde_json::json;

use imprint::bench::Summary;
use imprint::daemon::client::{Client, SendOptions};
use imprint::engine::{ChatMessage, GenerationParams};

use super::App;

#[derive(Debug, clap::Args)]
pub struct ServeBenchArgs {
    /// Timed rounds (after one warm-up round).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Tokens generated per request.
    #[arg(long, default_value_t = 64)]
    tokens: u32,
    /// Concurrent clients of the second scenario.
    #[arg(long, default_value_t = 8)]
    clients: usize,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

/// One request's timings.
#[derive(Debug, Clone, Copy)]
struct Timing {
    first_token_ms: f64,
    tokens: usize,
    /// Generation speed after the first token.
    tokens_per_s: f64,
}

#[derive(Debug, Serialize)]
struct Side {
    first_token_ms: Summary,
    tokens_per_s: Summary,
    /// All tokens of a round / the round's wall time.
    aggregate_tokens_per_s: Summary,
}

#[derive(Debug, Serialize)]
struct Scenario {
    clients: usize,
    in_process: Side,
    socket: Side,
    /// socket / in-process, medians.
    tokens_per_s_ratio: f64,
    first_token_overhead_ms: f64,
}

#[derive(Debug, Serialize)]
struct Report {
    model: String,
    threads: u32,
    n_gpu_layers: u32,
    tokens: u32,
    runs: usize,
    scenarios: Vec<Scenario>,
}

fn prompt(round: usize, client: usize) -> String {
    format!(
        "Request {round}.{client}: write a short paragraph about the sea, the wind and the boats."
    )
}

fn side(rounds: &[(Vec<Timing>, f64)]) -> Side {
    let all: Vec<Timing> = rounds.iter().flat_map(|(t, _)| t.clone()).collect();
    Side {
        first_token_ms: Summary::of(&all.iter().map(|t| t.first_token_ms).collect::<Vec<_>>()),
        tokens_per_s: Summary::of(&all.iter().map(|t| t.tokens_per_s).collect::<Vec<_>>()),
        aggregate_tokens_per_s: Summary::of(
            &rounds
                .iter()
                .map(|(t, wall)| t.iter().map(|x| x.tokens).sum::<usize>() as f64 / wall)
                .collect::<Vec<_>>(),
        ),
    }
}

pub fn run(app: &App, args: ServeBenchArgs) -> Result<ExitCode> {
    if args.runs == 0 || args.clients == 0 {
        bail!("--runs and --clients must be at least 1");
    }
    let system = app.config.config.generation.system_prompt.clone();
    let params = GenerationParams::greedy(args.tokens);

    // One runtime for the whole run: a client's socket belongs to the
    // runtime that opened it.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    // The daemon: the one running, or one started for the benchmark.
    let started_here = rt.block_on(Client::connect(&app.paths)).is_err();
    let spinner = app.spinner("starting the daemon");
    let mut client = rt.block_on(Client::connect_or_start(
        &app.paths,
        &[],
        super::daemon::unlock_for_daemon(app)?
            .as_deref()
            .map(String::as_str),
    ))?;
    spinner.finish_and_clear();
    let status = rt.block_on(client.call("status", json!({})))?;
    let model_path = status["model"]["path"]
        .as_str()
        .context("the daemon did not say which model it serves")?
        .to_string();
    if status["worker"]["state"] == "editing" {
        eprintln!(
            "warning: the daemon is computing an edit; its numbers will be slower than usual"
        );
    }
    let mut engine = super::load_engine(app, Some(&model_path), false)?;

    let scenarios_wanted: Vec<usize> = if args.clients == 1 {
        vec![1]
    } else {
        vec![1, args.clients]
    };
    let total = (args.runs + 1) * scenarios_wanted.iter().sum::<usize>() * 2;
    let bar = app.progress(total as u64, "requests");
    let mut scenarios = Vec::new();
    for &clients in &scenarios_wanted {
        let mut local_rounds = Vec::new();
        let mut socket_rounds = Vec::new();
        for round in 0..=args.runs {
            // In process: the requests arrive together and are served in
            // turn, as the daemon serves them.
            let arrived = Instant::now();
            let mut timings = Vec::new();
            for c in 0..clients {
                let messages = vec![
                    ChatMessage::system(system.clone()),
                    ChatMessage::user(prompt(round, c)),
                ];
                let mut first = None;
                let generation = engine.chat(&messages, &params, &mut |_| {
                    first.get_or_insert_with(Instant::now);
                    ControlFlow::Continue(())
                })?;
                let first = first.unwrap_or_else(Instant::now);
                let after_first = first.elapsed().as_secs_f64();
                timings.push(Timing {
                    first_token_ms: (first - arrived).as_secs_f64() * 1000.0,
                    tokens: generation.tokens.len(),
                    tokens_per_s: generation.tokens.len().saturating_sub(1) as f64
                        / after_first.max(1e-9),
                });
                bar.inc(1);
            }
            let wall = arrived.elapsed().as_secs_f64();
            if round > 0 {
                local_rounds.push((timings, wall));
            }

            // Through the socket: `clients` connections at once.
            let paths = app.paths.clone();
            let (timings, wall) = rt.block_on(async move {
                // Connections and sessions are made first; the clock starts
                // when every client is ready to send, as in process.
                let ready = std::sync::Arc::new(tokio::sync::Barrier::new(clients + 1));
                let mut tasks = Vec::new();
                for c in 0..clients {
                    let paths = paths.clone();
                    let ready = ready.clone();
                    tasks.push(tokio::spawn(async move {
                        let mut client = Client::connect(&paths).await?;
                        let session = client
                            .call("session.create", json!({ "incognito": true }))
                            .await?;
                        let id = session["id"].as_i64().unwrap_or(-1);
                        ready.wait().await;
                        let mut first = None;
                        let reply = client
                            .send(
                                id,
                                &prompt(round, c),
                                &SendOptions {
                                    unpersonalized: true,
                                    max_tokens: Some(args.tokens),
                                    greedy: true,
                                },
                                |_| {
                                    first.get_or_insert_with(Instant::now);
                                },
                            )
                            .await?;
                        let first = first.unwrap_or_else(Instant::now);
                        let done = Instant::now();
                        let _ = client.call("session.delete", json!({ "id": id })).await;
                        Ok::<_, imprint::daemon::DaemonError>((first, done, reply.tokens))
                    }));
                }
                ready.wait().await;
                let arrived = Instant::now();
                let mut timings = Vec::new();
                let mut last = arrived;
                for t in tasks {
                    let (first, done, tokens) = t.await.map_err(|e| anyhow::anyhow!("{e}"))??;
                    last = last.max(done);
                    timings.push(Timing {
                        first_token_ms: (first - arrived).as_secs_f64() * 1000.0,
                        tokens,
                        tokens_per_s: tokens.saturating_sub(1) as f64
                            / (done - first).as_secs_f64().max(1e-9),
                    });
                }
                Ok::<_, anyhow::Error>((timings, (last - arrived).as_secs_f64()))
            })?;
            bar.inc(clients as u64);
            if round > 0 {
                socket_rounds.push((timings, wall));
            }
        }
        let in_process = side(&local_rounds);
        let socket = side(&socket_rounds);
        scenarios.push(Scenario {
            clients,
            tokens_per_s_ratio: socket.aggregate_tokens_per_s.median
                / in_process.aggregate_tokens_per_s.median,
            first_token_overhead_ms: socket.first_token_ms.median
                - in_process.first_token_ms.median,
            in_process,
            socket,
        });
    }
    bar.finish_and_clear();
    if started_here {
        let _ = rt.block_on(client.call("shutdown", json!({})));
    }
    let report = Report {
        model: model_path,
        threads: engine.options().resolved_threads(),
        n_gpu_layers: engine.options().n_gpu_layers,
        tokens: args.tokens,
        runs: args.runs,
        scenarios,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{} — {} threads, {} GPU layers, {} tokens per request, {} rounds (medians)",
        report.model, report.threads, report.n_gpu_layers, report.tokens, report.runs
    );
    println!(
        "{:>7}  {:>16} {:>16} {:>9}   {:>14} {:>14} {:>9}",
        "clients",
        "in-process tok/s",
        "socket tok/s",
        "ratio",
        "in-proc TTFT",
        "socket TTFT",
        "overhead"
    );
    for s in &report.scenarios {
        println!(
            "{:>7}  {:>16.1} {:>16.1} {:>8.3}×   {:>11.1} ms {:>11.1} ms {:>+6.1} ms",
            s.clients,
            s.in_process.aggregate_tokens_per_s.median,
            s.socket.aggregate_tokens_per_s.median,
            s.tokens_per_s_ratio,
            s.in_process.first_token_ms.median,
            s.socket.first_token_ms.median,
            s.first_token_overhead_ms
        );
    }
    Ok(ExitCode::SUCCESS)
}
