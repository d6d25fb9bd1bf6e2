//! A MedTVT-QA directory opened as a whole: its samples (`qa.jsonl`) and lab percentile tables
//! (`lab_percentiles.json`), with selection by split and kind and input loading. The layout is the
//! one `synth` and `build-mimic` write (docs/data.md).

use crate::error::DataError;
use crate::inputs::{load_inputs, ModalityInputs};
use crate::labs::LabPercentiles;
use crate::sample::{read_jsonl, QaKind, QaSample, Split};
use std::path::{Path, PathBuf};

/// The samples file inside a dataset directory.
pub const QA_FILE: &str = "qa.jsonl";
/// The percentile tables inside a dataset directory.
pub const PERCENTILES_FILE: &str = "lab_percentiles.json";

/// An opened dataset directory.
#[derive(Debug, Clone)]
pub struct Dataset {
    pub dir: PathBuf,
    pub samples: Vec<QaSample>,
    pub percentiles: LabPercentiles,
}

impl Dataset {
    /// Reads `dir/qa.jsonl` and `dir/lab_percentiles.json`.
    pub fn open(dir: &Path) -> Result<Dataset, DataError> {
        Ok(Dataset {
            dir: dir.to_path_buf(),
            samples: read_jsonl(&dir.join(QA_FILE))?,
            percentiles: LabPercentiles::load(&dir.join(PERCENTILES_FILE))?,
        })
    }

    /// The samples of one split and kind, in file order.
    pub fn select(&self, split: Split, kind: QaKind) -> impl Iterator<Item = &QaSample> {
        self.samples.iter().filter(move |s| s.split == split && s.kind == kind)
    }

    /// The model inputs of one sample (X-ray resized to `image_size`).
    pub fn inputs(&self, sample: &QaSample, image_size: u32) -> Result<ModalityInputs, DataError> {
        load_inputs(&self.dir, sample, &self.percentiles, image_size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_a_synthetic_set_and_selects_by_split_and_kind() {
        let dir = tempfile::tempdir().unwrap();
        crate::synth::synthesize(
            dir.path(),
            &crate::synth::SynthConfig { image_size: 32, ..crate::synth::SynthConfig::new(20, 2) },
        )
        .unwrap();
        let ds = Dataset::open(dir.path()).unwrap();
        let train: Vec<&QaSample> = ds.select(Split::Train, QaKind::Disease).collect();
        assert_eq!(train.len(), 16);
        assert!(train.iter().all(|s| s.id.ends_with("-dx")));
        let inputs = ds.inputs(train[0], 24).unwrap();
        assert!(inputs.ecg.is_some() || inputs.cxr.is_some() || inputs.lab.is_some());
        std::fs::remove_file(dir.path().join(PERCENTILES_FILE)).unwrap();
        assert!(Dataset::open(dir.path()).unwrap_err().to_string().contains(PERCENTILES_FILE));
    }
}
