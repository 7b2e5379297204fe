//! The model crate's error type.

use std::path::PathBuf;

/// Everything that can go wrong while loading or running a model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("cannot read {path}: {err}")]
    Io { path: PathBuf, err: std::io::Error },
    #[error("malformed model file {path}: {reason}")]
    Malformed { path: PathBuf, reason: String },
    #[error("unsupported model: {0}")]
    Unsupported(String),
    #[error("invalid slice: {0}")]
    InvalidSlice(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    Template(String),
    #[error("default model: {0}")]
    Fetch(String),
    #[error("KV cache: {0}")]
    Kv(String),
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("tensor computation failed: {0}")]
    Compute(#[from] candle_core::Error),
    /// The GPU, its driver or a CUDA library is missing or failed.
    #[error("GPU: {0}")]
    Device(String),
    #[error("a model worker thread stopped: {0}")]
    Worker(String),
    /// A preemptible pass stopped between layers because its stop flag was
    /// set; the KV it wrote for its positions is partial.
    #[error("preempted between layers")]
    Preempted,
}

pub type Result<T> = std::result::Result<T, ModelError>;

impl ModelError {
    pub(crate) fn malformed(path: &std::path::Path, reason: impl Into<String>) -> Self {
        ModelError::Malformed {
            path: path.to_path_buf(),
            reason: reason.into(),
        }
    }
}
