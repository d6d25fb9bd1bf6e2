//! Learner checkpoints: weights, optimizer state and the trainer state (optimizer and AdamW step
//! counts) in one directory per step, written atomically and verified on load. Where the data
//! stands is not here: the coordinator owns the data order and journals it (a learner never picks
//! its own samples), and training draws no random numbers, so there is no RNG state to keep.
//!
//! Layout: `<dir>/step-00000042/{weights.safetensors, optimizer.safetensors, trainer_state.json}`.
//! A checkpoint is written into `step-00000042.tmp`, every file is fsynced, `trainer_state.json`
//! (which holds the SHA-256 of the two tensor files) is written last, and the directory is then
//! renamed into place. A crash leaves at most a `.tmp` directory, which is ignored; a checkpoint
//! whose files do not match their checksums is reported and skipped in favour of the previous one.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use tch::Tensor;

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("checkpoint {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("checkpoint {path}: {source}")]
    Tensor { path: PathBuf, source: tch::TchError },
    #[error("checkpoint {path}: trainer_state.json: {source}")]
    State { path: PathBuf, source: serde_json::Error },
    #[error("checkpoint {path}: {file} is corrupt (sha256 {found}, expected {expected})")]
    Corrupt { path: PathBuf, file: String, found: String, expected: String },
    #[error("checkpoint {path}: tensor `{name}` is missing")]
    MissingTensor { path: PathBuf, name: String },
}

/// Everything but tensors that a resumed learner needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimizer steps completed.
    pub step: u64,
    /// AdamW's update count (t).
    pub adam_steps: u64,
    /// SHA-256 of weights.safetensors and optimizer.safetensors.
    pub weights_sha256: String,
    pub optimizer_sha256: String,
}

/// What goes into a checkpoint.
pub struct CheckpointContent<'a> {
    pub weights: &'a [(String, Tensor)],
    /// Optimizer moments, named e.g. `exp_avg.<param>` / `exp_avg_sq.<param>`.
    pub optimizer: &'a [(String, Tensor)],
    pub state: TrainerState,
}

/// A checkpoint read back and verified.
pub struct LoadedCheckpoint {
    pub path: PathBuf,
    pub weights: Vec<(String, Tensor)>,
    pub optimizer: Vec<(String, Tensor)>,
    pub state: TrainerState,
}

pub fn step_dir(root: &Path, step: u64) -> PathBuf {
    root.join(format!("step-{step:08}"))
}

/// Writes a checkpoint for `content.state.step` atomically; returns its directory.
pub fn save(root: &Path, mut content: CheckpointContent<'_>) -> Result<PathBuf, CheckpointError> {
    let final_dir = step_dir(root, content.state.step);
    let tmp = final_dir.with_extension("tmp");
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| CheckpointError::Io { path, source }
    };
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
    }
    std::fs::create_dir_all(&tmp).map_err(io(&tmp))?;
    content.state.weights_sha256 = write_tensors(&tmp.join("weights.safetensors"), content.weights)?;
    content.state.optimizer_sha256 = write_tensors(&tmp.join("optimizer.safetensors"), content.optimizer)?;
    let state_path = tmp.join("trainer_state.json");
    let json = serde_json::to_vec_pretty(&content.state)
        .map_err(|source| CheckpointError::State { path: tmp.clone(), source })?;
    write_synced(&state_path, &json)?;
    if final_dir.exists() {
        std::fs::remove_dir_all(&final_dir).map_err(io(&final_dir))?;
    }
    std::fs::rename(&tmp, &final_dir).map_err(io(&final_dir))?;
    sync_dir(root)?;
    Ok(final_dir)
}

/// Loads and verifies one checkpoint directory.
pub fn load(dir: &Path) -> Result<LoadedCheckpoint, CheckpointError> {
    let state_path = dir.join("trainer_state.json");
    let text = std::fs::read(&state_path).map_err(|source| CheckpointError::Io { path: state_path.clone(), source })?;
    let state: TrainerState =
        serde_json::from_slice(&text).map_err(|source| CheckpointError::State { path: dir.to_path_buf(), source })?;
    let weights = read_verified(dir, "weights.safetensors", &state.weights_sha256)?;
    let optimizer = read_verified(dir, "optimizer.safetensors", &state.optimizer_sha256)?;
    Ok(LoadedCheckpoint { path: dir.to_path_buf(), weights, optimizer, state })
}

/// The newest checkpoint under `root` that verifies; broken ones are returned in `skipped` with
/// the reason, newest first.
pub fn latest_valid(root: &Path) -> (Option<LoadedCheckpoint>, Vec<CheckpointError>) {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(root)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_dir() && p.extension().is_none())
        .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("step-")))
        .collect();
    dirs.sort();
    let mut skipped = Vec::new();
    for dir in dirs.iter().rev() {
        match load(dir) {
            Ok(ckpt) => return (Some(ckpt), skipped),
            Err(e) => skipped.push(e),
        }
    }
    (None, skipped)
}

/// Looks a tensor up by name in a loaded list.
pub fn find<'a>(tensors: &'a [(String, Tensor)], name: &str, path: &Path) -> Result<&'a Tensor, CheckpointError> {
    tensors
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, t)| t)
        .ok_or_else(|| CheckpointError::MissingTensor { path: path.to_path_buf(), name: name.to_string() })
}

fn write_tensors(path: &Path, tensors: &[(String, Tensor)]) -> Result<String, CheckpointError> {
    let cpu: Vec<(String, Tensor)> =
        tensors.iter().map(|(n, t)| (n.clone(), t.detach().to_device(tch::Device::Cpu).contiguous())).collect();
    Tensor::write_safetensors(&cpu, path)
        .map_err(|source| CheckpointError::Tensor { path: path.to_path_buf(), source })?;
    let bytes = std::fs::read(path).map_err(|source| CheckpointError::Io { path: path.to_path_buf(), source })?;
    let file = std::fs::File::open(path).map_err(|source| CheckpointError::Io { path: path.to_path_buf(), source })?;
    file.sync_all().map_err(|source| CheckpointError::Io { path: path.to_path_buf(), source })?;
    Ok(hex(&Sha256::digest(&bytes)))
}

fn read_verified(dir: &Path, file: &str, expected: &str) -> Result<Vec<(String, Tensor)>, CheckpointError> {
    let path = dir.join(file);
    let bytes = std::fs::read(&path).map_err(|source| CheckpointError::Io { path: path.clone(), source })?;
    let found = hex(&Sha256::digest(&bytes));
    if found != expected {
        return Err(CheckpointError::Corrupt {
            path: dir.to_path_buf(),
            file: file.to_string(),
            found,
            expected: expected.to_string(),
        });
    }
    Tensor::read_safetensors(&path).map_err(|source| CheckpointError::Tensor { path, source })
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), CheckpointError> {
    use std::io::Write;
    let io = |source| CheckpointError::Io { path: path.to_path_buf(), source };
    let mut f = std::fs::File::create(path).map_err(io)?;
    f.write_all(bytes).map_err(io)?;
    f.sync_all().map_err(io)
}

fn sync_dir(dir: &Path) -> Result<(), CheckpointError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|source| CheckpointError::Io { path: dir.to_path_buf(), source })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    fn state(step: u64) -> TrainerState {
        TrainerState { step, adam_steps: step, weights_sha256: String::new(), optimizer_sha256: String::new() }
    }

    fn save_step(root: &Path, step: u64) -> Tensor {
        let w = Tensor::randn([3, 4], (Kind::Float, Device::Cpu));
        let weights = vec![("layer.weight".to_string(), w.shallow_clone())];
        let optimizer = vec![("exp_avg.layer.weight".to_string(), w.ones_like())];
        save(root, CheckpointContent { weights: &weights, optimizer: &optimizer, state: state(step) }).unwrap();
        w
    }

    #[test]
    fn round_trip_restores_tensors_and_state_exactly() {
        let root = tempfile::tempdir().unwrap();
        let w = save_step(root.path(), 10);
        let ckpt = load(&step_dir(root.path(), 10)).unwrap();
        assert!(find(&ckpt.weights, "layer.weight", &ckpt.path).unwrap().equal(&w));
        assert_eq!((ckpt.state.step, ckpt.state.adam_steps), (10, 10));
        assert_eq!(ckpt.state.weights_sha256.len(), 64);
        assert!(!step_dir(root.path(), 10).with_extension("tmp").exists());
    }

    #[test]
    fn corrupt_newest_checkpoint_falls_back_to_the_previous_one() {
        let root = tempfile::tempdir().unwrap();
        let _ = save_step(root.path(), 1);
        let _ = save_step(root.path(), 2);
        let victim = step_dir(root.path(), 2).join("weights.safetensors");
        let mut bytes = std::fs::read(&victim).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        std::fs::write(&victim, bytes).unwrap();
        // A half-written checkpoint (no rename happened) is ignored too.
        std::fs::create_dir_all(root.path().join("step-00000003.tmp")).unwrap();
        let (found, skipped) = latest_valid(root.path());
        assert_eq!(found.unwrap().state.step, 1);
        assert_eq!(skipped.len(), 1);
        assert!(skipped[0].to_string().contains("weights.safetensors is corrupt"), "{}", skipped[0]);
    }

    #[test]
    fn missing_state_file_is_named() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("step-00000005")).unwrap();
        let (found, skipped) = latest_valid(root.path());
        assert!(found.is_none());
        assert!(skipped[0].to_string().contains("trainer_state.json"), "{}", skipped[0]);
    }
}
