//! Evaluation: does an edited model answer like its user?
//!
//! - [`upqa_data`]: reading the UPQA benchmark files in place.
//! - [`scoring`]: the strict substring rule and token F1.
//! - [`upqa`]: `imprint eval upqa`, edits (or baselines) then questions.
//! - [`locality`]: unrelated answers, general knowledge and perplexity,
//!   before and after edits.

pub mod locality;
pub mod scoring;
pub mod upqa;
pub mod upqa_data;
