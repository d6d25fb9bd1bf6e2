//! The run's metrics.jsonl: one JSON object per line, `{"stage", "step", "values": {name: number}}`,
//! appended by learner rank 0 after every step and by evaluations (names prefixed `eval/`). It is
//! what `medtvt plot` draws and what a user greps when OpenTelemetry is not set up.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetricsRecord {
    pub stage: String,
    pub step: u64,
    pub values: BTreeMap<String, f64>,
}

#[derive(Debug, thiserror::Error)]
pub enum MetricsLogError {
    #[error("metrics log {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("metrics log {path}, line {line}: {source}")]
    Parse { path: PathBuf, line: usize, source: serde_json::Error },
}

/// Appends one record (creating the file and its directory if needed).
pub fn append(path: &Path, record: &MetricsRecord) -> Result<(), MetricsLogError> {
    let io = |source| MetricsLogError::Io { path: path.to_path_buf(), source };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    let mut line = serde_json::to_string(record).map_err(|source| MetricsLogError::Parse {
        path: path.to_path_buf(),
        line: 0,
        source,
    })?;
    line.push('\n');
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path).map_err(io)?;
    f.write_all(line.as_bytes()).map_err(io)
}

/// Reads every record; a malformed line is an error naming its number.
pub fn read_all(path: &Path) -> Result<Vec<MetricsRecord>, MetricsLogError> {
    let text =
        std::fs::read_to_string(path).map_err(|source| MetricsLogError::Io { path: path.to_path_buf(), source })?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l).map_err(|source| MetricsLogError::Parse {
                path: path.to_path_buf(),
                line: i + 1,
                source,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn appends_and_reads_back_and_names_bad_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/metrics.jsonl");
        let rec = MetricsRecord { stage: "grpo".into(), step: 1, values: [("loss".to_string(), 0.5)].into() };
        append(&path, &rec).unwrap();
        append(&path, &MetricsRecord { step: 2, ..rec.clone() }).unwrap();
        let all = read_all(&path).unwrap();
        assert_eq!(all.len(), 2);
        assert_eq!(all[0], rec);
        std::fs::write(&path, format!("{}\nnot json\n", serde_json::to_string(&rec).unwrap())).unwrap();
        let err = read_all(&path).unwrap_err().to_string();
        assert!(err.contains("line 2"), "{err}");
    }
}
