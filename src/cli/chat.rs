//! A line-mode chat. The full-screen ratatui client will replace it as
//! `imprint chat`; this one stays useful over pipes and dumb terminals.

use std::io::{BufRead, Write};
use std::ops::ControlFlow;
use std::process::ExitCode;

use anyhow::Result;
use clap::Args;

use imprint::engine::{ChatMessage, GenerationParams, Sampling};

use super::App;

#[derive(Debug, Args)]
pub struct ChatArgs {
    /// A model name from `imprint model list`, or a path to a GGUF file.
    #[arg(long)]
    model: Option<String>,
    /// Answer with the base model, ignoring your edits.
    #[arg(long)]
    no_profile: bool,
    /// System prompt (default: [generation] system_prompt).
    #[arg(long)]
    system: Option<String>,
    /// Deterministic replies.
    #[arg(long)]
    greedy: bool,
}

pub fn run(app: &App, args: ChatArgs) -> Result<ExitCode> {
    let gen = &app.config.config.generation;
    let mut engine = super::load_engine(app, args.model.as_deref(), !args.no_profile)?;
    let system = ChatMessage::system(args.system.unwrap_or_else(|| gen.system_prompt.clone()));
    let mut messages = vec![system.clone()];
    let params = GenerationParams {
        max_tokens: gen.max_tokens,
        sampling: if args.greedy {
            Sampling::Greedy
        } else {
            Sampling::from_config(gen)
        },
    };
    let interactive = std::io::IsTerminal::is_terminal(&std::io::stdin());
    if interactive {
        eprintln!(
            "imprint chat on {} — /reset starts over, /exit or Ctrl-D quits.",
            engine.options().model_path.display()
        );
    }
    let stdin = std::io::stdin();
    let mut stdout = std::io::stdout();
    let mut line = String::new();
    loop {
        if interactive {
            eprint!("\n> ");
        }
        line.clear();
        if stdin.lock().read_line(&mut line)? == 0 {
            break;
        }
        let input = line.trim();
        match input {
            "" => continue,
            "/exit" | "/quit" => break,
            "/reset" => {
                messages.truncate(1);
                engine.reset();
                eprintln!("(conversation cleared)");
                continue;
            }
            _ => {}
        }
        messages.push(ChatMessage::user(input));
        let generation = engine.chat(&messages, &params, &mut |text| {
            let _ = stdout.write_all(text.as_bytes());
            let _ = stdout.flush();
            ControlFlow::Continue(())
        })?;
        println!();
        if generation.dropped_messages > 0 {
            eprintln!(
                "(the conversation outgrew the context: the oldest {} messages are no longer seen by the model)",
                generation.dropped_messages
            );
            messages.drain(1..1 + generation.dropped_messages);
        }
        messages.push(ChatMessage::assistant(generation.text));
    }
    Ok(ExitCode::SUCCESS)
}
