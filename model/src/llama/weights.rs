//! HF checkpoints <-> tch VarStores: loading `*.safetensors` (one file or shards listed in
//! `model.safetensors.index.json`) into variables named exactly as HF names them, saving a
//! VarStore back as `model.safetensors` + `config.json`, and the one place that decides which
//! device/dtype pairs we run.
//!
//! Precision policy: f32 runs everywhere; bf16 runs on CPU and CUDA; f16 is refused on CPU
//! (CPU half-precision kernels are slow and accumulate in less range than bf16 — use bf16 there)
//! and allowed on CUDA. Stored tensors of any of F32/BF16/F16 are converted to the VarStore's kind.

use super::config::{ConfigError, LlamaConfig};
use super::model::Llama;
use super::resize::{grow_rows_with_mean, VOCAB_TENSORS};
use safetensors::{Dtype, SafeTensors};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use tch::{nn, Device, Kind, Tensor};

/// Why weights could not be loaded or saved.
#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    #[error("no weights in {dir}: expected model.safetensors or model.safetensors.index.json")]
    NoWeights { dir: PathBuf },
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
    #[error("{path} is not a valid safetensors file: {source}")]
    Format { path: PathBuf, source: safetensors::SafeTensorError },
    #[error("{path} is not a valid shard index (needs a \"weight_map\" of tensor -> file): {source}")]
    Index { path: PathBuf, source: serde_json::Error },
    #[error("tensor `{name}` is missing from {origin} ({missing} model tensors missing in all)")]
    Missing { name: String, origin: PathBuf, missing: usize },
    #[error("tensor `{name}` in {path} has shape {found:?}, the model expects {expected:?}")]
    Shape { name: String, path: PathBuf, found: Vec<i64>, expected: Vec<i64> },
    #[error("tensor `{name}` in {path} has dtype {dtype}; only F32, BF16 and F16 weights are supported")]
    Dtype { name: String, path: PathBuf, dtype: String },
    #[error("cannot save tensor `{name}` of kind {kind:?}: only f32, bf16 and f16 are written")]
    SaveKind { name: String, kind: Kind },
    #[error("cannot run {kind:?} weights on {device:?}: {why}")]
    Unsupported { device: Device, kind: Kind, why: &'static str },
    #[error("unknown dtype {0:?}: use f32, bf16 or f16")]
    UnknownDtype(String),
    #[error(transparent)]
    Config(#[from] ConfigError),
}

/// Parses a user-facing dtype name ("f32"/"float32", "bf16"/"bfloat16", "f16"/"float16"/"half").
pub fn kind_from_name(name: &str) -> Result<Kind, WeightsError> {
    match name.to_ascii_lowercase().as_str() {
        "f32" | "float32" | "float" => Ok(Kind::Float),
        "bf16" | "bfloat16" => Ok(Kind::BFloat16),
        "f16" | "float16" | "half" => Ok(Kind::Half),
        _ => Err(WeightsError::UnknownDtype(name.to_string())),
    }
}

/// The HF config spelling of a kind.
pub fn hf_dtype_name(kind: Kind) -> Option<&'static str> {
    match kind {
        Kind::Float => Some("float32"),
        Kind::BFloat16 => Some("bfloat16"),
        Kind::Half => Some("float16"),
        _ => None,
    }
}

/// Whether the decoder may run with weights of `kind` on `device` (see the module doc).
pub fn check_device_kind(device: Device, kind: Kind) -> Result<(), WeightsError> {
    let unsupported = |why| Err(WeightsError::Unsupported { device, kind, why });
    if let Device::Cuda(index) = device {
        if !tch::Cuda::is_available() || index >= tch::Cuda::device_count() as usize {
            return unsupported("no such CUDA device in this process");
        }
    }
    match (device, kind) {
        (_, Kind::Float) | (Device::Cpu | Device::Cuda(_), Kind::BFloat16) | (Device::Cuda(_), Kind::Half) => Ok(()),
        (Device::Cpu, Kind::Half) => unsupported("f16 is refused on CPU (slow kernels, narrow range); use bf16 or f32"),
        (_, Kind::BFloat16 | Kind::Half) => unsupported("only CPU and CUDA devices are supported for 16-bit weights"),
        _ => unsupported("weights must be f32, bf16 or f16"),
    }
}

/// The safetensors files of a checkpoint: `src` itself if it is a file, else the shards named by
/// `src/model.safetensors.index.json`, else `src/model.safetensors`.
pub fn weight_files(src: &Path) -> Result<Vec<PathBuf>, WeightsError> {
    if src.is_file() {
        return Ok(vec![src.to_path_buf()]);
    }
    let index = src.join("model.safetensors.index.json");
    if index.is_file() {
        #[derive(serde::Deserialize)]
        struct ShardIndex {
            weight_map: BTreeMap<String, String>,
        }
        let text =
            std::fs::read_to_string(&index).map_err(|source| WeightsError::Read { path: index.clone(), source })?;
        let parsed: ShardIndex =
            serde_json::from_str(&text).map_err(|source| WeightsError::Index { path: index.clone(), source })?;
        let shards: BTreeSet<String> = parsed.weight_map.into_values().collect();
        return Ok(shards.into_iter().map(|f| src.join(f)).collect());
    }
    let single = src.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    Err(WeightsError::NoWeights { dir: src.to_path_buf() })
}

fn kind_of(dtype: Dtype) -> Option<Kind> {
    match dtype {
        Dtype::F32 => Some(Kind::Float),
        Dtype::BF16 => Some(Kind::BFloat16),
        Dtype::F16 => Some(Kind::Half),
        _ => None,
    }
}

fn dtype_of(kind: Kind) -> Option<Dtype> {
    match kind {
        Kind::Float => Some(Dtype::F32),
        Kind::BFloat16 => Some(Dtype::BF16),
        Kind::Half => Some(Dtype::F16),
        _ => None,
    }
}

/// Copies the checkpoint at `src` (file or directory) into every variable of `vs` whose name
/// starts with `prefix`; the tensor looked up is the name without the prefix, so a decoder built
/// under `vs.root() / "llm"` loads with prefix `"llm."`. Tensors the model does not have (e.g. a
/// stored `lm_head.weight` of a tied model) are ignored; a missing tensor or a shape mismatch is
/// an error naming the tensor.
pub fn load_weights(vs: &nn::VarStore, src: &Path, prefix: &str) -> Result<(), WeightsError> {
    load_weights_growing_vocab(vs, src, prefix, None)
}

/// [`load_weights`] into a decoder whose vocabulary grew: with `stored_vocab = Some(n)`, the
/// vocabulary tensors ([`super::resize::VOCAB_TENSORS`]) may hold `n` rows where the model has
/// more; the stored rows are copied and the new ones initialised as transformers'
/// `resize_token_embeddings` does (see [`super::resize`]). Every other shape must match.
pub fn load_weights_growing_vocab(
    vs: &nn::VarStore,
    src: &Path,
    prefix: &str,
    stored_vocab: Option<i64>,
) -> Result<(), WeightsError> {
    let files = weight_files(src)?;
    let mut pending: HashMap<String, Tensor> = vs
        .variables()
        .into_iter()
        .filter_map(|(name, var)| name.strip_prefix(prefix).map(|hf| (hf.to_string(), var)))
        .collect();
    for path in &files {
        let bytes = std::fs::read(path).map_err(|source| WeightsError::Read { path: path.clone(), source })?;
        let file =
            SafeTensors::deserialize(&bytes).map_err(|source| WeightsError::Format { path: path.clone(), source })?;
        // Name order, so the first error reported does not depend on hash order.
        let mut tensors = file.tensors();
        tensors.sort_by(|a, b| a.0.cmp(&b.0));
        for (name, view) in &tensors {
            let name = name.as_str();
            let Some(var) = pending.get(name) else { continue };
            let found: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
            let expected = var.size();
            let grows = stored_vocab.is_some_and(|n| {
                VOCAB_TENSORS.contains(&name)
                    && found.len() == 2
                    && found[0] == n
                    && n < expected[0]
                    && found[1] == expected[1]
            });
            if found != expected && !grows {
                return Err(WeightsError::Shape { name: name.to_string(), path: path.clone(), found, expected });
            }
            let kind = kind_of(view.dtype()).ok_or_else(|| WeightsError::Dtype {
                name: name.to_string(),
                path: path.clone(),
                dtype: format!("{:?}", view.dtype()),
            })?;
            let mut stored = Tensor::from_data_size(view.data(), &found, kind);
            if grows {
                stored = grow_rows_with_mean(&stored, expected[0]);
            }
            tch::no_grad(|| var.shallow_clone().copy_(&stored));
            pending.remove(name);
        }
    }
    let mut missing: Vec<&String> = pending.keys().collect();
    missing.sort();
    match missing.first() {
        None => Ok(()),
        Some(name) => {
            Err(WeightsError::Missing { name: name.to_string(), origin: src.to_path_buf(), missing: missing.len() })
        }
    }
}

/// Reads `dir/config.json`, builds the decoder on `device` in `kind` and loads `dir`'s weights.
pub fn load_llama(dir: &Path, device: Device, kind: Kind) -> Result<(nn::VarStore, Llama), WeightsError> {
    let config = LlamaConfig::from_file(dir.join("config.json"))?;
    check_device_kind(device, kind)?;
    let mut vs = nn::VarStore::new(device);
    vs.set_kind(kind);
    let model = Llama::new(&vs.root(), &config);
    load_weights(&vs, dir, "")?;
    Ok((vs, model))
}

/// Writes every variable of `vs` to `dir/model.safetensors` under its HF name and `config`
/// (with `torch_dtype` set to the weights' kind) to `dir/config.json`: the layout
/// `LlamaForCausalLM.from_pretrained(dir)` reads.
pub fn save_hf(vs: &nn::VarStore, config: &LlamaConfig, dir: &Path) -> Result<(), WeightsError> {
    save_hf_with_prefix(vs, "", config, dir)
}

/// `save_hf` for the variables under `prefix` only (e.g. `"llm."` of a multimodal model), written
/// without the prefix.
pub fn save_hf_with_prefix(
    vs: &nn::VarStore,
    prefix: &str,
    config: &LlamaConfig,
    dir: &Path,
) -> Result<(), WeightsError> {
    std::fs::create_dir_all(dir).map_err(|source| WeightsError::Write { path: dir.to_path_buf(), source })?;
    let mut stored: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    let mut kinds: Vec<Kind> = Vec::new();
    let mut variables: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    variables.sort_by(|a, b| a.0.cmp(&b.0));
    for (name, var) in variables {
        let Some(hf_name) = name.strip_prefix(prefix) else { continue };
        let dtype =
            dtype_of(var.kind()).ok_or_else(|| WeightsError::SaveKind { name: name.clone(), kind: var.kind() })?;
        let cpu = var.detach().to_device(Device::Cpu).contiguous();
        let numel = cpu.numel();
        let mut bytes = vec![0u8; numel * cpu.kind().elt_size_in_bytes()];
        cpu.copy_data_u8(&mut bytes, numel);
        let shape = cpu.size().iter().map(|&d| d as usize).collect();
        kinds.push(var.kind());
        stored.push((hf_name.to_string(), dtype, shape, bytes));
    }
    let views = stored
        .iter()
        .map(|(name, dtype, shape, bytes)| {
            safetensors::tensor::TensorView::new(*dtype, shape.clone(), bytes).map(|view| (name.clone(), view))
        })
        .collect::<Result<Vec<_>, _>>();
    let path = dir.join("model.safetensors");
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    views
        .and_then(|views| safetensors::serialize_to_file(views, Some(metadata), &path))
        .map_err(|source| WeightsError::Format { path: path.clone(), source })?;

    let mut config = config.clone();
    if let Some(&first) = kinds.first().filter(|&&first| kinds.iter().all(|&k| k == first)) {
        config.torch_dtype = hf_dtype_name(first).map(str::to_string);
    }
    let config_path = dir.join("config.json");
    let text = serde_json::to_string_pretty(&config.to_hf_json()).unwrap_or_default();
    std::fs::write(&config_path, text + "\n").map_err(|source| WeightsError::Write { path: config_path, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dtype_policy() {
        assert!(check_device_kind(Device::Cpu, Kind::Float).is_ok());
        assert!(check_device_kind(Device::Cpu, Kind::BFloat16).is_ok());
        let err = check_device_kind(Device::Cpu, Kind::Half).unwrap_err();
        assert!(err.to_string().contains("f16"), "{err}");
        assert!(check_device_kind(Device::Cpu, Kind::Int64).is_err());
        if !tch::Cuda::is_available() {
            assert!(check_device_kind(Device::Cuda(0), Kind::Float).is_err());
        }
        assert_eq!(kind_from_name("BF16").ok(), Some(Kind::BFloat16));
        assert!(kind_from_name("f8").is_err());
    }

    #[test]
    fn missing_directory_names_it() {
        let err = weight_files(Path::new("/nonexistent/ckpt")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/ckpt"), "{err}");
    }
}
