//! Loading a batch's modality inputs from the job's dataset directory (`data.dir`): the ECG,
//! X-ray and lab files each sample names, with the dataset's lab percentile table. Shared by the
//! learner (PT/SFT samples, GRPO prompts) and the rollout workers (leased prompts).

use medtvt_config::RunConfig;
use medtvt_data::{load_inputs, DataError, LabPercentiles, ModalityInputs, QaSample};
use std::path::PathBuf;

/// The file, under `data.dir`, that holds the lab percentile table.
pub const LAB_PERCENTILES_FILE: &str = "lab_percentiles.json";

pub struct InputLoader {
    dir: PathBuf,
    percentiles: LabPercentiles,
    image_size: u32,
}

impl InputLoader {
    /// The loader of `data.dir`, resizing X-rays to the model's `image_size`.
    pub fn from_config(cfg: &RunConfig, image_size: usize) -> Result<Self, DataError> {
        let dir = cfg.data.dir.clone();
        let percentiles = LabPercentiles::load(&dir.join(LAB_PERCENTILES_FILE))?;
        let image_size = u32::try_from(image_size).unwrap_or(u32::MAX);
        Ok(InputLoader { dir, percentiles, image_size })
    }

    pub fn new(dir: PathBuf, percentiles: LabPercentiles, image_size: u32) -> Self {
        InputLoader { dir, percentiles, image_size }
    }

    /// Each sample's question with its loaded modalities.
    pub fn prompts(&self, samples: &[QaSample]) -> Result<Vec<(String, ModalityInputs)>, DataError> {
        samples
            .iter()
            .map(|s| Ok((s.question.clone(), load_inputs(&self.dir, s, &self.percentiles, self.image_size)?)))
            .collect()
    }
}
