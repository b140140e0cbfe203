//! The inference engine: llama.cpp, the model, one context and the active
//! adapter.
//!
//! One `Engine` owns one model and one context. The context's KV cache holds
//! the tokens of the last conversation, so the next turn of the same
//! conversation only decodes what is new (prefix reuse). The cache is unified
//! across 64 sequences so that [`Engine::answer_all`] can decode many short
//! answers side by side; chat uses sequence 0 only. Attaching or removing
//! an adapter drops and rebuilds the context: llama.cpp needs `&mut` on the
//! model to load an adapter, and cached keys/values computed under other
//! weights must never be reused.

mod backend;
pub mod chat;
pub mod sampling;
pub mod utf8;

use std::num::NonZeroU32;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::{LlamaChatMessage, LlamaChatTemplate, LlamaLoraAdapter, LlamaModel};
use llama_cpp_2::token::LlamaToken;
use thiserror::Error;

pub use backend::init_logging;
pub use chat::{ChatMessage, Role};
pub use sampling::Sampling;

use crate::models::gguf::{inspect_gguf, GgufError, GgufSummary};

self_cell::self_cell!(
    /// The model and the context that borrows it, kept together so the engine
    /// can hold both; `into_owner` gives the model back when the context must
    /// be rebuilt.
    struct ModelAndContext {
        owner: LlamaModel,
        #[covariant]
        dependent: LlamaContext,
    }
);

#[derive(Debug, Error)]
pub enum EngineError {
    #[error(transparent)]
    Model(#[from] GgufError),
    #[error("llama.cpp refused the grammar: {0}")]
    Grammar(String),
    #[error("llama.cpp could not load {path}. Run with IMPRINT_LOG=debug to see llama.cpp's own messages.")]
    LoadFailed { path: PathBuf },
    #[error("llama.cpp could not create a context of {n_ctx} tokens: {message}. Lower [engine] context_size.")]
    Context { n_ctx: u32, message: String },
    #[error("the model has no chat template and none could be found: {0}")]
    Template(String),
    #[error("the conversation does not fit in the {n_ctx}-token context even after dropping older turns: the last message alone needs {needed} tokens. Shorten it or raise [engine] context_size.")]
    ContextOverflow { n_ctx: u32, needed: usize },
    #[error("llama.cpp failed to decode: {0}")]
    Decode(String),
    #[error("cannot load adapter {path}: {message}")]
    Adapter { path: PathBuf, message: String },
    #[error("empty prompt")]
    EmptyPrompt,
}

/// Everything needed to load a model.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    pub model_path: PathBuf,
    /// Layers to offload; llama.cpp clamps it to the model's layer count.
    pub n_gpu_layers: u32,
    /// CPU threads; 0 = the number of physical cores.
    pub threads: u32,
    pub context_size: u32,
    pub batch_size: u32,
}

impl EngineOptions {
    pub fn new(model_path: impl Into<PathBuf>) -> Self {
        Self {
            model_path: model_path.into(),
            n_gpu_layers: crate::config::GpuLayers::Auto.resolve(),
            threads: 0,
            context_size: 4096,
            batch_size: 512,
        }
    }

    pub fn from_config(
        model_path: impl Into<PathBuf>,
        engine: &crate::config::EngineConfig,
    ) -> Self {
        Self {
            model_path: model_path.into(),
            n_gpu_layers: engine.n_gpu_layers.resolve(),
            threads: engine.threads,
            context_size: engine.context_size,
            batch_size: engine.batch_size,
        }
    }

    pub fn resolved_threads(&self) -> u32 {
        if self.threads == 0 {
            num_cpus::get_physical().max(1) as u32
        } else {
            self.threads
        }
    }
}

/// What to generate.
#[derive(Debug, Clone)]
pub struct GenerationParams {
    pub max_tokens: u32,
    pub sampling: Sampling,
    /// A GBNF grammar (root rule `root`) the reply must follow, e.g. the
    /// extractor's JSON shape. None: free text.
    pub grammar: Option<String>,
}

impl GenerationParams {
    pub fn greedy(max_tokens: u32) -> Self {
        Self {
            max_tokens,
            sampling: Sampling::Greedy,
            grammar: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// The model ended its turn.
    EndOfGeneration,
    MaxTokens,
    /// The context window is full.
    ContextFull,
    /// The caller's callback asked to stop.
    Cancelled,
}

/// The result of one generation.
#[derive(Debug, Clone)]
pub struct Generation {
    pub text: String,
    pub tokens: Vec<i32>,
    pub stop: StopReason,
    pub prompt_tokens: usize,
    /// Prompt tokens whose keys/values were already in the cache.
    pub reused_tokens: usize,
    /// Older messages removed so the conversation fits the context.
    pub dropped_messages: usize,
    pub prompt_time: Duration,
    pub generation_time: Duration,
}

/// An adapter attached to the engine.
struct Attached {
    path: PathBuf,
    adapter: LlamaLoraAdapter,
}

pub struct Engine {
    // `state` is an Option only so it can be taken apart and rebuilt; it is
    // always Some between calls.
    state: Option<ModelAndContext>,
    adapter: Option<Attached>,
    options: EngineOptions,
    summary: GgufSummary,
    template: LlamaChatTemplate,
    /// Tokens whose keys/values sit in the KV cache, sequence 0, in order.
    cached: Vec<LlamaToken>,
}

impl Engine {
    /// Validates the file, loads it into llama.cpp and creates a context.
    pub fn load(options: EngineOptions) -> Result<Self, EngineError> {
        let summary = inspect_gguf(&options.model_path)?;
        let backend = backend::get();
        let params = LlamaModelParams::default().with_n_gpu_layers(options.n_gpu_layers);
        let model =
            LlamaModel::load_from_file(backend, &options.model_path, &params).map_err(|_| {
                EngineError::LoadFailed {
                    path: options.model_path.clone(),
                }
            })?;
        let template = model
            .chat_template(None)
            .or_else(|_| LlamaChatTemplate::new("chatml"))
            .map_err(|e| EngineError::Template(e.to_string()))?;
        let state = build_context(model, &options, None)?;
        Ok(Self {
            state: Some(state),
            adapter: None,
            options,
            summary,
            template,
            cached: Vec::new(),
        })
    }

    pub fn options(&self) -> &EngineOptions {
        &self.options
    }

    pub fn summary(&self) -> &GgufSummary {
        &self.summary
    }

    pub fn adapter_path(&self) -> Option<&Path> {
        self.adapter.as_ref().map(|a| a.path.as_path())
    }

    fn state(&self) -> &ModelAndContext {
        self.state
            .as_ref()
            .expect("engine state is rebuilt before every return")
    }

    fn state_mut(&mut self) -> &mut ModelAndContext {
        self.state
            .as_mut()
            .expect("engine state is rebuilt before every return")
    }

    pub fn n_ctx(&self) -> u32 {
        self.state().borrow_dependent().n_ctx()
    }

    pub fn n_vocab(&self) -> i32 {
        self.state().borrow_owner().n_vocab()
    }

    /// Attaches the adapter at `path` (replacing any other), or with `None`
    /// returns to the base weights. The context is rebuilt, so the next call
    /// decodes its prompt from scratch.
    pub fn set_adapter(&mut self, path: Option<&Path>) -> Result<(), EngineError> {
        let state = self.state.take().expect("engine state present");
        // Dropping the context first: llama.cpp needs the model exclusively
        // while it loads an adapter.
        let mut model = state.into_owner();
        self.cached.clear();
        let loaded = match path {
            None => Ok(None),
            Some(path) => model
                .lora_adapter_init(path)
                .map(|adapter| {
                    Some(Attached {
                        path: path.to_path_buf(),
                        adapter,
                    })
                })
                .map_err(|e| EngineError::Adapter {
                    path: path.to_path_buf(),
                    message: format!(
                        "{e}; llama.cpp rejected it (wrong model, or not a LoRA GGUF)"
                    ),
                }),
        };
        // Whatever happened, the engine must come back usable: on a failed
        // load keep the previous adapter.
        let result = match loaded {
            Ok(new) => {
                self.adapter = new;
                Ok(())
            }
            Err(e) => Err(e),
        };
        let state = build_context(model, &self.options, self.adapter.as_mut())?;
        self.state = Some(state);
        result
    }

    /// Forgets the cached conversation; the next call decodes everything.
    pub fn reset(&mut self) {
        self.cached.clear();
        self.state_mut()
            .with_dependent_mut(|_, ctx| ctx.clear_kv_cache());
    }

    /// Renders messages with the model's chat template, ending with the
    /// assistant's opening tag.
    pub fn render(&self, messages: &[ChatMessage]) -> Result<String, EngineError> {
        let chat: Vec<LlamaChatMessage> = messages
            .iter()
            .map(|m| LlamaChatMessage::new(m.role.as_str().to_string(), m.content.clone()))
            .collect::<Result<_, _>>()
            .map_err(|e| EngineError::Template(e.to_string()))?;
        self.state()
            .borrow_owner()
            .apply_chat_template(&self.template, &chat, true)
            .map_err(|e| EngineError::Template(e.to_string()))
    }

    /// Tokenizes text that may contain special tokens (a rendered template).
    pub fn tokenize(&self, text: &str) -> Vec<LlamaToken> {
        let vocab = self.state().borrow_owner().vocab();
        let mut tokens = vocab.tokenize(text.as_bytes(), true, true);
        // Templates that spell out BOS themselves would otherwise get two.
        if tokens.len() >= 2 && tokens[0] == vocab.bos() && tokens[1] == vocab.bos() {
            tokens.remove(0);
        }
        tokens
    }

    /// Tokenizes plain text with no BOS and no special-token parsing (used
    /// for answer targets).
    pub fn tokenize_plain(&self, text: &str) -> Vec<i32> {
        let vocab = self.state().borrow_owner().vocab();
        vocab
            .tokenize(text.as_bytes(), false, false)
            .into_iter()
            .map(|t| t.0)
            .collect()
    }

    /// The token that ends an assistant turn (`<|im_end|>` for ChatML).
    pub fn end_of_turn_token(&self) -> i32 {
        let vocab = self.state().borrow_owner().vocab();
        let eot = vocab.eot();
        if eot.0 >= 0 {
            eot.0
        } else {
            vocab.eos().0
        }
    }

    pub fn token_text(&self, token: i32) -> String {
        let vocab = self.state().borrow_owner().vocab();
        String::from_utf8_lossy(&vocab.token_to_piece(LlamaToken(token), true, None)).into_owned()
    }

    /// The raw bytes of each token, exactly as streaming sees them.
    pub fn token_pieces(&self, tokens: &[i32]) -> Vec<Vec<u8>> {
        let vocab = self.state().borrow_owner().vocab();
        tokens
            .iter()
            .map(|&t| vocab.token_to_piece(LlamaToken(t), false, None))
            .collect()
    }

    /// Answers the conversation's last user message. Older turns are dropped
    /// when the conversation outgrows the context; the result says how many.
    pub fn chat(
        &mut self,
        messages: &[ChatMessage],
        params: &GenerationParams,
        on_text: &mut dyn FnMut(&str) -> ControlFlow<()>,
    ) -> Result<Generation, EngineError> {
        let n_ctx = self.n_ctx() as usize;
        // Room kept free for the reply; the reply may still run until the
        // context is full.
        let reserve = (params.max_tokens as usize).min(n_ctx / 4);
        let mut kept = messages.to_vec();
        let mut dropped = 0;
        let prompt = loop {
            let prompt = self.tokenize(&self.render(&kept)?);
            if prompt.len() + reserve <= n_ctx {
                break prompt;
            }
            match chat::drop_oldest_turn(&mut kept) {
                0 => {
                    return Err(EngineError::ContextOverflow {
                        n_ctx: n_ctx as u32,
                        needed: prompt.len() + reserve,
                    })
                }
                n => dropped += n,
            }
        };
        if dropped > 0 {
            tracing::info!(
                dropped,
                "conversation outgrew the context; dropped older messages"
            );
        }
        let mut generation = self.generate(&prompt, params, on_text)?;
        generation.dropped_messages = dropped;
        Ok(generation)
    }

    /// Continues `prompt` (already tokenized), reusing the cached prefix.
    pub fn generate(
        &mut self,
        prompt: &[LlamaToken],
        params: &GenerationParams,
        on_text: &mut dyn FnMut(&str) -> ControlFlow<()>,
    ) -> Result<Generation, EngineError> {
        if prompt.is_empty() {
            return Err(EngineError::EmptyPrompt);
        }
        let n_ctx = self.n_ctx() as usize;
        if prompt.len() >= n_ctx {
            return Err(EngineError::ContextOverflow {
                n_ctx: n_ctx as u32,
                needed: prompt.len(),
            });
        }
        let start = Instant::now();
        let reused = self.prefill(prompt)?;
        let prompt_time = start.elapsed();

        let n_vocab = self.n_vocab();
        let mut sampler = match &params.grammar {
            None => params.sampling.build(n_vocab),
            Some(grammar) => {
                let state = self.state();
                let constrained = llama_cpp_2::sampling::LlamaSampler::grammar(
                    state.borrow_owner(),
                    grammar,
                    "root",
                )
                .map_err(|e| EngineError::Grammar(e.to_string()))?;
                llama_cpp_2::sampling::LlamaSampler::chain_simple([
                    constrained,
                    params.sampling.build(n_vocab),
                ])
            }
        };
        let mut stream = utf8::Utf8Stream::default();
        let mut text = String::new();
        let mut tokens = Vec::new();
        let mut stop = StopReason::MaxTokens;
        let gen_start = Instant::now();
        while tokens.len() < params.max_tokens as usize {
            let (token, is_eog, piece) = {
                let state = self.state();
                let ctx = state.borrow_dependent();
                // -1: the logits of the last decoded token.
                let token = sampler.sample(ctx, -1);
                let vocab = state.borrow_owner().vocab();
                let is_eog = vocab.is_eog(token);
                let piece = if is_eog {
                    Vec::new()
                } else {
                    vocab.token_to_piece(token, false, None)
                };
                (token, is_eog, piece)
            };
            if is_eog {
                stop = StopReason::EndOfGeneration;
                break;
            }
            tokens.push(token.0);
            let chunk = stream.push(&piece);
            text.push_str(&chunk);
            if !chunk.is_empty() && on_text(&chunk).is_break() {
                stop = StopReason::Cancelled;
                break;
            }
            if tokens.len() >= params.max_tokens as usize {
                break;
            }
            if self.cached.len() + 1 >= n_ctx {
                stop = StopReason::ContextFull;
                break;
            }
            self.decode_tokens(&[token])?;
        }
        let tail = stream.finish();
        if !tail.is_empty() {
            text.push_str(&tail);
            // The reply is over either way; a cancel here changes nothing.
            let _ = on_text(&tail);
        }
        Ok(Generation {
            text,
            tokens,
            stop,
            prompt_tokens: prompt.len(),
            reused_tokens: reused,
            dropped_messages: 0,
            prompt_time,
            generation_time: gen_start.elapsed(),
        })
    }

    /// Makes the KV cache hold exactly `prompt`, decoding only the part after
    /// the longest prefix already cached. At least the last token is always
    /// decoded so its logits are fresh. Returns the number of reused tokens.
    fn prefill(&mut self, prompt: &[LlamaToken]) -> Result<usize, EngineError> {
        let mut common = self
            .cached
            .iter()
            .zip(prompt)
            .take_while(|(a, b)| a == b)
            .count();
        if common == prompt.len() {
            common -= 1;
        }
        if common < self.cached.len() {
            let removed = self.state_mut().with_dependent_mut(|_, ctx| {
                ctx.clear_kv_cache_seq(Some(0), Some(common as u32), None)
            });
            if !matches!(removed, Ok(true)) {
                // Some cache layouts cannot drop a tail; start over instead.
                self.reset();
                common = 0;
            }
            self.cached.truncate(common);
        }
        self.decode_tokens(&prompt[common..])?;
        Ok(common)
    }

    /// Decodes `tokens` after the cached ones, in batches, asking for the
    /// logits of the final token only (read back with index -1).
    fn decode_tokens(&mut self, tokens: &[LlamaToken]) -> Result<(), EngineError> {
        let batch_size = self.options.batch_size.max(1) as usize;
        let mut pos = self.cached.len();
        let n_chunks = tokens.len().div_ceil(batch_size);
        for (chunk_index, chunk) in tokens.chunks(batch_size).enumerate() {
            let mut batch = LlamaBatch::new(chunk.len(), 1);
            for (i, &token) in chunk.iter().enumerate() {
                let final_token = chunk_index + 1 == n_chunks && i + 1 == chunk.len();
                batch
                    .add(token, pos as i32, &[0], final_token)
                    .map_err(|e| EngineError::Decode(e.to_string()))?;
                pos += 1;
            }
            self.state_mut()
                .with_dependent_mut(|_, ctx| ctx.decode(&mut batch))
                .map_err(|e| EngineError::Decode(e.to_string()))?;
            self.cached.extend_from_slice(chunk);
        }
        Ok(())
    }

    /// One llama-bench style measurement: `n_prompt` tokens in batches
    /// (pp), then, from an empty cache, `n_gen` single-token decodes (tg).
    /// Returns both durations.
    pub fn bench_run(
        &mut self,
        n_prompt: usize,
        n_gen: usize,
    ) -> Result<(Duration, Duration), EngineError> {
        self.reset();
        let n_vocab = self.n_vocab().max(1);
        // Arbitrary but fixed token ids: throughput does not depend on them.
        let prompt: Vec<LlamaToken> = (0..n_prompt.max(1))
            .map(|i| LlamaToken(((i * 7919 + 13) % n_vocab as usize) as i32))
            .collect();
        let start = Instant::now();
        self.decode_tokens(&prompt)?;
        let prompt_time = start.elapsed();
        // Like llama-bench, generation is timed on its own, from an empty
        // cache: attention over the prompt's keys would otherwise slow it.
        self.reset();
        let start = Instant::now();
        for i in 0..n_gen {
            if self.cached.len() + 1 >= self.n_ctx() as usize {
                break;
            }
            self.decode_tokens(&[LlamaToken(((i * 104_729 + 7) % n_vocab as usize) as i32)])?;
        }
        let gen_time = start.elapsed();
        self.reset();
        Ok((prompt_time, gen_time))
    }

    /// Greedy answers (tokens, end-of-turn excluded, at most `max_tokens`
    /// each) to several conversations, decoded side by side: each is its own
    /// sequence in the KV cache and every decode call advances all of them,
    /// so N short answers cost about the decode steps of one. The shared
    /// prefix (the system prompt) is decoded once for all. Each answer is
    /// greedy, as [`Engine::chat`] with greedy sampling would give it alone,
    /// up to near-ties: side by side the kernels add in another order, so
    /// two tokens within rounding of each other may swap (tested). The
    /// cached conversation is forgotten.
    pub fn answer_all(
        &mut self,
        conversations: &[Vec<ChatMessage>],
        max_tokens: u32,
    ) -> Result<Vec<Vec<i32>>, EngineError> {
        let prompts = conversations
            .iter()
            .map(|c| Ok(self.tokenize(&self.render(c)?)))
            .collect::<Result<Vec<_>, EngineError>>()?;
        let n_ctx = self.n_ctx() as usize;
        let mut out = Vec::with_capacity(prompts.len());
        let mut start = 0;
        while start < prompts.len() {
            // As many as fit in the cache together (counting shared
            // prefixes once per sequence, to be safe).
            let mut end = start;
            let mut cells = 0;
            while end < prompts.len() && end - start < PARALLEL_SEQUENCES as usize {
                let need = prompts[end].len() + max_tokens as usize;
                if prompts[end].is_empty() {
                    return Err(EngineError::EmptyPrompt);
                }
                if need >= n_ctx {
                    return Err(EngineError::ContextOverflow {
                        n_ctx: n_ctx as u32,
                        needed: need,
                    });
                }
                if cells + need > n_ctx {
                    break;
                }
                cells += need;
                end += 1;
            }
            out.extend(self.answer_group(&prompts[start..end], max_tokens)?);
            start = end;
        }
        Ok(out)
    }

    /// [`Engine::answer_all`] for prompts that fit in the cache together.
    fn answer_group(
        &mut self,
        prompts: &[Vec<LlamaToken>],
        max_tokens: u32,
    ) -> Result<Vec<Vec<i32>>, EngineError> {
        let n = prompts.len();
        self.reset();
        // Each prompt keeps at least its last token as its own: that
        // token's logits start its answer.
        let shortest = prompts.iter().map(Vec::len).min().unwrap_or(0);
        let shared = (0..shortest.saturating_sub(1))
            .take_while(|&i| prompts.iter().all(|p| p[i] == prompts[0][i]))
            .count();
        let everyone: Vec<i32> = (0..n as i32).collect();
        // (token, position, sequences, the sequence whose next token its
        // logits give)
        let mut work: Vec<(LlamaToken, i32, Vec<i32>, Option<usize>)> = Vec::new();
        for (pos, &token) in prompts[0][..shared].iter().enumerate() {
            work.push((token, pos as i32, everyone.clone(), None));
        }
        for (seq, prompt) in prompts.iter().enumerate() {
            for (pos, &token) in prompt.iter().enumerate().skip(shared) {
                let last = pos + 1 == prompt.len();
                work.push((token, pos as i32, vec![seq as i32], last.then_some(seq)));
            }
        }
        let mut next = vec![LlamaToken(0); n];
        self.decode_work(&work, &mut next)?;

        let mut answers: Vec<Vec<i32>> = vec![Vec::new(); n];
        let mut done = vec![max_tokens == 0; n];
        let mut positions: Vec<i32> = prompts.iter().map(|p| p.len() as i32).collect();
        loop {
            let mut step = Vec::new();
            for seq in 0..n {
                if done[seq] {
                    continue;
                }
                let token = next[seq];
                if self.state().borrow_owner().vocab().is_eog(token) {
                    done[seq] = true;
                    continue;
                }
                answers[seq].push(token.0);
                if answers[seq].len() >= max_tokens as usize {
                    done[seq] = true;
                    continue;
                }
                step.push((token, positions[seq], vec![seq as i32], Some(seq)));
                positions[seq] += 1;
            }
            if step.is_empty() {
                break;
            }
            self.decode_work(&step, &mut next)?;
        }
        self.reset();
        Ok(answers)
    }

    /// Decodes `work` in batches; for each entry that names a sequence,
    /// stores the greedy next token from its logits in `next`.
    fn decode_work(
        &mut self,
        work: &[(LlamaToken, i32, Vec<i32>, Option<usize>)],
        next: &mut [LlamaToken],
    ) -> Result<(), EngineError> {
        let batch_size = self.options.batch_size.max(1) as usize;
        let n_seq = next.len() as i32;
        for chunk in work.chunks(batch_size) {
            let mut batch = LlamaBatch::new(chunk.len(), n_seq);
            for (token, pos, seqs, wants) in chunk {
                batch
                    .add(*token, *pos, seqs, wants.is_some())
                    .map_err(|e| EngineError::Decode(e.to_string()))?;
            }
            let picked = self.state_mut().with_dependent_mut(|_, ctx| {
                ctx.decode(&mut batch)
                    .map_err(|e| EngineError::Decode(e.to_string()))?;
                Ok::<_, EngineError>(
                    chunk
                        .iter()
                        .enumerate()
                        .filter_map(|(i, (_, _, _, wants))| {
                            wants.map(|seq| (seq, argmax(ctx.get_logits_ith(i as i32))))
                        })
                        .collect::<Vec<_>>(),
                )
            })?;
            for (seq, token) in picked {
                next[seq] = token;
            }
        }
        Ok(())
    }

    /// Mean-pooled, L2-normalised embeddings of `texts` from the base model
    /// (a separate, short-lived context: the chat context and any adapter
    /// are untouched). Used by the retrieval baseline.
    pub fn embed(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>, EngineError> {
        use llama_cpp_2::context::params::LlamaPoolingType;
        const MAX_TOKENS: usize = 512;
        let threads = self.options.resolved_threads() as i32;
        let params = LlamaContextParams::default()
            .with_n_ctx(NonZeroU32::new(MAX_TOKENS as u32))
            .with_n_batch(MAX_TOKENS as u32)
            .with_n_ubatch(MAX_TOKENS as u32)
            .with_n_threads(threads)
            .with_n_threads_batch(threads)
            .with_embeddings(true)
            .with_pooling_type(LlamaPoolingType::Mean);
        let model = self.state().borrow_owner();
        let mut ctx =
            model
                .new_context(backend::get(), params)
                .map_err(|e| EngineError::Context {
                    n_ctx: MAX_TOKENS as u32,
                    message: e.to_string(),
                })?;
        let mut out = Vec::with_capacity(texts.len());
        for text in texts {
            let mut tokens = model.vocab().tokenize(text.as_bytes(), true, false);
            tokens.truncate(MAX_TOKENS);
            if tokens.is_empty() {
                return Err(EngineError::EmptyPrompt);
            }
            ctx.clear_kv_cache();
            let mut batch = LlamaBatch::new(tokens.len(), 1);
            batch
                .add_sequence(&tokens, 0, false)
                .map_err(|e| EngineError::Decode(e.to_string()))?;
            ctx.decode(&mut batch)
                .map_err(|e| EngineError::Decode(e.to_string()))?;
            let embedding = ctx
                .embeddings_seq_ith(0)
                .map_err(|e| EngineError::Decode(e.to_string()))?;
            let norm = embedding
                .iter()
                .map(|v| v * v)
                .sum::<f32>()
                .sqrt()
                .max(1e-12);
            out.push(embedding.iter().map(|v| v / norm).collect());
        }
        Ok(out)
    }

    /// Full-vocabulary logits at every position of `tokens`, decoded from an
    /// empty cache. Used to compare runtimes (parity) and adapters.
    pub fn logits_all(&mut self, tokens: &[i32]) -> Result<Vec<Vec<f32>>, EngineError> {
        if tokens.is_empty() {
            return Err(EngineError::EmptyPrompt);
        }
        self.reset();
        let n_vocab = self.n_vocab() as usize;
        let mut out = Vec::with_capacity(tokens.len());
        let batch_size = self.options.batch_size.max(1) as usize;
        for chunk in tokens.chunks(batch_size) {
            let mut batch = LlamaBatch::new(chunk.len(), 1);
            for (pos, &token) in (self.cached.len()..).zip(chunk) {
                batch
                    .add(LlamaToken(token), pos as i32, &[0], true)
                    .map_err(|e| EngineError::Decode(e.to_string()))?;
            }
            let logits = self.state_mut().with_dependent_mut(|_, ctx| {
                ctx.decode(&mut batch)
                    .map_err(|e| EngineError::Decode(e.to_string()))?;
                Ok::<_, EngineError>(
                    (0..chunk.len())
                        .map(|i| ctx.get_logits_ith(i as i32)[..n_vocab].to_vec())
                        .collect::<Vec<_>>(),
                )
            })?;
            out.extend(logits);
            self.cached.extend(chunk.iter().map(|&t| LlamaToken(t)));
        }
        Ok(out)
    }
}

/// The first most likely token (greedy sampling's choice).
fn argmax(logits: &[f32]) -> LlamaToken {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    LlamaToken(best as i32)
}

/// How many conversations [`Engine::answer_all`] decodes side by side. The
/// cache is unified (every sequence may use every cell), so this costs no
/// context length.
const PARALLEL_SEQUENCES: u32 = 64;

fn build_context(
    model: LlamaModel,
    options: &EngineOptions,
    adapter: Option<&mut Attached>,
) -> Result<ModelAndContext, EngineError> {
    let threads = options.resolved_threads() as i32;
    let n_ctx = options.context_size.max(64);
    let params = LlamaContextParams::default()
        .with_n_ctx(NonZeroU32::new(n_ctx))
        .with_n_batch(options.batch_size.max(1))
        .with_n_ubatch(options.batch_size.max(1))
        .with_n_threads(threads)
        .with_n_threads_batch(threads)
        .with_n_seq_max(PARALLEL_SEQUENCES)
        .with_kv_unified(true);
    let backend = backend::get();
    let mut state = ModelAndContext::try_new(model, |model| model.new_context(backend, params))
        .map_err(|e| EngineError::Context {
            n_ctx,
            message: e.to_string(),
        })?;
    if let Some(attached) = adapter {
        state
            .with_dependent_mut(|_, ctx| ctx.lora_adapter_set(&mut attached.adapter, 1.0))
            .map_err(|e| EngineError::Adapter {
                path: attached.path.clone(),
                message: e.to_string(),
            })?;
    }
    Ok(state)
}
