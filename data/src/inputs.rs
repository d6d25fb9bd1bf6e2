//! The contract between the data and the model: [`ModalityInputs`] holds one sample's three
//! modality arrays as plain row-major `f32`s, and [`load_inputs`] reads them from the files a
//! [`QaSample`] names. The model, learner and rollout code depend on these names and shapes.

use crate::error::DataError;
use crate::labs::{lab_vector, read_lab_csv, LabPercentiles};
use crate::sample::QaSample;
use crate::wfdb::{ecg_model_input, read_record};
use std::path::Path;

/// One sample's model inputs; `None` where the modality is absent.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ModalityInputs {
    /// `[12, 1000]` row-major: the 12 standard leads at 100 Hz for 10 s, physical mV, NaN -> 0.
    pub ecg: Option<Vec<f32>>,
    /// `[3, S, S]` row-major, ImageNet-normalised (see [`crate::image`]).
    pub cxr: Option<Vec<f32>>,
    /// `[100]`: 50 lab percentiles in [0, 1] then 50 missingness flags (see [`crate::labs`]).
    pub lab: Option<Vec<f32>>,
}

/// Loads the modalities `sample` names, paths relative to `dataset_dir`; the X-ray is resized to
/// `image_size` x `image_size`. A file that is named but unreadable is an error naming it.
pub fn load_inputs(
    dataset_dir: &Path,
    sample: &QaSample,
    percentiles: &LabPercentiles,
    image_size: u32,
) -> Result<ModalityInputs, DataError> {
    let in_sample = |e: DataError| DataError::Sample { sample: sample.id.clone(), problem: e.to_string() };
    let ecg = match &sample.ecg {
        Some(rel) => {
            let stem = dataset_dir.join(rel);
            let rec = read_record(&stem).map_err(in_sample)?;
            Some(ecg_model_input(&rec, &stem).map_err(in_sample)?)
        }
        None => None,
    };
    let cxr = match &sample.cxr {
        Some(rel) => Some(crate::image::load_image(&dataset_dir.join(rel), image_size).map_err(in_sample)?),
        None => None,
    };
    let lab = match &sample.lab {
        Some(rel) => {
            let events = read_lab_csv(&dataset_dir.join(rel)).map_err(in_sample)?;
            Some(lab_vector(&events, percentiles).to_vec())
        }
        None => None,
    };
    Ok(ModalityInputs { ecg, cxr, lab })
}
