//! `LlamaConfig`: the decoder's hyper-parameters, read from and written to HF `config.json`.
//!
//! Two on-disk dialects exist: transformers 4.x writes `rope_theta` + `rope_scaling` and
//! `torch_dtype`; transformers 5.x writes `rope_parameters` (with `rope_theta` inside) and
//! `dtype`. Both are read; `to_hf_json` writes both spellings so either version loads our
//! checkpoints. HF configs carry many fields we do not use (initializer_range, use_cache, ...),
//! so unknown fields are accepted rather than denied; fields that would change the maths
//! (`hidden_act`, `mlp_bias`, an unsupported `rope_type`) are checked instead.

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

/// Why a config could not be read or is not one this decoder can run.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read model config {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("model config {path} is not valid JSON for a Llama config: {source}")]
    Parse { path: PathBuf, source: serde_json::Error },
    #[error("model config {path}: unsupported architecture {found:?} (supported: LlamaForCausalLM / model_type llama, Qwen2ForCausalLM / model_type qwen2)")]
    UnknownArchitecture { path: PathBuf, found: String },
    #[error("model config {path}: field `{field}` = {value} is not supported: {why}")]
    Unsupported { path: PathBuf, field: &'static str, value: String, why: &'static str },
    #[error("model config {path}: field `{field}` is missing")]
    Missing { path: PathBuf, field: &'static str },
    #[error("model config {path}: field `{field}` = {value} is invalid: {why}")]
    Invalid { path: PathBuf, field: &'static str, value: String, why: String },
}

/// The Llama 3.1 frequency-dependent RoPE rescaling (`rope_type: "llama3"`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Llama3RopeScaling {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: i64,
}

/// Decoder hyper-parameters, normalised from either HF config dialect.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    /// "llama" or "qwen2" (Qwen2 = Llama with biases on q/k/v projections).
    pub model_type: String,
    pub vocab_size: i64,
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    pub num_key_value_heads: i64,
    /// Per-head width; HF's default is hidden_size / num_attention_heads.
    pub head_dim: i64,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: Option<Llama3RopeScaling>,
    pub max_position_embeddings: i64,
    pub tie_word_embeddings: bool,
    /// Llama's `attention_bias`: biases on q, k, v and o. Qwen2 always has q/k/v biases only.
    pub attention_bias: bool,
    pub bos_token_id: Option<i64>,
    /// Every id that ends a sequence (HF allows an int or a list).
    pub eos_token_ids: Vec<i64>,
    pub pad_token_id: Option<i64>,
    /// The checkpoint's stored precision ("float32", "bfloat16", "float16"), if stated.
    pub torch_dtype: Option<String>,
}

/// `eos_token_id` may be a single id or a list of ids.
#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(i64),
    Many(Vec<i64>),
}

/// The raw config.json, every dialect's fields optional; normalised by `LlamaConfig::from_raw`.
#[derive(Deserialize)]
struct RawConfig {
    architectures: Option<Vec<String>>,
    model_type: Option<String>,
    vocab_size: Option<i64>,
    hidden_size: Option<i64>,
    intermediate_size: Option<i64>,
    num_hidden_layers: Option<i64>,
    num_attention_heads: Option<i64>,
    num_key_value_heads: Option<i64>,
    head_dim: Option<i64>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_scaling: Option<Value>,
    rope_parameters: Option<Value>,
    max_position_embeddings: Option<i64>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
    hidden_act: Option<String>,
    use_sliding_window: Option<bool>,
    bos_token_id: Option<i64>,
    eos_token_id: Option<OneOrMany>,
    pad_token_id: Option<i64>,
    torch_dtype: Option<String>,
    dtype: Option<String>,
}

impl LlamaConfig {
    /// Reads an HF `config.json` (or a directory holding one).
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, ConfigError> {
        let mut path = path.as_ref().to_path_buf();
        if path.is_dir() {
            path = path.join("config.json");
        }
        let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read { path: path.clone(), source })?;
        Self::from_json_str(&text, &path)
    }

    /// Parses config.json text; `origin` only names the source in errors.
    pub fn from_json_str(text: &str, origin: &Path) -> Result<Self, ConfigError> {
        let raw: RawConfig =
            serde_json::from_str(text).map_err(|source| ConfigError::Parse { path: origin.to_path_buf(), source })?;
        Self::from_raw(raw, origin)
    }

    fn from_raw(raw: RawConfig, origin: &Path) -> Result<Self, ConfigError> {
        let path = origin.to_path_buf();
        let model_type = architecture_of(&raw, &path)?;
        let need =
            |v: Option<i64>, field: &'static str| v.ok_or_else(|| ConfigError::Missing { path: path.clone(), field });
        if let Some(act) = raw.hidden_act.as_deref().filter(|a| *a != "silu") {
            return Err(unsupported(&path, "hidden_act", act, "only SwiGLU with silu is implemented"));
        }
        if raw.mlp_bias == Some(true) {
            return Err(unsupported(&path, "mlp_bias", "true", "MLP biases are not implemented"));
        }
        if raw.use_sliding_window == Some(true) {
            return Err(unsupported(
                &path,
                "use_sliding_window",
                "true",
                "sliding-window attention is not implemented",
            ));
        }
        let hidden_size = need(raw.hidden_size, "hidden_size")?;
        let num_attention_heads = need(raw.num_attention_heads, "num_attention_heads")?;
        let (rope_theta, rope_scaling) = rope_of(&raw, &path)?;
        let config = LlamaConfig {
            vocab_size: need(raw.vocab_size, "vocab_size")?,
            intermediate_size: need(raw.intermediate_size, "intermediate_size")?,
            num_hidden_layers: need(raw.num_hidden_layers, "num_hidden_layers")?,
            num_key_value_heads: raw.num_key_value_heads.unwrap_or(num_attention_heads),
            head_dim: raw.head_dim.unwrap_or(hidden_size / num_attention_heads.max(1)),
            rms_norm_eps: raw.rms_norm_eps.unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            max_position_embeddings: raw.max_position_embeddings.unwrap_or(2048),
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
            attention_bias: raw.attention_bias.unwrap_or(false),
            bos_token_id: raw.bos_token_id,
            eos_token_ids: match raw.eos_token_id {
                None => Vec::new(),
                Some(OneOrMany::One(id)) => vec![id],
                Some(OneOrMany::Many(ids)) => ids,
            },
            pad_token_id: raw.pad_token_id,
            torch_dtype: raw.torch_dtype.or(raw.dtype),
            model_type,
            hidden_size,
            num_attention_heads,
        };
        config.validate(origin)?;
        Ok(config)
    }

    /// The benchmarks' random-weight shapes by name: `tiny` (3.4 M parameters), `small` (40 M) and
    /// `llama-1b` (Llama-3.2-1B: 1.24 B, its rope scaling included).
    pub fn bench_shape(name: &str) -> Option<Self> {
        match name {
            "tiny" => Some(Self::tiny(2048, 256, 688, 4, 8, 4)),
            "small" => Some(Self::tiny(32000, 512, 1376, 8, 8, 4)),
            "llama-1b" => {
                let mut c = Self::tiny(128256, 2048, 8192, 16, 32, 8);
                c.rope_theta = 500000.0;
                c.rope_scaling = Some(Llama3RopeScaling {
                    factor: 32.0,
                    low_freq_factor: 1.0,
                    high_freq_factor: 4.0,
                    original_max_position_embeddings: 8192,
                });
                Some(c)
            }
            _ => None,
        }
    }

    /// A small model for training from scratch: rope_theta 10000, tied embeddings, no scaling.
    pub fn tiny(vocab: i64, hidden: i64, intermediate: i64, layers: i64, heads: i64, kv_heads: i64) -> Self {
        LlamaConfig {
            model_type: "llama".into(),
            vocab_size: vocab,
            hidden_size: hidden,
            intermediate_size: intermediate,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            num_key_value_heads: kv_heads,
            head_dim: hidden / heads.max(1),
            rms_norm_eps: 1e-5,
            rope_theta: 10000.0,
            rope_scaling: None,
            max_position_embeddings: 4096,
            tie_word_embeddings: true,
            attention_bias: false,
            bos_token_id: None,
            eos_token_ids: Vec::new(),
            pad_token_id: None,
            torch_dtype: Some("float32".into()),
        }
    }

    /// Checks the sizes are positive and the heads divide as attention needs.
    pub fn validate(&self, origin: &Path) -> Result<(), ConfigError> {
        let invalid = |field: &'static str, value: i64, why: &str| ConfigError::Invalid {
            path: origin.to_path_buf(),
            field,
            value: value.to_string(),
            why: why.to_string(),
        };
        for (field, value) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("head_dim", self.head_dim),
            ("max_position_embeddings", self.max_position_embeddings),
        ] {
            if value <= 0 {
                return Err(invalid(field, value, "must be positive"));
            }
        }
        if self.num_attention_heads % self.num_key_value_heads != 0 {
            return Err(invalid(
                "num_key_value_heads",
                self.num_key_value_heads,
                &format!("must divide num_attention_heads = {}", self.num_attention_heads),
            ));
        }
        if self.head_dim % 2 != 0 {
            return Err(invalid("head_dim", self.head_dim, "rotary embeddings need an even head_dim"));
        }
        Ok(())
    }

    /// Whether q/k/v projections carry a bias (Qwen2 always; Llama when `attention_bias`).
    pub fn qkv_bias(&self) -> bool {
        self.model_type == "qwen2" || self.attention_bias
    }

    /// Whether the output projection carries a bias (Llama's `attention_bias` only).
    pub fn o_proj_bias(&self) -> bool {
        self.model_type != "qwen2" && self.attention_bias
    }

    /// The HF config.json for this model, readable by transformers 4.x and 5.x.
    pub fn to_hf_json(&self) -> Value {
        let architecture = if self.model_type == "qwen2" { "Qwen2ForCausalLM" } else { "LlamaForCausalLM" };
        let mut rope_parameters = json!({ "rope_type": "default", "rope_theta": self.rope_theta });
        let mut rope_scaling = Value::Null;
        if let Some(s) = &self.rope_scaling {
            let scaling = json!({
                "rope_type": "llama3",
                "factor": s.factor,
                "low_freq_factor": s.low_freq_factor,
                "high_freq_factor": s.high_freq_factor,
                "original_max_position_embeddings": s.original_max_position_embeddings,
            });
            rope_scaling = scaling.clone();
            rope_parameters = scaling;
            rope_parameters["rope_theta"] = json!(self.rope_theta);
        }
        let eos = match self.eos_token_ids.as_slice() {
            [] => Value::Null,
            [one] => json!(one),
            many => json!(many),
        };
        let dtype = self.torch_dtype.clone().unwrap_or_else(|| "float32".into());
        json!({
            "architectures": [architecture],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": rope_scaling,
            "rope_parameters": rope_parameters,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_bias,
            "mlp_bias": false,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos,
            "pad_token_id": self.pad_token_id,
            "torch_dtype": dtype,
            "dtype": dtype,
        })
    }
}

fn unsupported(path: &Path, field: &'static str, value: &str, why: &'static str) -> ConfigError {
    ConfigError::Unsupported { path: path.to_path_buf(), field, value: value.to_string(), why }
}

/// "llama" or "qwen2" from `model_type`, else from `architectures`.
fn architecture_of(raw: &RawConfig, path: &Path) -> Result<String, ConfigError> {
    let unknown = |found: String| ConfigError::UnknownArchitecture { path: path.to_path_buf(), found };
    if let Some(model_type) = &raw.model_type {
        return match model_type.as_str() {
            "llama" | "qwen2" => Ok(model_type.clone()),
            other => Err(unknown(other.to_string())),
        };
    }
    match raw.architectures.as_deref() {
        Some([arch, ..]) if arch == "LlamaForCausalLM" => Ok("llama".into()),
        Some([arch, ..]) if arch == "Qwen2ForCausalLM" => Ok("qwen2".into()),
        Some([arch, ..]) => Err(unknown(arch.clone())),
        _ => Err(unknown("neither model_type nor architectures given".into())),
    }
}

/// (rope_theta, llama3 scaling) from `rope_parameters` (transformers 5) or the 4.x fields.
fn rope_of(raw: &RawConfig, path: &Path) -> Result<(f64, Option<Llama3RopeScaling>), ConfigError> {
    let params = raw.rope_parameters.as_ref().filter(|v| !v.is_null());
    let scaling = params.or(raw.rope_scaling.as_ref().filter(|v| !v.is_null()));
    let theta = params.and_then(|p| p.get("rope_theta")).and_then(Value::as_f64).or(raw.rope_theta).unwrap_or(10000.0);
    let Some(scaling) = scaling else { return Ok((theta, None)) };
    let field = if params.is_some() { "rope_parameters" } else { "rope_scaling" };
    let rope_type =
        scaling.get("rope_type").or_else(|| scaling.get("type")).and_then(Value::as_str).unwrap_or("default");
    match rope_type {
        "default" => Ok((theta, None)),
        "llama3" => {
            let num = |key: &str| scaling.get(key).and_then(Value::as_f64);
            let parsed = (|| {
                Some(Llama3RopeScaling {
                    factor: num("factor")?,
                    low_freq_factor: num("low_freq_factor")?,
                    high_freq_factor: num("high_freq_factor")?,
                    original_max_position_embeddings: scaling
                        .get("original_max_position_embeddings")
                        .and_then(Value::as_i64)
                        .or(raw.max_position_embeddings)?,
                })
            })();
            let scaling_ok = parsed.filter(|s| s.high_freq_factor != s.low_freq_factor && s.factor > 0.0);
            scaling_ok.map(|s| (theta, Some(s))).ok_or_else(|| ConfigError::Invalid {
                path: path.to_path_buf(),
                field,
                value: scaling.to_string(),
                why: "llama3 scaling needs factor > 0, low_freq_factor != high_freq_factor and original_max_position_embeddings".into(),
            })
        }
        other => Err(unsupported(path, field, other, "only rope_type default and llama3 are implemented")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<LlamaConfig, ConfigError> {
        LlamaConfig::from_json_str(text, Path::new("test/config.json"))
    }

    const LEGACY: &str = r#"{
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256,
        "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
        "num_attention_heads": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-05,
        "rope_theta": 500000.0, "max_position_embeddings": 131072, "tie_word_embeddings": true,
        "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "torch_dtype": "bfloat16"
    }"#;

    #[test]
    fn reads_transformers4_llama32_config() {
        let c = parse(LEGACY).unwrap();
        assert_eq!(c.head_dim, 64);
        assert_eq!(c.rope_theta, 500000.0);
        assert_eq!(c.rope_scaling.as_ref().map(|s| s.factor), Some(32.0));
        assert_eq!(c.eos_token_ids, vec![128001, 128008, 128009]);
        assert_eq!(c.torch_dtype.as_deref(), Some("bfloat16"));
        assert!(!c.qkv_bias());
    }

    #[test]
    fn reads_transformers5_rope_parameters_and_single_eos() {
        let text = r#"{"model_type": "llama", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
            "num_hidden_layers": 1, "num_attention_heads": 2, "eos_token_id": 2, "dtype": "float32",
            "rope_parameters": {"rope_type": "default", "rope_theta": 1234.0}}"#;
        let c = parse(text).unwrap();
        assert_eq!(c.rope_theta, 1234.0);
        assert_eq!(c.rope_scaling, None);
        assert_eq!(c.num_key_value_heads, 2);
        assert_eq!(c.eos_token_ids, vec![2]);
        assert_eq!(c.torch_dtype.as_deref(), Some("float32"));
    }

    #[test]
    fn to_hf_json_roundtrips() {
        let c = parse(LEGACY).unwrap();
        let back = parse(&c.to_hf_json().to_string()).unwrap();
        assert_eq!(back, c);
        let tiny = LlamaConfig::tiny(100, 32, 64, 2, 4, 2);
        assert_eq!(parse(&tiny.to_hf_json().to_string()).unwrap(), tiny);
    }

    #[test]
    fn qwen2_has_qkv_bias_only() {
        let text = LEGACY.replace("\"model_type\": \"llama\"", "\"model_type\": \"qwen2\"");
        let c = parse(&text).unwrap();
        assert!(c.qkv_bias() && !c.o_proj_bias());
        assert_eq!(c.to_hf_json()["architectures"][0], "Qwen2ForCausalLM");
    }

    #[test]
    fn errors_name_the_problem() {
        let err = parse(&LEGACY.replace("\"model_type\": \"llama\"", "\"model_type\": \"mistral\"")).unwrap_err();
        assert!(matches!(err, ConfigError::UnknownArchitecture { ref found, .. } if found == "mistral"), "{err}");
        assert!(err.to_string().contains("test/config.json"));
        let err = parse(&LEGACY.replace("\"llama3\"", "\"yarn\"")).unwrap_err();
        assert!(err.to_string().contains("yarn"), "{err}");
        let err = parse(&LEGACY.replace("\"vocab_size\": 128256,", "")).unwrap_err();
        assert!(err.to_string().contains("vocab_size"), "{err}");
        let err = parse(&LEGACY.replace("\"num_key_value_heads\": 8", "\"num_key_value_heads\": 7")).unwrap_err();
        assert!(err.to_string().contains("num_key_value_heads"), "{err}");
        let err = LlamaConfig::from_file("/nonexistent/dir/config.json").unwrap_err();
        assert!(matches!(err, ConfigError::Read { .. }) && err.to_string().contains("/nonexistent/dir/config.json"));
    }
}
