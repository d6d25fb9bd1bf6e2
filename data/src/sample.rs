//! One MedTVT-QA sample ([`QaSample`]) and its JSON-lines file (`qa.jsonl`): one sample per line,
//! all splits in one file, told apart by the `split` field. Modality paths are relative to the
//! dataset directory that holds `qa.jsonl`.

use crate::error::DataError;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::{Component, Path};

/// The placeholder token of each modality in a question.
pub const ECG_PLACEHOLDER: &str = "<ecg>";
pub const CXR_PLACEHOLDER: &str = "<cxr>";
pub const LAB_PLACEHOLDER: &str = "<lab>";

/// Which part of the data a sample belongs to (split by encounter, never by sample).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Split {
    Train,
    Val,
    Test,
}

impl Split {
    pub const ALL: [Split; 3] = [Split::Train, Split::Val, Split::Test];

    pub fn as_str(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Val => "val",
            Split::Test => "test",
        }
    }
}

impl fmt::Display for Split {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The two question kinds of MedTVT-QA.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QaKind {
    /// Describe what each modality shows (PT stage).
    Physiological,
    /// Chain of evidence, then the set of diseases (SFT and RFT stages).
    Disease,
}

impl QaKind {
    pub fn as_str(self) -> &'static str {
        match self {
            QaKind::Physiological => "physiological",
            QaKind::Disease => "disease",
        }
    }
}

impl fmt::Display for QaKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One question-answer pair about one encounter. See docs/data.md for the text formats.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QaSample {
    /// Unique sample id, e.g. `enc-000001-dx`.
    pub id: String,
    pub split: Split,
    pub kind: QaKind,
    /// The encounter (admission) both QA pairs of one patient stay share.
    pub encounter_id: String,
    /// WFDB record stem relative to the dataset dir, e.g. `ecg/enc-000001` (no extension).
    pub ecg: Option<String>,
    /// X-ray image (PNG or JPEG) relative to the dataset dir.
    pub cxr: Option<String>,
    /// Lab CSV (MIMIC-IV labevents schema) relative to the dataset dir.
    pub lab: Option<String>,
    /// Starts with the placeholders of the present modalities, e.g. `<ecg> <cxr> <lab> ...`.
    pub question: String,
    /// `<think>...</think><answer>...</answer>`.
    pub answer: String,
    /// The encounter's disease names (canonical spelling).
    pub labels: Vec<String>,
}

impl QaSample {
    /// Checks the invariants the trainers rely on: a placeholder for exactly the present
    /// modalities, relative paths that stay inside the dataset dir, tagged answers.
    pub fn validate(&self) -> Result<(), String> {
        if self.id.is_empty() {
            return Err("field `id` is empty".into());
        }
        let modalities = [
            ("ecg", &self.ecg, ECG_PLACEHOLDER),
            ("cxr", &self.cxr, CXR_PLACEHOLDER),
            ("lab", &self.lab, LAB_PLACEHOLDER),
        ];
        if modalities.iter().all(|(_, p, _)| p.is_none()) {
            return Err("no modality: `ecg`, `cxr` and `lab` are all null".into());
        }
        for (field, path, placeholder) in modalities {
            let n = self.question.matches(placeholder).count();
            match path {
                Some(p) => {
                    check_relative(p).map_err(|e| format!("field `{field}` = {p:?}: {e}"))?;
                    if n != 1 {
                        return Err(format!(
                            "field `question` must contain {placeholder} once (modality `{field}` is present), found {n}"
                        ));
                    }
                }
                None if n != 0 => {
                    return Err(format!("field `question` contains {placeholder} but `{field}` is null"));
                }
                None => {}
            }
        }
        let a = &self.answer;
        let think = a.find("<think>");
        let think_end = a.find("</think>");
        let ans = a.find("<answer>");
        let ans_end = a.find("</answer>");
        match (think, think_end, ans, ans_end) {
            (Some(t), Some(te), Some(s), Some(se)) if t < te && te < s && s < se => Ok(()),
            _ => Err("field `answer` must be `<think>...</think><answer>...</answer>`".into()),
        }
    }

    /// The text between `<answer>` and `</answer>`.
    pub fn answer_text(&self) -> Option<&str> {
        let start = self.answer.find("<answer>")? + "<answer>".len();
        let end = self.answer[start..].find("</answer>")? + start;
        Some(&self.answer[start..end])
    }
}

fn check_relative(p: &str) -> Result<(), &'static str> {
    let path = Path::new(p);
    if p.is_empty() {
        return Err("empty path");
    }
    for c in path.components() {
        match c {
            Component::Normal(_) | Component::CurDir => {}
            _ => return Err("must be relative to the dataset dir, without `..`"),
        }
    }
    Ok(())
}

/// Reads and validates every sample of a JSON-lines file; blank lines are skipped.
pub fn read_jsonl(path: &Path) -> Result<Vec<QaSample>, DataError> {
    let file = std::fs::File::open(path).map_err(|e| DataError::io(path, e))?;
    let mut out = Vec::new();
    for (i, line) in BufReader::new(file).lines().enumerate() {
        let line = line.map_err(|e| DataError::io(path, e))?;
        if line.trim().is_empty() {
            continue;
        }
        let jsonl = |problem: String| DataError::Jsonl { path: path.to_path_buf(), line: i + 1, problem };
        let sample: QaSample = serde_json::from_str(&line).map_err(|e| jsonl(e.to_string()))?;
        sample.validate().map_err(|p| jsonl(format!("sample {}: {p}", sample.id)))?;
        out.push(sample);
    }
    Ok(out)
}

/// Reads the one sample on 1-based `line` of a JSON-lines file.
pub fn read_jsonl_line(path: &Path, line: usize) -> Result<QaSample, DataError> {
    let text = std::fs::read_to_string(path).map_err(|e| DataError::io(path, e))?;
    let jsonl = |problem: String| DataError::Jsonl { path: path.to_path_buf(), line, problem };
    let raw = text
        .lines()
        .nth(line.wrapping_sub(1))
        .ok_or_else(|| jsonl(format!("no such line (the file has {})", text.lines().count())))?;
    serde_json::from_str(raw).map_err(|e| jsonl(e.to_string()))
}

/// Writes samples, one JSON object per line, in the given order (deterministic bytes).
pub fn write_jsonl(path: &Path, samples: &[QaSample]) -> Result<(), DataError> {
    let file = std::fs::File::create(path).map_err(|e| DataError::io(path, e))?;
    let mut w = BufWriter::new(file);
    for s in samples {
        let line = serde_json::to_string(s)
            .map_err(|e| DataError::Json { path: path.to_path_buf(), problem: e.to_string() })?;
        writeln!(w, "{line}").map_err(|e| DataError::io(path, e))?;
    }
    w.flush().map_err(|e| DataError::io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> QaSample {
        QaSample {
            id: "enc-1-dx".into(),
            split: Split::Train,
            kind: QaKind::Disease,
            encounter_id: "enc-1".into(),
            ecg: Some("ecg/enc-1".into()),
            cxr: None,
            lab: Some("labs/enc-1.csv".into()),
            question: "<ecg> <lab> Which diseases?".into(),
            answer: "<think>x</think><answer>sepsis; pneumonia</answer>".into(),
            labels: vec!["sepsis".into(), "pneumonia".into()],
        }
    }

    #[test]
    fn roundtrip_and_line_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qa.jsonl");
        let s = sample();
        write_jsonl(&path, &[s.clone(), s.clone()]).unwrap();
        assert_eq!(read_jsonl(&path).unwrap(), vec![s.clone(), s.clone()]);
        assert_eq!(read_jsonl_line(&path, 2).unwrap(), s);
        assert_eq!(s.answer_text(), Some("sepsis; pneumonia"));

        let mut text = std::fs::read_to_string(&path).unwrap();
        text.push_str("{\"id\": 3}\n");
        std::fs::write(&path, text).unwrap();
        let err = read_jsonl(&path).unwrap_err().to_string();
        assert!(err.contains("qa.jsonl:3:"), "{err}");
    }

    #[test]
    fn validate_catches_placeholder_and_path_errors() {
        let mut s = sample();
        assert!(s.validate().is_ok());
        s.question = "<lab> Which?".into();
        assert!(s.validate().unwrap_err().contains("<ecg>"));
        let mut s = sample();
        s.question = "<ecg> <cxr> <lab> Which?".into();
        assert!(s.validate().unwrap_err().contains("`cxr` is null"));
        let mut s = sample();
        s.ecg = Some("../x".into());
        assert!(s.validate().unwrap_err().contains("relative"));
        let mut s = sample();
        s.answer = "<answer>x</answer>".into();
        assert!(s.validate().is_err());
    }
}
