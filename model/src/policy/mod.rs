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

/// One group of a continuous rollout batch: `group_size` completions of one prompt, row j drawing
/// from random stream (`seed`, j).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupSpec {
    /// The caller's name for the group, returned with its completions.
    pub id: u64,
    pub group_size: usize,
    pub seed: u64,
}

/// A group whose completions all ended.
#[derive(Debug, Clone, PartialEq)]
pub struct FinishedRollout {
    pub id: u64,
    /// Its completions in row order.
    pub sampled: Sampled,
    /// Per completion, the policy version that sampled each token (the `version` of the step).
    pub token_versions: Vec<Vec<u64>>,
}

/// Rollouts that GRPO groups flow through ([`Policy::rollout_engine`]): groups are submitted when
/// there is room and come back as soon as all their completions ended. The policy is passed to
/// every call, so its weights may change between steps (the rows go on with the new ones, and
/// each token records the version that sampled it).
pub trait RolloutEngine<P: Policy> {
    /// Queues `groups`, one per row of `prompts` (distinct prompts, not repeated).
    fn submit(&mut self, policy: &P, prompts: &P::Prompts, groups: &[GroupSpec]) -> Result<(), PolicyError>;
    /// Does one unit of work (admit and decode one token, or a whole queued batch) with the
    /// policy at `version`, and returns the groups that ended.
    fn step(&mut self, policy: &P, version: u64) -> Result<Vec<FinishedRollout>, PolicyError>;
    /// Drops groups `ids` (queued or being generated).
    fn cancel(&mut self, ids: &[u64]);
    /// Completion slots neither busy nor promised to a queued group.
    fn free_slots(&self) -> usize;
    /// Nothing queued and nothing being generated.
    fn is_idle(&self) -> bool;
}

/// The fallback [`RolloutEngine`]: each submitted batch is sampled whole, in one
/// [`Policy::sample`] call over its prompts repeated in place (seeded by its first group's seed),
/// one batch per step. Policies with a decode loop of their own do better (MedTVT: continuous
/// batching).
pub struct BatchRollouts<P: Policy> {
    slots: usize,
    sampling: RolloutSampling,
    queued: std::collections::VecDeque<(P::Prompts, Vec<GroupSpec>)>,
    cancelled: std::collections::HashSet<u64>,
}

impl<P: Policy> BatchRollouts<P> {
    pub fn new(slots: usize, sampling: &RolloutSampling) -> Self {
        BatchRollouts { slots, sampling: *sampling, queued: Default::default(), cancelled: Default::default() }
    }

    fn queued_rows(&self) -> usize {
        self.queued.iter().flat_map(|(_, groups)| groups).map(|g| g.group_size).sum()
    }
}

impl<P: Policy> RolloutEngine<P> for BatchRollouts<P> {
    fn submit(&mut self, policy: &P, prompts: &P::Prompts, groups: &[GroupSpec]) -> Result<(), PolicyError> {
        let Some(first) = groups.first() else { return Ok(()) };
        if groups.iter().any(|g| g.group_size != first.group_size) {
            return Err(PolicyError::Model("one batch of groups must share one group size".into()));
        }
        self.queued.push_back((policy.repeat_prompts(prompts, 1), groups.to_vec()));
        Ok(())
    }

    fn step(&mut self, policy: &P, version: u64) -> Result<Vec<FinishedRollout>, PolicyError> {
        let Some((prompts, groups)) = self.queued.pop_front() else { return Ok(Vec::new()) };
        let g = groups.first().map_or(1, |s| s.group_size);
        let seed = groups.first().map_or(self.sampling.seed, |s| s.seed);
        let sampled =
            policy.sample(&policy.repeat_prompts(&prompts, g as i64), &RolloutSampling { seed, ..self.sampling })?;
        if sampled.tokens.len() != groups.len() * g {
            return Err(PolicyError::Model(format!(
                "sampling returned {} rows for {} groups of {g}",
                sampled.tokens.len(),
                groups.len()
            )));
        }
        let done = groups
            .iter()
            .enumerate()
            .filter(|(_, spec)| !self.cancelled.remove(&spec.id))
            .map(|(i, spec)| {
                let rows = i * g..(i + 1) * g;
                let part = Sampled {
                    tokens: sampled.tokens[rows.clone()].to_vec(),
                    logprobs: sampled.logprobs[rows.clone()].to_vec(),
                    finished_by_eos: sampled.finished_by_eos[rows].to_vec(),
                };
                let token_versions = part.tokens.iter().map(|t| vec![version; t.len()]).collect();
                FinishedRollout { id: spec.id, sampled: part, token_versions }
            })
            .collect();
        Ok(done)
    }

    fn cancel(&mut self, ids: &[u64]) {
        // A queued batch keeps its prompts: a cancelled group's rows are sampled and discarded.
        self.cancelled.extend(ids);
    }

    fn free_slots(&self) -> usize {
        self.slots.saturating_sub(self.queued_rows())
    }

    fn is_idle(&self) -> bool {
        self.queued.is_empty()
    }
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

    /// Rollouts with `slots` completions in flight at most ([`RolloutEngine`]); by default
    /// [`BatchRollouts`], which samples each submitted batch whole.
    fn rollout_engine(
        &self,
        slots: usize,
        sampling: &RolloutSampling,
    ) -> Result<Box<dyn RolloutEngine<Self>>, PolicyError>
    where
        Self: 'static,
    {
        Ok(Box::new(BatchRollouts::new(slots, sampling)))
    }

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
