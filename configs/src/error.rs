//! The one error type of config loading: every variant names the file, and where it can, the key.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {file}: {source}")]
    Read { file: PathBuf, source: std::io::Error },
    #[error("{file}:{line}:{column}: {message}")]
    Parse { file: PathBuf, line: usize, column: usize, message: String },
    #[error("{file}: override `{spec}`: {problem}")]
    Override { file: PathBuf, spec: String, problem: String },
    #[error("{file}: `{key}` {problem}")]
    Invalid { file: PathBuf, key: String, problem: String },
}

impl ConfigError {
    pub(crate) fn parse(file: &std::path::Path, text: &str, err: &toml::de::Error) -> Self {
        let (line, column) = err.span().map(|span| line_column(text, span.start)).unwrap_or((0, 0));
        ConfigError::Parse { file: file.to_path_buf(), line, column, message: err.message().to_string() }
    }

    pub(crate) fn invalid(file: &std::path::Path, key: &str, problem: impl Into<String>) -> Self {
        ConfigError::Invalid { file: file.to_path_buf(), key: key.to_string(), problem: problem.into() }
    }
}

/// 1-based line and column of a byte offset.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}
