//! A Llama-family decoder (Llama 2/3, Qwen2) in tch that reproduces HF transformers' logits,
//! with HF-named weights, a preallocated KV cache, batched seeded sampling and the teacher-forced
//! scoring the GRPO learner needs.
//!
//! - `config`: `LlamaConfig` from/to HF config.json
//! - `weights`: safetensors load/save, dtype/device policy
//! - `resize`: new vocabulary rows for tokens added to the tokenizer (transformers' mean init)
//! - `model`: the network and `KvCache`
//! - `generate`: batched generation over ragged prompts (one prefill per GRPO group)
//! - `engine`: continuous batching, decode slots that GRPO groups flow through
//! - `score`: log-probs of given completions

pub mod config;
pub mod engine;
pub mod generate;
pub mod model;
pub mod resize;
pub mod score;
pub mod weights;

pub use config::{ConfigError, Llama3RopeScaling, LlamaConfig};
pub use engine::{ContinuousBatch, FinishedGroup, GroupRequest};
pub use generate::{
    generate, generate_from_embeds, generate_groups_from_embeds, left_pad, GenerateError, Generation, SamplingParams,
};
pub use model::{KvCache, Llama};
pub use score::{score_completions, score_ids};
pub use weights::{
    check_device_kind, kind_from_name, load_llama, load_weights, load_weights_growing_vocab, save_hf,
    save_hf_with_prefix, WeightsError,
};
