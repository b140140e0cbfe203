//! The retrieval baseline (`--method rag` of `eval upqa` and `eval
//! prefeval`): every preference the run states is embedded once with
//! llama.cpp (mean-pooled); each question then gets the top
//! [`RAG_TOP_K`] by dot product in its system prompt, the way a memory
//! layer such as mem0 feeds a model.

use crate::editor::EditorError;
use crate::engine::Engine;

/// Preferences retrieved per question.
pub const RAG_TOP_K: usize = 3;

/// The store: every stated preference of the run, with its embedding.
pub struct Retrieval {
    texts: Vec<String>,
    embeddings: Vec<Vec<f32>>,
}

impl Retrieval {
    pub fn new(engine: &Engine, texts: Vec<String>) -> Result<Self, EditorError> {
        let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
        let embeddings = engine.embed(&refs)?;
        Ok(Self { texts, embeddings })
    }

    pub fn system_prompt(
        &self,
        engine: &Engine,
        base: &str,
        question: &str,
    ) -> Result<String, EditorError> {
        let q = engine.embed(&[question])?.remove(0);
        let mut scored: Vec<(f32, usize)> = self
            .embeddings
            .iter()
            .enumerate()
            .map(|(i, e)| (e.iter().zip(&q).map(|(a, b)| a * b).sum::<f32>(), i))
            .collect();
        scored.sort_by(|a, b| b.0.total_cmp(&a.0));
        let known: Vec<String> = scored
            .iter()
            .take(RAG_TOP_K)
            .map(|&(_, i)| format!("- {}", self.texts[i]))
            .collect();
        Ok(format!(
            "{base}\nWhat you know about the user:\n{}",
            known.join("\n")
        ))
    }
}
