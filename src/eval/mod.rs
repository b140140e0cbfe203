//! Evaluation: does an edited model answer like its user?
//!
//! - [`upqa_data`]: reading the UPQA benchmark files in place.
//! - [`scoring`]: the strict substring rule and token F1.
//! - [`upqa`]: `imprint eval upqa`, edits (or baselines) then questions.
//! - [`prefeval`]: `imprint eval prefeval`, acknowledgment after N distractor
//!   turns.
//! - [`extract`]: `imprint eval extract`, the preference extractors against
//!   UPQA sentences, PrefEval statements and written negatives.
//! - [`retrieval`]: the `rag` baseline's embedding store, shared by both.
//! - [`charts`]: PNG charts of the reports (accuracy by question type,
//!   acknowledgment vs turns).
//! - [`locality`]: unrelated answers, general knowledge and perplexity,
//!   before and after edits.

pub mod charts;
pub mod extract;
pub mod locality;
pub mod prefeval;
pub mod retrieval;
pub mod scoring;
pub mod upqa;
pub mod upqa_data;
