//! A job's prompts: the lines of `data.dir/qa.jsonl` of the train split and the stage's kind
//! (physiological QA for PT, disease QA for SFT and GRPO), kept as the raw bytes of each line;
//! and the seeded per-epoch shuffle that orders them.
//!
//! Only `split`, `kind`, `id` and the modality file names (`ecg`, `cxr`, `lab`) are read from
//! each line; the rest is opaque to the coordinator. Every selected sample's files are read once
//! with the data crate's readers ([`medtvt_data::check_files`]): a sample with a broken file is
//! skipped and reported (id, line, file and problem), or with `data.strict` the job is refused
//! at the first one. A learner or worker never meets a broken file mid-run.

use medtvt_config::Stage;
use prost::bytes::Bytes;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::Serialize;
use std::path::{Path, PathBuf};

/// The QA file inside `data.dir`.
pub const QA_FILE: &str = "qa.jsonl";

#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}:{line}: {problem}")]
    BadLine { path: PathBuf, line: usize, problem: String },
    #[error("{path}: no samples with split \"train\" and kind \"{kind}\" (needed by a {stage:?} job){}", skipped_note(*.skipped))]
    Empty { path: PathBuf, kind: &'static str, stage: Stage, skipped: usize },
    #[error("{path}:{line}: sample {sample}: {problem} (data.strict = true stops at the first broken sample)")]
    BrokenSample { path: PathBuf, line: usize, sample: String, problem: String },
}

fn skipped_note(skipped: usize) -> String {
    match skipped {
        0 => String::new(),
        n => format!("; {n} were skipped for broken modality files"),
    }
}

/// A sample left out of a job because a modality file it names cannot be read.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SkippedSample {
    /// Line in `qa.jsonl` (1-based).
    pub line: usize,
    /// The sample's `id`.
    pub sample: String,
    /// The reader's error: the file and what is wrong with it.
    pub problem: String,
}

/// The samples a job trains on, and those skipped.
#[derive(Debug, Clone, Default)]
pub struct JobSamples {
    pub samples: Vec<Bytes>,
    pub skipped: Vec<SkippedSample>,
}

/// The fields of a QA line the coordinator looks at beyond `split` and `kind`.
#[derive(serde::Deserialize)]
struct FileRefs {
    #[serde(default)]
    id: serde_json::Value,
    ecg: Option<String>,
    cxr: Option<String>,
    lab: Option<String>,
}

/// The `kind` of QA sample a stage trains on.
pub fn kind_for(stage: Stage) -> &'static str {
    match stage {
        Stage::Pt => "physiological",
        Stage::Sft | Stage::Grpo => "disease",
    }
}

/// Reads the train samples of the stage's kind from `dir/qa.jsonl`, in file order, and checks
/// their modality files: broken ones are skipped and listed, or (`strict`) the first is an error.
pub fn load_samples(dir: &Path, stage: Stage, strict: bool) -> Result<JobSamples, DatasetError> {
    let path = dir.join(QA_FILE);
    let mut out = JobSamples::default();
    for (line, raw) in select_lines(&path, stage)? {
        let refs: FileRefs = serde_json::from_slice(&raw).map_err(|e| DatasetError::BadLine {
            path: path.clone(),
            line,
            problem: format!("modality file fields: {e}"),
        })?;
        let files =
            medtvt_data::ModalityFiles { ecg: refs.ecg.as_deref(), cxr: refs.cxr.as_deref(), lab: refs.lab.as_deref() };
        match medtvt_data::check_files(dir, files) {
            Ok(()) => out.samples.push(raw),
            Err(e) => {
                let sample = match refs.id {
                    serde_json::Value::String(id) => id,
                    other => other.to_string(),
                };
                let problem = e.to_string();
                if strict {
                    return Err(DatasetError::BrokenSample { path, line, sample, problem });
                }
                out.skipped.push(SkippedSample { line, sample, problem });
            }
        }
    }
    if out.samples.is_empty() {
        return Err(DatasetError::Empty { path, kind: kind_for(stage), stage, skipped: out.skipped.len() });
    }
    Ok(out)
}

/// The train lines of the stage's kind, with their 1-based line numbers.
fn select_lines(path: &Path, stage: Stage) -> Result<Vec<(usize, Bytes)>, DatasetError> {
    let path = path.to_path_buf();
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
            value.get(name).and_then(|v| v.as_str()).ok_or_else(|| bad(format!("missing string field `{name}`")))
        };
        let (split, sample_kind) = (field("split")?, field("kind")?);
        if split == "train" && sample_kind == kind {
            samples.push((line, Bytes::copy_from_slice(raw)));
        }
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
        let grpo = load_samples(dir.path(), Stage::Grpo, true).unwrap();
        assert_eq!(grpo.samples, vec![Bytes::from(lines[0])]);
        let pt = load_samples(dir.path(), Stage::Pt, true).unwrap();
        assert_eq!(pt.samples, vec![Bytes::from(lines[3])]);
        assert!(pt.skipped.is_empty());
    }

    #[test]
    fn bad_line_and_missing_file_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let err = load_samples(dir.path(), Stage::Sft, false).unwrap_err().to_string();
        assert!(err.contains("qa.jsonl"), "{err}");
        std::fs::write(dir.path().join(QA_FILE), "{\"split\":\"train\",\"kind\":\"disease\"}\n{oops\n").unwrap();
        let err = load_samples(dir.path(), Stage::Sft, false).unwrap_err().to_string();
        assert!(err.contains("qa.jsonl:2: not JSON"), "{err}");
        std::fs::write(dir.path().join(QA_FILE), "{\"kind\":\"disease\"}\n").unwrap();
        let err = load_samples(dir.path(), Stage::Sft, false).unwrap_err().to_string();
        assert!(err.contains(":1: missing string field `split`"), "{err}");
        std::fs::write(dir.path().join(QA_FILE), "{\"split\":\"val\",\"kind\":\"disease\"}\n").unwrap();
        let err = load_samples(dir.path(), Stage::Sft, false).unwrap_err().to_string();
        assert!(err.contains("no samples"), "{err}");
    }

    #[test]
    fn samples_with_unreadable_files_are_skipped_and_named_or_refused_when_strict() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("labs")).unwrap();
        let good_lab = "subject_id,hadm_id,specimen_id,itemid,charttime,value,valuenum,valueuom,ref_range_lower,ref_range_upper,flag\n";
        std::fs::write(dir.path().join("labs/good.csv"), good_lab).unwrap();
        std::fs::write(dir.path().join("labs/bad.csv"), format!("{good_lab}1,2,3,xx,2020-01-01 00:00:00,1,1,mg,,,\n"))
            .unwrap();
        let lines = [
            r#"{"split":"train","kind":"disease","id":"ok-1","lab":"labs/good.csv"}"#,
            r#"{"split":"train","kind":"disease","id":"bad-lab","lab":"labs/bad.csv"}"#,
            r#"{"split":"train","kind":"disease","id":"no-ecg","ecg":"ecg/missing"}"#,
            r#"{"split":"train","kind":"disease","id":"ok-2"}"#,
        ];
        std::fs::write(dir.path().join(QA_FILE), lines.join("\n")).unwrap();
        let loaded = load_samples(dir.path(), Stage::Sft, false).unwrap();
        assert_eq!(loaded.samples, vec![Bytes::from(lines[0]), Bytes::from(lines[3])]);
        let skipped: Vec<(usize, &str)> = loaded.skipped.iter().map(|s| (s.line, s.sample.as_str())).collect();
        assert_eq!(skipped, vec![(2, "bad-lab"), (3, "no-ecg")]);
        assert!(
            loaded.skipped[0].problem.contains("labs/bad.csv") && loaded.skipped[0].problem.contains("itemid"),
            "{:?}",
            loaded.skipped[0]
        );
        assert!(loaded.skipped[1].problem.contains("missing.hea"), "{:?}", loaded.skipped[1]);
        let err = load_samples(dir.path(), Stage::Sft, true).unwrap_err().to_string();
        assert!(err.contains("qa.jsonl:2: sample bad-lab") && err.contains("labs/bad.csv"), "{err}");
    }
}
