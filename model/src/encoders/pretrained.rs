//! Pretrained encoder weights from a `.safetensors` file (the run config's
//! `model.{ecg,cxr,lab}_encoder_weights`), copied into one encoder's variables.
//!
//! The file must hold exactly the encoder's parameters under the encoder's own names (the
//! `ecg_encoder.` / `cxr_encoder.` / `lab_encoder.` prefix of the model's `VarStore` left off),
//! each with the encoder's shape: an unexpected name, a missing name or a shape mismatch is an
//! error that lists them all, so a half-converted checkpoint never trains silently with random
//! layers. Values are converted to the model's dtype. docs/model.md lists the names and how to
//! export an xresnet1d or a timm ViT checkpoint to them.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use tch::nn::VarStore;
use tch::Tensor;

/// One of the three modality encoders, as named in the model's `VarStore` and the run config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoder {
    Ecg,
    Cxr,
    Lab,
}

impl Encoder {
    pub const ALL: [Encoder; 3] = [Encoder::Ecg, Encoder::Cxr, Encoder::Lab];

    /// The prefix of the encoder's variables in the model's `VarStore`.
    pub fn prefix(self) -> &'static str {
        match self {
            Encoder::Ecg => "ecg_encoder.",
            Encoder::Cxr => "cxr_encoder.",
            Encoder::Lab => "lab_encoder.",
        }
    }

    /// The run-config key of its weights file.
    pub fn config_key(self) -> &'static str {
        match self {
            Encoder::Ecg => "model.ecg_encoder_weights",
            Encoder::Cxr => "model.cxr_encoder_weights",
            Encoder::Lab => "model.lab_encoder_weights",
        }
    }

    /// The weights file the run config's `[model]` table names for it, if any.
    pub fn weights_in(self, model: &medtvt_config::ModelSection) -> Option<&Path> {
        match self {
            Encoder::Ecg => model.ecg_encoder_weights.as_deref(),
            Encoder::Cxr => model.cxr_encoder_weights.as_deref(),
            Encoder::Lab => model.lab_encoder_weights.as_deref(),
        }
    }
}

/// Why a weights file does not fit its encoder.
#[derive(Debug, thiserror::Error)]
#[error("{key} = \"{}\": {problem}", path.display())]
pub struct EncoderWeightsError {
    /// The config key that named the file, e.g. `model.ecg_encoder_weights`.
    pub key: String,
    pub path: PathBuf,
    pub problem: String,
}

/// Copies the tensors of `path` into the variables of `vs` under `prefix` (e.g. `ecg_encoder.`),
/// after checking that names and shapes match one to one. Returns the number of tensors copied.
pub fn load_encoder_weights(vs: &VarStore, prefix: &str, key: &str, path: &Path) -> Result<usize, EncoderWeightsError> {
    let fail = |problem: String| EncoderWeightsError { key: key.to_string(), path: path.to_path_buf(), problem };
    let stored = Tensor::read_safetensors(path).map_err(|e| fail(format!("cannot read it as safetensors: {e}")))?;
    let stored: BTreeMap<String, Tensor> = stored.into_iter().collect();
    let vars: BTreeMap<String, Tensor> = vs
        .variables()
        .into_iter()
        .filter_map(|(name, var)| name.strip_prefix(prefix).map(|local| (local.to_string(), var)))
        .collect();
    check_names(&vars, &stored).map_err(fail)?;
    check_shapes(&vars, &stored).map_err(fail)?;
    tch::no_grad(|| {
        for (name, var) in &vars {
            let value = &stored[name];
            var.shallow_clone().copy_(&value.to_device(var.device()).to_kind(var.kind()));
        }
    });
    Ok(vars.len())
}

/// Every name of the file is a parameter of the encoder and the other way round.
fn check_names(vars: &BTreeMap<String, Tensor>, stored: &BTreeMap<String, Tensor>) -> Result<(), String> {
    let expected: BTreeSet<&str> = vars.keys().map(String::as_str).collect();
    let found: BTreeSet<&str> = stored.keys().map(String::as_str).collect();
    let unexpected: Vec<&str> = found.difference(&expected).copied().collect();
    let missing: Vec<&str> = expected.difference(&found).copied().collect();
    let mut problems = Vec::new();
    if !unexpected.is_empty() {
        problems.push(format!(
            "{} tensor(s) that are not parameters of the encoder: {}",
            unexpected.len(),
            unexpected.join(", ")
        ));
    }
    if !missing.is_empty() {
        problems.push(format!(
            "{} parameter(s) of the encoder missing from the file: {}",
            missing.len(),
            missing.join(", ")
        ));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("; "))
    }
}

fn check_shapes(vars: &BTreeMap<String, Tensor>, stored: &BTreeMap<String, Tensor>) -> Result<(), String> {
    let mismatches: Vec<String> = vars
        .iter()
        .filter_map(|(name, var)| {
            let found = stored[name].size();
            (found != var.size())
                .then(|| format!("tensor `{name}` has shape {found:?}, the encoder expects {:?}", var.size()))
        })
        .collect();
    if mismatches.is_empty() {
        Ok(())
    } else {
        Err(mismatches.join("; "))
    }
}

/// The encoder's parameters under their file names (prefix left off), sorted: what
/// [`load_encoder_weights`] expects, and what `MedTvt::save_encoder_weights` writes.
pub fn encoder_tensors(vs: &VarStore, prefix: &str) -> Vec<(String, Tensor)> {
    let mut named: Vec<(String, Tensor)> = vs
        .variables()
        .into_iter()
        .filter_map(|(name, var)| name.strip_prefix(prefix).map(|local| (local.to_string(), var)))
        .collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    named
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::encoders::{LabEncoder, LabEncoderConfig};
    use tch::{Device, Kind};

    fn lab_store(seed: i64) -> VarStore {
        tch::manual_seed(seed);
        let vs = VarStore::new(Device::Cpu);
        let _ = LabEncoder::new(&(vs.root() / "lab_encoder"), &LabEncoderConfig::tiny(8));
        vs
    }

    fn write(path: &Path, named: &[(String, Tensor)]) {
        Tensor::write_safetensors(named, path).unwrap();
    }

    #[test]
    fn matching_file_is_copied_in() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lab.safetensors");
        let source = lab_store(1);
        write(&path, &encoder_tensors(&source, "lab_encoder."));
        let target = lab_store(2);
        let n = load_encoder_weights(&target, "lab_encoder.", "model.lab_encoder_weights", &path).unwrap();
        assert_eq!(n, 6, "two linear layers and a LayerNorm, weight and bias each");
        for ((name, a), (_, b)) in
            encoder_tensors(&source, "lab_encoder.").iter().zip(encoder_tensors(&target, "lab_encoder."))
        {
            assert!(a.equal(&b), "{name} was not copied");
        }
    }

    #[test]
    fn unexpected_and_missing_names_are_listed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lab.safetensors");
        let mut named: Vec<(String, Tensor)> = encoder_tensors(&lab_store(1), "lab_encoder.")
            .into_iter()
            .filter(|(n, _)| !n.starts_with("norm."))
            .collect();
        named.push(("head.weight".into(), Tensor::zeros([2], (Kind::Float, Device::Cpu))));
        write(&path, &named);
        let before = encoder_tensors(&lab_store(2), "lab_encoder.");
        let target = lab_store(2);
        let err =
            load_encoder_weights(&target, "lab_encoder.", "model.lab_encoder_weights", &path).unwrap_err().to_string();
        assert!(err.starts_with(&format!("model.lab_encoder_weights = \"{}\":", path.display())), "{err}");
        assert!(err.contains("not parameters of the encoder: head.weight"), "{err}");
        assert!(err.contains("missing from the file: norm.bias, norm.weight"), "{err}");
        // Nothing was copied.
        for ((_, a), (_, b)) in before.iter().zip(encoder_tensors(&target, "lab_encoder.")) {
            assert!(a.equal(&b));
        }
    }

    #[test]
    fn unreadable_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lab.safetensors");
        std::fs::write(&path, b"garbage").unwrap();
        let err = load_encoder_weights(&lab_store(1), "lab_encoder.", "model.lab_encoder_weights", &path)
            .unwrap_err()
            .to_string();
        assert!(err.contains("lab.safetensors") && err.contains("cannot read it as safetensors"), "{err}");
    }
}
