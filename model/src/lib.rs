//! MedTVT-R1's networks on tch (libtorch).
//!
//! This crate owns every tensor computation of the system and nothing else: it has no notion of
//! processes, RPCs or runs. `runtime` reports what the linked libtorch can do; `llama` is the
//! language model (HF-exact Llama decoder, generation, scoring); `tokenizer` turns text into its ids;
//! `chat_template` renders a checkpoint's Jinja chat template and `special_tokens` reads its bos,
//! eos and pad tokens; `medtvt` assembles encoders, adapters, the MPL and the decoder into MedTVT-R1;
//! `policy` is the trait the learner and the rollout workers train and sample through.

pub mod adapter;
pub mod chat_template;
pub mod encoders;
pub mod llama;
pub mod medtvt;
pub mod perception;
pub mod policy;
pub mod runtime;
pub mod special_tokens;
pub mod tokenizer;

pub use llama::{
    generate, generate_from_embeds, load_llama, save_hf, score_completions, score_ids, Generation, KvCache, Llama,
    LlamaConfig, SamplingParams,
};
pub use medtvt::{MedTvt, ModalityConfig, ModelError, PromptBatch, TrainableSummary};
pub use tokenizer::MedTokenizer;
