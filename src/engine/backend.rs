//! The process-wide llama.cpp backend. llama.cpp may be initialised only
//! once per process, so every engine shares this one.

use std::sync::OnceLock;

use llama_cpp_2::llama_backend::LlamaBackend;

static BACKEND: OnceLock<LlamaBackend> = OnceLock::new();
static LOGS_ROUTED: OnceLock<()> = OnceLock::new();

pub(crate) fn get() -> &'static LlamaBackend {
    BACKEND.get_or_init(|| {
        init_logging();
        // init() fails only if it already ran, which the OnceLock rules out.
        LlamaBackend::init().expect("llama.cpp backend initialised once")
    })
}

/// Routes llama.cpp's own log lines into `tracing` (target `llama_cpp_2`),
/// where the subscriber's filter decides what is shown. Without this,
/// llama.cpp prints straight to stderr.
pub fn init_logging() {
    LOGS_ROUTED.get_or_init(|| {
        llama_cpp_2::send_logs_to_tracing(llama_cpp_2::LogOptions::default());
    });
}
