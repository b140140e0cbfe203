//! Shared test helpers. Tests run on the real default model; `make test`
//! fetches it and exports its path as IMPRINT_TEST_MODEL.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

/// The real model's path. Fails loudly (never skips) when it is missing.
pub fn model_path() -> PathBuf {
    let path = std::env::var_os("IMPRINT_TEST_MODEL")
        .map(PathBuf::from)
        .or_else(|| {
            imprint::paths::Paths::discover()
                .ok()
                .map(|p| p.models_dir().join("SmolLM2-135M-Instruct.Q4_1.gguf"))
        })
        .expect("no model path");
    assert!(
        path.is_file(),
        "the real model is missing at {}: run `make test` (it fetches it) or set IMPRINT_TEST_MODEL",
        path.display()
    );
    path
}

pub fn engine_with_ctx(n_ctx: u32) -> imprint::engine::Engine {
    let mut options = imprint::engine::EngineOptions::new(model_path());
    options.context_size = n_ctx;
    options.n_gpu_layers = 0;
    imprint::engine::Engine::load(options).expect("load the real model")
}

pub fn engine() -> imprint::engine::Engine {
    engine_with_ctx(2048)
}

/// The `imprint` binary with its data under `home`, so a test never reads
/// or writes the real user's profile.
pub fn imprint_at(home: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_imprint"));
    cmd.env("IMPRINT_HOME", home);
    cmd
}
