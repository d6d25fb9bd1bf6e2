//! What the learner and the rollout workers need from the policy network, as one trait.
//!
//! The training and rollout loops are written against [`Policy`] rather than against
//! [`crate::medtvt::MedTvt`] directly, so that the loops (loss assembly, gradient accumulation,
//! the collective, checkpoints, weight publication, sampling and rewarding) can be tested in
//! isolation with a small real network ([`byte_policy`], behind the `test-policy` feature). The
//! MedTVT-R1 implementation is [`medtvt::MedTvtPolicy`]. The trait lives beside the model so that
//! the learner and the rollout worker both reach it without reaching into each other.

#[cfg(any(test, feature = "test-policy"))]
pub mod byte_policy;
pub mod medtvt;

use medtvt_config::{RunConfig, Stage};
use medtvt_data::ModalityInputs;
use std::path::Path;
use tch::{Device, Tensor};

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("model: {0}")]
    Model(String),
    #[error("tokenizer {path}: {problem}")]
    Tokenizer { path: std::path::PathBuf, problem: String },
    #[error("weights: tensor `{name}`: {problem}")]
    Weights { name: String, problem: String },
}

/// Sampling settings of one rollout call (GRPO's `grpo.*` plus a per-call seed).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RolloutSampling {
    pub max_new_tokens: usize,
    pub temperature: f64,
    pub top_p: f64,
    /// 0 disables top-k.
    pub top_k: usize,
    pub seed: u64,
}

/// Sampled completions, one row per prompt row of the batch.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampled {
    /// Completion token ids (the end token included when generation stopped on it).
    pub tokens: Vec<Vec<i64>>,
    /// The sampling policy's log-probability of each of those tokens.
    pub logprobs: Vec<Vec<f32>>,
    pub finished_by_eos: Vec<bool>,
}

/// How many tensors `set_trainable` left trainable and which groups they belong to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrainableCount {
    pub trainable: usize,
    pub frozen: usize,
    pub groups: Vec<String>,
}

/// A multimodal causal LM the learner can train and a worker can sample from.
pub trait Policy: Sized {
    /// A tokenised, padded batch of prompts with their modality tensors.
    type Prompts;

    /// Builds the model a run config describes: `model.checkpoint` when set, else the
    /// from-scratch tiny model with the tokenizer at `tokenizer` (required then).
    fn load(config: &RunConfig, device: Device, tokenizer: Option<&Path>) -> Result<Self, PolicyError>;

    /// Trains the from-scratch tokenizer on `texts` and writes it to `out` (a tokenizer.json).
    fn train_tokenizer(texts: &[String], vocab_size: usize, out: &Path) -> Result<(), PolicyError>;

    /// Freezes what `stage` does not train (`all`: train everything, for a from-scratch model).
    fn set_trainable(&mut self, stage: Stage, all: bool) -> TrainableCount;

    fn device(&self) -> Device;

    /// Side of the square X-ray input the model takes, in pixels.
    fn image_size(&self) -> usize;

    /// `(question, inputs)` pairs -> a left-padded prompt batch of at most `max_prompt_tokens`.
    fn encode_prompts(
        &self,
        prompts: &[(String, ModalityInputs)],
        max_prompt_tokens: usize,
    ) -> Result<Self::Prompts, PolicyError>;

    /// Each prompt row repeated `times` times in place: rows r, r, .., r+1, r+1, ...
    fn repeat_prompts(&self, prompts: &Self::Prompts, times: i64) -> Self::Prompts;

    /// Reference answers -> right-padded ids `[b, tc]` and the mask: an answer of at most
    /// `max_tokens` tokens gets the end token appended; a longer one is cut to `max_tokens`
    /// and gets none (the model must not learn to stop where the cut fell).
    fn encode_answers(&self, texts: &[String], max_tokens: usize) -> Result<(Tensor, Tensor), PolicyError>;

    /// `[b, tc]` log-probabilities of `completion_ids` after each prompt at `temperature`;
    /// differentiable (train mode when `train`).
    fn score(
        &self,
        prompts: &Self::Prompts,
        completion_ids: &Tensor,
        completion_mask: &Tensor,
        temperature: f64,
        train: bool,
    ) -> Tensor;

    /// Samples one completion per prompt row (no grad, eval mode).
    fn sample(&self, prompts: &Self::Prompts, sampling: &RolloutSampling) -> Result<Sampled, PolicyError>;

    fn decode(&self, ids: &[i64]) -> String;

    /// Every variable of the model by name (shallow clones), in a fixed order.
    fn all_tensors(&self) -> Vec<(String, Tensor)>;

    /// The trainable variables by name (shallow clones), in a fixed order.
    fn trainable_tensors(&self) -> Vec<(String, Tensor)>;

    /// Copies `named` into the variables of the same names (no grad).
    fn copy_named_tensors(&mut self, named: &[(String, Tensor)]) -> Result<(), PolicyError>;

    /// Writes the whole model and its tokenizer to `dir`, loadable again as `model.checkpoint`.
    fn save(&self, dir: &Path) -> Result<(), PolicyError>;
}
