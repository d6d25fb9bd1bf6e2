//! The contract between the data and the model: [`ModalityInputs`] holds one sample's three
//! modality arrays as plain row-major `f32`s, and [`load_inputs`] reads them from the files a
//! [`QaSample`] names. The model, learner and rollout code depend on these names and shapes.
//! [`check_files`] reads the same files with the same readers without building arrays: the check
//! a job's loader runs on every sample before training, so that a broken file is reported and its
//! sample skipped up front instead of failing a step later.

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

/// The modality files one sample names, relative to the dataset directory.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ModalityFiles<'a> {
    /// WFDB record stem (no extension).
    pub ecg: Option<&'a str>,
    pub cxr: Option<&'a str>,
    pub lab: Option<&'a str>,
}

impl<'a> From<&'a QaSample> for ModalityFiles<'a> {
    fn from(s: &'a QaSample) -> Self {
        ModalityFiles { ecg: s.ecg.as_deref(), cxr: s.cxr.as_deref(), lab: s.lab.as_deref() }
    }
}

/// Reads every file in `files` as [`load_inputs`] would: the WFDB header and signal (and the
/// 12-lead model input built from them), the X-ray decoded, every lab CSV row parsed. The first
/// failure is returned; its message names the file and, where it applies, the line or field.
pub fn check_files(dataset_dir: &Path, files: ModalityFiles<'_>) -> Result<(), DataError> {
    if let Some(rel) = files.ecg {
        let stem = dataset_dir.join(rel);
        ecg_model_input(&read_record(&stem)?, &stem)?;
    }
    if let Some(rel) = files.cxr {
        crate::image::open_image(&dataset_dir.join(rel))?;
    }
    if let Some(rel) = files.lab {
        read_lab_csv(&dataset_dir.join(rel))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sample::{QaKind, Split};

    #[test]
    fn missing_modality_is_none_and_a_missing_file_names_sample_and_file() {
        let dir = tempfile::tempdir().unwrap();
        let events = vec![];
        crate::labs::write_lab_csv(&dir.path().join("l.csv"), &events).unwrap();
        let mut s = QaSample {
            id: "enc-9-dx".into(),
            split: Split::Test,
            kind: QaKind::Disease,
            encounter_id: "enc-9".into(),
            ecg: None,
            cxr: None,
            lab: Some("l.csv".into()),
            question: "<lab> Which?".into(),
            answer: "<think>x</think><answer>sepsis</answer>".into(),
            labels: vec!["sepsis".into()],
        };
        let p = LabPercentiles::fit(std::iter::empty());
        let inputs = load_inputs(dir.path(), &s, &p, 8).unwrap();
        assert_eq!((inputs.ecg, inputs.cxr), (None, None));
        let lab = inputs.lab.unwrap();
        assert!(lab[..50].iter().all(|v| *v == 0.5) && lab[50..].iter().all(|v| *v == 1.0));
        s.ecg = Some("ecg/nothere".into());
        let e = load_inputs(dir.path(), &s, &p, 8).unwrap_err().to_string();
        assert!(e.contains("enc-9-dx") && e.contains("nothere.hea"), "{e}");
        let e = check_files(dir.path(), ModalityFiles::from(&s)).unwrap_err().to_string();
        assert!(e.contains("nothere.hea"), "{e}");
    }

    #[test]
    fn check_files_accepts_a_synthetic_sample_and_names_each_broken_file() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = crate::synth::SynthConfig { image_size: 16, ..crate::synth::SynthConfig::new(4, 3) };
        crate::synth::synthesize(dir.path(), &cfg).unwrap();
        let samples = crate::sample::read_jsonl(&dir.path().join("qa.jsonl")).unwrap();
        let full = samples
            .iter()
            .find(|s| s.ecg.is_some() && s.cxr.is_some() && s.lab.is_some())
            .expect("a sample with all three");
        check_files(dir.path(), full.into()).unwrap();
        let path = |rel: &str| dir.path().join(rel);

        let lab = path(full.lab.as_deref().unwrap());
        let text = std::fs::read_to_string(&lab).unwrap();
        let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
        let fields = lines[0].split(',').count();
        lines.insert(1, vec!["oops"; fields].join(","));
        std::fs::write(&lab, lines.join("\n") + "\n").unwrap();
        let e = check_files(dir.path(), full.into()).unwrap_err().to_string();
        assert!(e.contains(lab.to_str().unwrap()) && e.contains("column"), "{e}");
        std::fs::write(&lab, text).unwrap();

        let png = path(full.cxr.as_deref().unwrap());
        let bytes = std::fs::read(&png).unwrap();
        std::fs::write(&png, &bytes[..bytes.len() / 2]).unwrap();
        let e = check_files(dir.path(), full.into()).unwrap_err().to_string();
        assert!(e.contains(png.to_str().unwrap()) && e.contains("image"), "{e}");
        std::fs::write(&png, bytes).unwrap();

        // A JPEG cut short, which the decoder alone would fill with grey, is refused too.
        let jpg_rel = "cxr/cut.jpg";
        let jpeg = crate::jpeg::tests::noisy_jpeg(128);
        std::fs::write(path(jpg_rel), &jpeg[..jpeg.len() / 2]).unwrap();
        let cut = QaSample { cxr: Some(jpg_rel.into()), ..full.clone() };
        let e = check_files(dir.path(), (&cut).into()).unwrap_err().to_string();
        assert!(e.contains("cut.jpg") && e.contains("truncated"), "{e}");

        let dat = path(&format!("{}.dat", full.ecg.as_deref().unwrap()));
        let bytes = std::fs::read(&dat).unwrap();
        std::fs::write(&dat, &bytes[..bytes.len() / 3]).unwrap();
        let e = check_files(dir.path(), full.into()).unwrap_err().to_string();
        assert!(e.contains(".dat") && e.contains("WFDB signal"), "{e}");
    }
}
