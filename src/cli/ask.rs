use std::io::Write;
use std::ops::ControlFlow;
use std::process::ExitCode;

use anyhow::Result;
use clap::Args;

use imprint::engine::{ChatMessage, GenerationParams, Sampling};

use super::App;

#[derive(Debug, Args)]
pub struct AskArgs {
    /// The question.
    question: String,
    /// System prompt (default: [generation] system_prompt).
    #[arg(long)]
    system: Option<String>,
    /// Stop after this many tokens (default: [generation] max_tokens).
    #[arg(long)]
    max_tokens: Option<u32>,
    /// Always take the most likely token: the same question gives the same answer.
    #[arg(long)]
    greedy: bool,
    /// A model name from `imprint model list`, or a path to a GGUF file.
    #[arg(long)]
    model: Option<String>,
    /// Answer with the base model, ignoring your edits.
    #[arg(long)]
    no_profile: bool,
}

pub fn run(app: &App, args: AskArgs) -> Result<ExitCode> {
    let gen = &app.config.config.generation;
    let mut engine = super::load_engine(app, args.model.as_deref(), !args.no_profile)?;
    let messages = vec![
        ChatMessage::system(args.system.unwrap_or_else(|| gen.system_prompt.clone())),
        ChatMessage::user(args.question),
    ];
    let params = GenerationParams {
        max_tokens: args.max_tokens.unwrap_or(gen.max_tokens),
        sampling: if args.greedy {
            Sampling::Greedy
        } else {
            Sampling::from_config(gen)
        },
        grammar: None,
    };
    let mut stdout = std::io::stdout().lock();
    let mut write_failed = None;
    engine.chat(&messages, &params, &mut |text| {
        // A closed pipe (`imprint ask … | head`) ends generation quietly.
        match stdout
            .write_all(text.as_bytes())
            .and_then(|()| stdout.flush())
        {
            Ok(()) => ControlFlow::Continue(()),
            Err(e) => {
                write_failed = Some(e);
                ControlFlow::Break(())
            }
        }
    })?;
    if write_failed.is_none() {
        let _ = writeln!(stdout);
    }
    Ok(ExitCode::SUCCESS)
}
