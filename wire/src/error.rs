//! The wire crate's error type.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("cannot read {path}: {err}")]
    Io { path: PathBuf, err: std::io::Error },
    #[error("certificate: {0}")]
    Cert(String),
    #[error("TLS setup: {0}")]
    Tls(String),
    #[error("connection: {0}")]
    Connection(String),
    #[error("peer speaks protocol {theirs}, this node speaks {ours}")]
    Version { ours: u32, theirs: u32 },
    #[error("peer refused the handshake: {0}")]
    Refused(String),
    #[error("frame of {size} bytes exceeds the limit of {limit}")]
    FrameTooLarge { size: usize, limit: usize },
    #[error("malformed message: {0}")]
    Decode(String),
    #[error("cluster file {path}: {reason}")]
    Config { path: PathBuf, reason: String },
}

pub type Result<T> = std::result::Result<T, WireError>;
