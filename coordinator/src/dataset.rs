//! A job's prompts: the lines of `data.dir/qa.jsonl` of the train split and the stage's kind
//! (physiological QA for PT, disease QA for SFT and GRPO), kept as the raw bytes of each line;
//! and the seeded per-epoch shuffle that orders them.
//!
//! Only `split` and `kind` are read from each line; the rest is opaque to the coordinator.

use medtvt_config::Stage;
use prost::bytes::Bytes;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use std::path::{Path, PathBuf};

/// The QA file inside `data.dir`.
pub const QA_FILE: &str = "qa.jsonl";

#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}:{line}: {problem}")]
    BadLine { path: PathBuf, line: usize, problem: String },
    #[error("{path}: no samples with split \"train\" and kind \"{kind}\" (needed by a {stage:?} job)")]
    Empty { path: PathBuf, kind: &'static str, stage: Stage },
}

/// The `kind` of QA sample a stage trains on.
pub fn kind_for(stage: Stage) -> &'static str {
    match stage {
        Stage::Pt => "physiological",
        Stage::Sft | Stage::Grpo => "disease",
    }
}

/// Reads the train samples of the stage's kind from `dir/qa.jsonl`, in file order.
pub fn load_samples(dir: &Path, stage: Stage) -> Result<Vec<Bytes>, DatasetError> {
    let path = dir.join(QA_FILE);
    let text = std::fs::read(&path).map_err(|source| DatasetError::Read { path: path.clone(), source })?;
    let kind = kind_for(stage);
    let mut samples = Vec::new();
    for (index, raw) in text.split(|b| *b == b'\n').enumerate() {
        let line = index + 1;
        let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        if raw.iter().all(|b| b.is_ascii_whitespace()) {
            continue;
        }
        let bad = |problem: String| DatasetError::BadLine { path: path.clone(), line, problem };
        let value: serde_json::Value = serde_json::from_slice(raw).map_err(|e| bad(format!("not JSON: {e}")))?;
        let field = |name: &str| {
            value
                .get(name)
                .and_then(|v| v.as_str())
                .ok_or_else(|| bad(format!("missing string field `{name}`")))
        };
        let (split, sample_kind) = (field("split")?, field("kind")?);
        if split == "train" && sample_kind == kind {
            samples.push(Bytes::copy_from_slice(raw));
        }
    }
    if samples.is_empty() {
        return Err(DatasetError::Empty { path, kind, stage });
    }
    Ok(samples)
}

/// The infinite sequence of prompt ids: epoch 0's shuffle of `0..n`, then epoch 1's, ...
/// Each epoch's permutation depends only on (seed, epoch), so the order is reproducible.
#[derive(Debug, Clone)]
pub struct EpochOrder {
    seed: u64,
    n: u64,
    cached: Option<(u64, Vec<u64>)>,
}

impl EpochOrder {
    pub fn new(seed: u64, n: usize) -> Self {
        assert!(n > 0, "an epoch order needs at least one sample");
        EpochOrder { seed, n: n as u64, cached: None }
    }

    /// (prompt_id, epoch) at `position` of the infinite sequence.
    pub fn at(&mut self, position: u64) -> (u64, u64) {
        let epoch = position / self.n;
        let offset = (position % self.n) as usize;
        if self.cached.as_ref().is_none_or(|(e, _)| *e != epoch) {
            self.cached = Some((epoch, permutation(self.seed, epoch, self.n)));
        }
        let prompt_id = self.cached.as_ref().map_or(offset as u64, |(_, perm)| perm[offset]);
        (prompt_id, epoch)
    }
}

fn permutation(seed: u64, epoch: u64, n: u64) -> Vec<u64> {
    // Mix the epoch in so that consecutive epochs are unrelated shuffles.
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let mut ids: Vec<u64> = (0..n).collect();
    ids.shuffle(&mut rng);
    ids
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_epoch_is_a_permutation_and_epochs_differ() {
        let mut order = EpochOrder::new(7, 50);
        let e0: Vec<u64> = (0..50).map(|p| order.at(p).0).collect();
        let e1: Vec<u64> = (50..100).map(|p| order.at(p).0).collect();
        let mut sorted = e0.clone();
        sorted.sort();
        assert_eq!(sorted, (0..50).collect::<Vec<_>>());
        assert_ne!(e0, e1);
        assert_eq!(order.at(120), (EpochOrder::new(7, 50).at(120).0, 2));
    }

    #[test]
    fn loads_only_train_samples_of_the_stage_kind() {
        let dir = tempfile::tempdir().unwrap();
        let lines = [
            r#"{"split":"train","kind":"disease","id":1}"#,
            r#"{"split":"test","kind":"disease","id":2}"#,
            "",
            r#"{"split":"train","kind":"physiological","id":3}"#,
        ];
        std::fs::write(dir.path().join(QA_FILE), lines.join("\n")).unwrap();
        let grpo = load_samples(dir.path(), Stage::Grpo).unwrap();
        assert_eq!(grpo, vec![Bytes::from(lines[0])]);
        let pt = load_samples(dir.path(), Stage::Pt).unwrap();
        assert_eq!(pt, vec![Bytes::from(lines[3])]);
    }

    #[test]
    fn bad_line_and_missing_file_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let err = load_samples(dir.path(), Stage::Sft).unwrap_err().to_string();
        assert!(err.contains("qa.jsonl"), "{err}");
        std::fs::write(dir.path().join(QA_FILE), "{\"split\":\"train\",\"kind\":\"disease\"}\n{oops\n").unwrap();
        let err = load_samples(dir.path(), Stage::Sft).unwrap_err().to_string();
        assert!(err.contains("qa.jsonl:2: not JSON"), "{err}");
        std::fs::write(dir.path().join(QA_FILE), "{\"kind\":\"disease\"}\n").unwrap();
        let err = load_samples(dir.path(), Stage::Sft).unwrap_err().to_string();
        assert!(err.contains(":1: missing string field `split`"), "{err}");
        std::fs::write(dir.path().join(QA_FILE), "{\"split\":\"val\",\"kind\":\"disease\"}\n").unwrap();
        let err = load_samples(dir.path(), Stage::Sft).unwrap_err().to_string();
        assert!(err.contains("no samples"), "{err}");
    }
}
