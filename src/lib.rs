//! imprint: a private assistant that learns its user by editing its own
//! weights.
//!
//! The code follows the data flow (see `docs/ARCHITECTURE.md`):
//! chat → capture → cluster → edit → adapter → chat.
//!
//! - [`engine`]: llama.cpp inference, chat templates, streaming, adapters.
//! - [`editor`]: computing, verifying and assembling weight edits.
//! - [`learn`]: the learning step, preference → edit job → stored edit.
//! - [`eval`]: the UPQA benchmark harness.
//! - [`profile`]: the encrypted store of preferences, edits and history.
//! - [`models`]: fetching, validating and choosing GGUF models.
//! - [`config`] and [`paths`]: settings and where files live.
//! - [`bench`]: throughput measurements.

pub mod bench;
pub mod config;
pub mod daemon;
pub mod editor;
pub mod engine;
pub mod eval;
pub mod learn;
pub mod models;
pub mod paths;
pub mod profile;
pub mod tui;
