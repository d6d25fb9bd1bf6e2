//! The crate's one error type. Every variant names the file and, where it applies, the line,
//! field or column and the value that was wrong, so a user can find and fix the input.

use std::path::{Path, PathBuf};

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

    #[error("{}: the file is empty (no header line)", path.display())]
    EmptyFile { path: PathBuf },

    #[error("{}: {problem}", path.display())]
    Json { path: PathBuf, problem: String },

    #[error("invalid argument `{field}`: {problem}")]
    InvalidArgument { field: String, problem: String },

    #[error("sample {sample}: {problem}")]
    Sample { sample: String, problem: String },

    #[error("{}: the output folder is not empty (it holds {holds}); choose another, or replace a previous build there (`--replace`)", path.display())]
    OutputNotEmpty { path: PathBuf, holds: String },
}

impl DataError {
    /// An I/O error on `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        DataError::Io { path: path.into(), source }
    }

    /// The file the error is about, when it names one.
    pub fn path(&self) -> Option<&Path> {
        match self {
            DataError::Io { path, .. }
            | DataError::Jsonl { path, .. }
            | DataError::WfdbHeader { path, .. }
            | DataError::WfdbSignal { path, .. }
            | DataError::Image { path, .. }
            | DataError::Csv { path, .. }
            | DataError::EmptyFile { path }
            | DataError::Json { path, .. }
            | DataError::OutputNotEmpty { path, .. } => Some(path),
            DataError::InvalidArgument { .. } | DataError::Sample { .. } => None,
        }
    }

    /// The line of [`DataError::path`] the error is about, when it names one.
    pub fn line(&self) -> Option<u64> {
        match self {
            DataError::Jsonl { line, .. } | DataError::WfdbHeader { line, .. } => Some(*line as u64),
            DataError::Csv { line, .. } => Some(*line),
            _ => None,
        }
    }

    /// The message without the leading file and line (for reports that list those apart).
    pub fn detail(&self) -> String {
        let full = self.to_string();
        let Some(path) = self.path() else { return full };
        let mut prefix = path.display().to_string();
        if let Some(line) = self.line() {
            prefix.push_str(&format!(":{line}"));
        }
        prefix.push_str(": ");
        full.strip_prefix(&prefix).map(str::to_string).unwrap_or(full)
    }

    /// An invalid argument, naming the field.
    pub fn arg(field: impl Into<String>, problem: impl Into<String>) -> Self {
        DataError::InvalidArgument { field: field.into(), problem: problem.into() }
    }
}
