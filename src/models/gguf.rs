//! GGUF header checks.
//!
//! llama.cpp reports a bad file only through its log and a null pointer, and
//! some malformed files can abort the process inside ggml. So every model path
//! is inspected here first, and the user gets an error that names the file and
//! says what is wrong with it.

use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file;
use thiserror::Error;

/// Architectures whose GGUF layout imprint's editor understands. Mistral,
/// TinyLlama, Llama 2/3 and SmolLM2 all declare `llama`; Qwen2 (and 2.5)
/// adds biases to the attention projections and rotates by halves.
pub const SUPPORTED_ARCHITECTURES: &[&str] = &["llama", "qwen2"];

#[derive(Debug, Error)]
pub enum GgufError {
    #[error("model file {0} does not exist. Run `imprint model pull` for the default model, or check the path.")]
    Missing(PathBuf),
    #[error("cannot read model file {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a GGUF model file ({reason}). Download the model again or pick another file.")]
    NotGguf { path: PathBuf, reason: String },
    #[error("{path} is truncated: its tensors need {needed} bytes but the file has {actual}. The download was probably interrupted; fetch it again.")]
    Truncated {
        path: PathBuf,
        needed: u64,
        actual: u64,
    },
    #[error("{path} is a {found:?} model; imprint supports llama-architecture GGUF models ({supported}).")]
    UnsupportedArchitecture {
        path: PathBuf,
        found: String,
        supported: String,
    },
    #[error("{path} is a LoRA adapter, not a model. Adapters are built by imprint itself from your edits.")]
    IsAdapter { path: PathBuf },
}

/// What imprint needs to know about a model before loading it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GgufSummary {
    pub architecture: String,
    pub name: Option<String>,
    pub n_layer: u32,
    pub n_embd: u32,
    pub n_tensors: usize,
    pub file_size: u64,
}

/// Reads the header and tensor table of `path` and checks that the file holds
/// all the tensor data the header promises.
pub fn inspect_gguf(path: &Path) -> Result<GgufSummary, GgufError> {
    let content = read_header(path)?;
    let io_err = |source| GgufError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file_size = std::fs::metadata(path).map_err(io_err)?.len();

    let needed = content
        .tensor_infos
        .values()
        .map(|t| {
            let elems = t.shape.elem_count() as u64;
            let block = t.ggml_dtype.block_size() as u64;
            content.tensor_data_offset + t.offset + elems / block * t.ggml_dtype.type_size() as u64
        })
        .max()
        .unwrap_or(content.tensor_data_offset);
    if needed > file_size {
        return Err(GgufError::Truncated {
            path: path.to_path_buf(),
            needed,
            actual: file_size,
        });
    }

    let text = |key: &str| {
        content
            .metadata
            .get(key)
            .and_then(|v| v.to_string().ok())
            .cloned()
    };
    let not_gguf = |reason: &str| GgufError::NotGguf {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    };
    if text("general.type").as_deref() == Some("adapter") {
        return Err(GgufError::IsAdapter {
            path: path.to_path_buf(),
        });
    }
    let architecture =
        text("general.architecture").ok_or_else(|| not_gguf("no general.architecture"))?;
    if !SUPPORTED_ARCHITECTURES.contains(&architecture.as_str()) {
        return Err(GgufError::UnsupportedArchitecture {
            path: path.to_path_buf(),
            found: architecture,
            supported: SUPPORTED_ARCHITECTURES.join(", "),
        });
    }
    let number = |key: String| {
        content
            .metadata
            .get(&key)
            .and_then(|v| v.to_u32().ok())
            .ok_or_else(|| not_gguf(&format!("no {key}")))
    };
    Ok(GgufSummary {
        n_layer: number(format!("{architecture}.block_count"))?,
        n_embd: number(format!("{architecture}.embedding_length"))?,
        name: text("general.name"),
        architecture,
        n_tensors: content.tensor_infos.len(),
        file_size,
    })
}

/// Parses the GGUF header with candle, mapping its errors to ours.
pub fn read_header(path: &Path) -> Result<gguf_file::Content, GgufError> {
    let file = File::open(path).map_err(|source| {
        if source.kind() == std::io::ErrorKind::NotFound {
            GgufError::Missing(path.to_path_buf())
        } else {
            GgufError::Io {
                path: path.to_path_buf(),
                source,
            }
        }
    })?;
    let len = file
        .metadata()
        .map_err(|source| GgufError::Io {
            path: path.to_path_buf(),
            source,
        })?
        .len();
    // Refuse anything too short for a header before candle allocates from
    // garbage lengths.
    if len < 24 {
        return Err(GgufError::NotGguf {
            path: path.to_path_buf(),
            reason: format!("only {len} bytes"),
        });
    }
    let mut reader = BufReader::new(file);
    let mut magic = [0u8; 4];
    std::io::Read::read_exact(&mut reader, &mut magic).map_err(|source| GgufError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    if &magic != b"GGUF" {
        return Err(GgufError::NotGguf {
            path: path.to_path_buf(),
            reason: "it does not start with the GGUF magic bytes".into(),
        });
    }
    std::io::Seek::rewind(&mut reader).map_err(|source| GgufError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    gguf_file::Content::read(&mut reader).map_err(|e| GgufError::NotGguf {
        path: path.to_path_buf(),
        reason: format!("unreadable header: {e}"),
    })
}
