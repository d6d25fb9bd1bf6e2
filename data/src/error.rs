//! The crate's one error type. Every variant names the file and, where it applies, the line,
//! field or column and the value that was wrong, so a user can find and fix the input.

use std::path::PathBuf;

/// Errors from reading, writing, generating or pairing MedTVT-QA data.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },

    #[error("{}:{line}: invalid QA sample: {problem}", path.display())]
    Jsonl { path: PathBuf, line: usize, problem: String },

    #[error("{}:{line}: WFDB header field `{field}`: {problem}", path.display())]
    WfdbHeader { path: PathBuf, line: usize, field: String, problem: String },

    #[error("{}: WFDB signal data: {problem}", path.display())]
    WfdbSignal { path: PathBuf, problem: String },

    #[error("{}: image: {problem}", path.display())]
    Image { path: PathBuf, problem: String },

    #[error("{}:{line}: column `{column}`: {problem}", path.display())]
    Csv { path: PathBuf, line: u64, column: String, problem: String },

    #[error("{}: {problem}", path.display())]
    Json { path: PathBuf, problem: String },

    #[error("invalid argument `{field}`: {problem}")]
    InvalidArgument { field: String, problem: String },

    #[error("sample {sample}: {problem}")]
    Sample { sample: String, problem: String },
}

impl DataError {
    /// An I/O error on `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        DataError::Io { path: path.into(), source }
    }

    /// An invalid argument, naming the field.
    pub fn arg(field: impl Into<String>, problem: impl Into<String>) -> Self {
        DataError::InvalidArgument { field: field.into(), problem: problem.into() }
    }
}
