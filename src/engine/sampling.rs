//! Turning generation settings into a llama.cpp sampler chain.

use llama_cpp_2::sampling::LlamaSampler;

use crate::config::GenerationConfig;

/// How the next token is chosen.
#[derive(Debug, Clone, PartialEq)]
pub enum Sampling {
    /// Always the most likely token: deterministic, used by eval and tests.
    Greedy,
    Random {
        temperature: f32,
        top_p: f32,
        min_p: f32,
        repeat_penalty: f32,
        repeat_last_n: i32,
        /// `None`: a fresh seed per reply.
        seed: Option<u32>,
    },
}

impl Sampling {
    pub fn from_config(config: &GenerationConfig) -> Self {
        Sampling::Random {
            temperature: config.temperature,
            top_p: config.top_p,
            min_p: config.min_p,
            repeat_penalty: config.repeat_penalty,
            repeat_last_n: config.repeat_last_n,
            seed: (config.seed != 0).then_some(config.seed),
        }
    }

    /// The chain follows llama.cpp's own order: penalties, then the
    /// truncations, then temperature, then the draw.
    pub(crate) fn build(&self, n_vocab: i32) -> LlamaSampler {
        match *self {
            Sampling::Greedy => LlamaSampler::greedy(),
            Sampling::Random {
                temperature,
                top_p,
                min_p,
                repeat_penalty,
                repeat_last_n,
                seed,
            } => {
                let seed = seed.unwrap_or_else(random_seed);
                LlamaSampler::chain_simple([
                    LlamaSampler::penalties(
                        n_vocab,
                        repeat_last_n.max(0),
                        repeat_penalty,
                        0.0,
                        0.0,
                    ),
                    LlamaSampler::top_p(top_p, 1),
                    LlamaSampler::min_p(min_p, 1),
                    LlamaSampler::temp(temperature),
                    LlamaSampler::dist(seed),
                ])
            }
        }
    }
}

fn random_seed() -> u32 {
    // Time-based is plenty for sampling diversity; nothing here is secret.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos() ^ (d.as_secs() as u32))
        .unwrap_or(0x5eed);
    nanos ^ std::process::id()
}
