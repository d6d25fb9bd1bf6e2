//! The run config's schema: one serde struct per TOML table, each rejecting unknown keys, with
//! defaults where a sensible one exists and `validate` for ranges, cross-field rules and paths.

use crate::ConfigError;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The paper's seven diseases, in canonical spelling; the default disease list. The one copy:
/// medtvt-eval's `PAPER_DISEASES` is this list, and medtvt-data's `Disease` is tested against it.
pub const DEFAULT_DISEASES: [&str; 7] = [
    "coronary artery disease",
    "acute renal failure",
    "hypertension",
    "atrial fibrillation",
    "pneumonia",
    "diabetes mellitus",
    "sepsis",
];

/// One stage of one run.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    pub run: RunSection,
    pub data: DataSection,
    pub model: ModelSection,
    pub train: TrainSection,
    /// Required when `run.stage = "grpo"`, refused otherwise.
    pub grpo: Option<GrpoSection>,
    #[serde(default)]
    pub cluster: ClusterSection,
    #[serde(default)]
    pub telemetry: TelemetrySection,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    /// Stage 1: align the modality encoders with the LLM (physiological QA).
    Pt,
    /// Stage 2: instruction tuning on disease-level QA with the Modality Perception Layer.
    Sft,
    /// Stage 3: reinforcement fine-tuning with GRPO.
    Grpo,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunSection {
    pub name: String,
    pub stage: Stage,
    /// Where checkpoints, metrics.jsonl and plots of this run go.
    pub out_dir: PathBuf,
    #[serde(default)]
    pub seed: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSection {
    /// A MedTVT-QA directory (train/val/test JSONL files beside their modality files).
    pub dir: PathBuf,
    #[serde(default = "default_diseases")]
    pub diseases: Vec<String>,
    /// Prompts longer than this (in tokens, modality placeholders included) are truncated.
    #[serde(default = "default_max_prompt_tokens")]
    pub max_prompt_tokens: usize,
    /// PT/SFT reference answers longer than this (in tokens, the end token not counted) are cut
    /// to it and get no end token, so the model is never taught to stop mid-answer.
    #[serde(default = "default_max_answer_tokens")]
    pub max_answer_tokens: usize,
    /// When a job is submitted, every sample's modality files are read once. By default a sample
    /// whose files cannot be read is reported (by id, file and problem) and skipped, and the job
    /// counts it; `strict = true` refuses the job at the first such sample instead.
    #[serde(default)]
    pub strict: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum DType {
    #[default]
    F32,
    Bf16,
    F16,
}

/// Sizes of a freshly initialised modality side (encoders, adapters, MPL) beside a bare HF
/// checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum EncoderSizes {
    /// The paper's: xresnet1d-101 + GRU, ViT-B/16 at 224 px, the 100-256-1024-1024 lab MLP.
    #[default]
    Paper,
    /// The encoder keys of `[model.tiny]` (image size, ViT depth, ResNet blocks, width): small
    /// enough for CPU tests of a real base.
    Tiny,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum DeviceChoice {
    /// CUDA when available, else CPU.
    #[default]
    Auto,
    Cpu,
    Cuda,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// A checkpoint directory to start from (HF layout: config.json, *.safetensors,
    /// tokenizer.json); a previous stage's output or a real Llama checkpoint. Without it the tiny
    /// model of `[model.tiny]` is built from scratch.
    pub checkpoint: Option<PathBuf>,
    #[serde(default)]
    pub dtype: DType,
    #[serde(default)]
    pub device: DeviceChoice,
    /// Sizes of the from-scratch model; with a bare HF `checkpoint`, only its encoder keys are
    /// used, and only when `encoders = "tiny"`.
    #[serde(default)]
    pub tiny: TinyModel,
    /// The modality side's sizes beside a bare HF checkpoint (no `medtvt.json`): `paper`
    /// (default) or `tiny`. Ignored for the tiny model and for MedTVT checkpoints, whose
    /// `medtvt.json` fixes them.
    #[serde(default)]
    pub encoders: EncoderSizes,
    /// Train every parameter in every stage instead of the spec's per-stage groups (PT:
    /// adapters, embeddings, norms; SFT: + MPL; GRPO: MPL, embeddings, norms). Needed when
    /// nothing is pretrained, as for the tiny CPU default.
    #[serde(default)]
    pub train_all: bool,
    /// Pretrained ECG encoder (xresnet1d + GRU) weights, a `.safetensors` file whose tensor names
    /// are the encoder's own (docs/model.md lists them). Loaded into a freshly initialised
    /// modality side: the tiny model, or the paper's encoders beside a bare HF Llama checkpoint.
    #[serde(default)]
    pub ecg_encoder_weights: Option<PathBuf>,
    /// Pretrained chest X-ray encoder (ViT) weights; as `ecg_encoder_weights`.
    #[serde(default)]
    pub cxr_encoder_weights: Option<PathBuf>,
    /// Pretrained lab encoder (MLP) weights; as `ecg_encoder_weights`.
    #[serde(default)]
    pub lab_encoder_weights: Option<PathBuf>,
}

impl ModelSection {
    /// The encoder weight files that are set, with their config keys, in (ECG, CXR, lab) order.
    pub fn encoder_weights(&self) -> Vec<(&'static str, &Path)> {
        [
            ("model.ecg_encoder_weights", &self.ecg_encoder_weights),
            ("model.cxr_encoder_weights", &self.cxr_encoder_weights),
            ("model.lab_encoder_weights", &self.lab_encoder_weights),
        ]
        .into_iter()
        .filter_map(|(key, path)| path.as_deref().map(|p| (key, p)))
        .collect()
    }
}

/// Sizes of the CPU default model trained from scratch.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TinyModel {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    /// Side of the square X-ray input in pixels.
    pub image_size: usize,
    pub vit_patch_size: usize,
    pub vit_depth: usize,
    pub ecg_resnet_blocks: usize,
}

impl Default for TinyModel {
    fn default() -> Self {
        TinyModel {
            vocab_size: 1024,
            hidden_size: 128,
            intermediate_size: 344,
            num_layers: 4,
            num_heads: 4,
            num_kv_heads: 2,
            image_size: 64,
            vit_patch_size: 16,
            vit_depth: 2,
            ecg_resnet_blocks: 2,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainSection {
    /// Optimizer steps of this stage.
    pub steps: u64,
    /// Samples per optimizer step over all learners (PT/SFT). For GRPO the batch is
    /// `grpo.prompts_per_step * grpo.group_size` completions.
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    pub learning_rate: f64,
    #[serde(default)]
    pub warmup_steps: u64,
    /// The cosine schedule decays to `learning_rate * min_lr_ratio`.
    #[serde(default = "default_min_lr_ratio")]
    pub min_lr_ratio: f64,
    #[serde(default)]
    pub weight_decay: f64,
    /// Global gradient-norm clip; 0 disables it.
    #[serde(default = "default_grad_clip")]
    pub grad_clip: f64,
    #[serde(default = "one")]
    pub grad_accumulation: u32,
    /// Write a checkpoint every this many steps (and always at the end); 0 = only at the end.
    #[serde(default)]
    pub checkpoint_every: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum AdvantageEstimator {
    /// (r - mean) / (std + eps) within each group (DeepSeekMath GRPO).
    #[default]
    Grpo,
    /// r - mean, no std normalisation (Dr. GRPO).
    DrGrpo,
    /// r - mean of the other G-1 rewards (RLOO).
    Rloo,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum KlEstimator {
    K1,
    K2,
    /// exp(ref - logp) - (ref - logp) - 1, the low-variance estimator GRPO uses.
    #[default]
    K3,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum LossAggregation {
    /// Mean over all completion tokens in the batch (DAPO).
    #[default]
    TokenMean,
    /// Mean over sequences of each sequence's token mean (original GRPO).
    SeqMeanTokenMean,
    /// Mean over sequences of token sums divided by the max completion length (Dr. GRPO).
    SeqMeanTokenSum,
}

/// Where the GRPO ratio's "old" log-probs come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum OldLogprobs {
    /// The sampler's log-probs of the tokens it drew (KV-cache decode, the sampler's dtype).
    #[default]
    Sampler,
    /// The learner's own log-probs under the weights it holds before the update: the ratio
    /// starts at exactly 1, and sampler/learner numeric differences never reach the clip.
    Learner,
}

/// Importance-sampling correction of the sampler/learner mismatch (TRL's
/// `vllm_importance_sampling_correction`, verl's rollout correction), token level.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ImportanceSampling {
    /// No correction.
    #[default]
    None,
    /// Weight each token's loss by min(w, cap) (truncated importance sampling).
    Truncate,
    /// Weight by w where w <= cap and drop the token (weight 0) where w > cap.
    Mask,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrpoSection {
    /// Completions sampled per prompt (G).
    pub group_size: u32,
    pub prompts_per_step: u32,
    pub max_new_tokens: u32,
    #[serde(default = "one_f64")]
    pub temperature: f64,
    #[serde(default = "one_f64")]
    pub top_p: f64,
    /// 0 disables top-k.
    #[serde(default)]
    pub top_k: u32,
    /// KL coefficient; 0 drops the reference model entirely.
    #[serde(default = "default_beta")]
    pub beta: f64,
    #[serde(default)]
    pub kl_estimator: KlEstimator,
    #[serde(default = "default_eps")]
    pub eps_low: f64,
    #[serde(default = "default_eps")]
    pub eps_high: f64,
    /// Dual-clip constant c > 1: a negative-advantage token's loss is capped at c * |A| (verl's
    /// `clip_ratio_c`, 3.0 there); unset disables it (TRL).
    #[serde(default)]
    pub dual_clip: Option<f64>,
    /// Which log-probs the ratio's denominator uses: the sampler's, as recorded when the
    /// completions were generated, or the learner's own, recomputed before the update (TRL's and
    /// verl's default). See docs/grpo.md for when to pick which.
    #[serde(default)]
    pub old_logprobs: OldLogprobs,
    /// Correction for the sampler/learner mismatch (and policy lag) when `old_logprobs =
    /// "learner"`: each token's loss is weighted by w = exp(logp_learner - logp_sampler),
    /// truncated at `importance_sampling_cap` or masked above it.
    #[serde(default)]
    pub importance_sampling: ImportanceSampling,
    #[serde(default = "default_importance_sampling_cap")]
    pub importance_sampling_cap: f64,
    #[serde(default)]
    pub advantage: AdvantageEstimator,
    #[serde(default)]
    pub loss_aggregation: LossAggregation,
    /// The coordinator consumes groups whose rewards all tie (`medtvt_proto::groups`: they carry
    /// no signal) without putting them into a step, and leases more prompts to fill the batch.
    #[serde(default)]
    pub filter_tied_groups: bool,
    /// A group sampled from a policy more than this many versions old is dropped.
    #[serde(default = "one")]
    pub max_staleness: u32,
    /// When a rollout worker loads a newer policy while completions are being generated: true
    /// (partial rollouts) lets them go on with the new weights, each token recording the version
    /// that sampled it; false drops the groups started on older weights (counted in the worker's
    /// log; their prompts return to the queue when the lease expires).
    #[serde(default = "yes")]
    pub partial_rollouts: bool,
    #[serde(default)]
    pub reward: RewardWeights,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RewardWeights {
    pub jaccard: f64,
    pub format: f64,
    /// Match disease names case-insensitively with synonyms (false = the reference's exact match).
    pub synonyms: bool,
}

impl Default for RewardWeights {
    fn default() -> Self {
        RewardWeights { jaccard: 1.0, format: 1.0, synonyms: true }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterSection {
    /// Rollout workers `medtvt train` starts locally (GRPO only).
    pub rollout_workers: u32,
    /// Learner ranks (world size).
    pub learners: u32,
    pub lease_timeout_s: f64,
    pub heartbeat_timeout_s: f64,
    /// How long one collective operation (TCP or NCCL) may wait for the other ranks before this
    /// rank gives up on them: longer than the most one rank's compute can lag another's in a step.
    /// It is also how long re-forming the group waits for a member that has not come back.
    pub collective_timeout_s: f64,
    /// What a job does when it loses a learner rank (see docs/reliability.md).
    pub on_learner_loss: LearnerLossPolicy,
    /// `on_learner_loss = "wait"`: how long the job is held for a replacement of a lost rank
    /// before the survivors carry on without it.
    pub replacement_timeout_s: f64,
    /// `on_learner_loss = "wait"` and no replacement came in time: the survivors carry on
    /// (`shrink`) or the job fails (`fail`).
    pub on_replacement_timeout: ReplacementTimeout,
}

impl Default for ClusterSection {
    fn default() -> Self {
        ClusterSection {
            rollout_workers: 2,
            learners: 2,
            lease_timeout_s: 120.0,
            heartbeat_timeout_s: 30.0,
            collective_timeout_s: 60.0,
            on_learner_loss: LearnerLossPolicy::Fail,
            replacement_timeout_s: 60.0,
            on_replacement_timeout: ReplacementTimeout::Shrink,
        }
    }
}

/// What a job waiting for a replacement learner does when none came in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ReplacementTimeout {
    #[default]
    Shrink,
    Fail,
}

/// What a job does when a learner rank dies, hangs or is cut off.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum LearnerLossPolicy {
    /// The job fails; restarting the ranks resumes it from the newest checkpoint.
    #[default]
    Fail,
    /// The survivors form a smaller group, reshard the same global batch and redo the
    /// interrupted step; a rank that joins later grows the group back at a step boundary.
    Shrink,
    /// Hold the job until a replacement with the same rank registers (up to
    /// `cluster.replacement_timeout_s`), then shrink.
    Wait,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetrySection {
    /// OTLP/gRPC endpoint for traces and metrics, e.g. "http://127.0.0.1:4317".
    pub otlp_endpoint: Option<String>,
}

fn default_diseases() -> Vec<String> {
    DEFAULT_DISEASES.iter().map(|s| s.to_string()).collect()
}
fn default_max_prompt_tokens() -> usize {
    256
}
fn default_max_answer_tokens() -> usize {
    600
}
fn default_importance_sampling_cap() -> f64 {
    3.0
}
fn default_batch_size() -> usize {
    8
}
fn default_min_lr_ratio() -> f64 {
    0.1
}
fn default_grad_clip() -> f64 {
    1.0
}
fn default_beta() -> f64 {
    0.04
}
fn default_eps() -> f64 {
    0.2
}
fn yes() -> bool {
    true
}

fn one() -> u32 {
    1
}
fn one_f64() -> f64 {
    1.0
}

impl RunConfig {
    /// Every file or folder the config names that learners and workers read or write, with its
    /// config key: `run.out_dir`, `data.dir`, `model.checkpoint` and the encoder weight files.
    pub fn paths(&self) -> Vec<(&'static str, &Path)> {
        let mut paths = vec![("run.out_dir", self.run.out_dir.as_path()), ("data.dir", self.data.dir.as_path())];
        if let Some(checkpoint) = &self.model.checkpoint {
            paths.push(("model.checkpoint", checkpoint.as_path()));
        }
        paths.extend(self.model.encoder_weights());
        paths
    }

    /// Range, cross-field and path checks; the first problem found is returned, naming its key.
    pub fn validate(&self, file: &Path) -> Result<(), ConfigError> {
        let bad = |key: &str, problem: &str| Err(ConfigError::invalid(file, key, problem));
        if self.run.name.trim().is_empty() {
            return bad("run.name", "must not be empty");
        }
        require_dir(file, "data.dir", &self.data.dir)?;
        if self.data.diseases.is_empty() {
            return bad("data.diseases", "must list at least one disease");
        }
        if let Some(ckpt) = &self.model.checkpoint {
            require_dir(file, "model.checkpoint", ckpt)?;
        }
        for (key, weights) in self.model.encoder_weights() {
            require_safetensors_file(file, key, weights)?;
        }
        self.model.tiny.validate(file)?;
        self.train.validate(file)?;
        match (self.run.stage, &self.grpo) {
            (Stage::Grpo, None) => return bad("grpo", "is required when run.stage = \"grpo\""),
            (Stage::Grpo, Some(g)) => g.validate(file)?,
            (_, Some(_)) => return bad("grpo", "is only allowed when run.stage = \"grpo\""),
            (_, None) => {}
        }
        if self.cluster.learners == 0 {
            return bad("cluster.learners", "must be at least 1");
        }
        if self.run.stage == Stage::Grpo && self.cluster.rollout_workers == 0 {
            return bad("cluster.rollout_workers", "must be at least 1 for a GRPO run");
        }
        if self.cluster.lease_timeout_s.is_nan() || self.cluster.lease_timeout_s <= 0.0 {
            return bad("cluster.lease_timeout_s", "must be > 0");
        }
        if self.cluster.heartbeat_timeout_s.is_nan() || self.cluster.heartbeat_timeout_s <= 0.0 {
            return bad("cluster.heartbeat_timeout_s", "must be > 0");
        }
        if self.cluster.collective_timeout_s.is_nan() || self.cluster.collective_timeout_s <= 0.0 {
            return bad("cluster.collective_timeout_s", "must be > 0");
        }
        if self.cluster.replacement_timeout_s.is_nan() || self.cluster.replacement_timeout_s <= 0.0 {
            return bad("cluster.replacement_timeout_s", "must be > 0");
        }
        if self.data.max_answer_tokens == 0 {
            return bad("data.max_answer_tokens", "must be at least 1");
        }
        if self.run.stage != Stage::Grpo && !self.train.batch_size.is_multiple_of(self.cluster.learners as usize) {
            return bad("train.batch_size", "must be a multiple of cluster.learners");
        }
        Ok(())
    }
}

impl TinyModel {
    fn validate(&self, file: &Path) -> Result<(), ConfigError> {
        let bad = |key: &str, problem: String| Err(ConfigError::invalid(file, key, problem));
        for (key, v) in [
            ("model.tiny.vocab_size", self.vocab_size),
            ("model.tiny.hidden_size", self.hidden_size),
            ("model.tiny.intermediate_size", self.intermediate_size),
            ("model.tiny.num_layers", self.num_layers),
            ("model.tiny.num_heads", self.num_heads),
            ("model.tiny.num_kv_heads", self.num_kv_heads),
            ("model.tiny.image_size", self.image_size),
            ("model.tiny.vit_patch_size", self.vit_patch_size),
        ] {
            if v == 0 {
                return bad(key, "must be > 0".into());
            }
        }
        if !self.hidden_size.is_multiple_of(self.num_heads) {
            return bad(
                "model.tiny.hidden_size",
                format!("{} is not divisible by num_heads {}", self.hidden_size, self.num_heads),
            );
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return bad(
                "model.tiny.num_heads",
                format!("{} is not divisible by num_kv_heads {}", self.num_heads, self.num_kv_heads),
            );
        }
        if !self.image_size.is_multiple_of(self.vit_patch_size) {
            return bad(
                "model.tiny.image_size",
                format!("{} is not divisible by vit_patch_size {}", self.image_size, self.vit_patch_size),
            );
        }
        Ok(())
    }
}

impl TrainSection {
    fn validate(&self, file: &Path) -> Result<(), ConfigError> {
        let bad = |key: &str, problem: &str| Err(ConfigError::invalid(file, key, problem));
        if self.steps == 0 {
            return bad("train.steps", "must be at least 1");
        }
        if self.batch_size == 0 {
            return bad("train.batch_size", "must be at least 1");
        }
        if !(self.learning_rate > 0.0 && self.learning_rate.is_finite()) {
            return bad("train.learning_rate", "must be a finite number > 0");
        }
        if !(0.0..=1.0).contains(&self.min_lr_ratio) {
            return bad("train.min_lr_ratio", "must be in [0, 1]");
        }
        if self.weight_decay.is_nan() || self.weight_decay < 0.0 {
            return bad("train.weight_decay", "must be >= 0");
        }
        if self.grad_clip.is_nan() || self.grad_clip < 0.0 {
            return bad("train.grad_clip", "must be >= 0 (0 disables clipping)");
        }
        if self.grad_accumulation == 0 {
            return bad("train.grad_accumulation", "must be at least 1");
        }
        Ok(())
    }
}

impl GrpoSection {
    fn validate(&self, file: &Path) -> Result<(), ConfigError> {
        let bad = |key: &str, problem: &str| Err(ConfigError::invalid(file, key, problem));
        if self.group_size < 2 {
            return bad("grpo.group_size", "must be at least 2 (advantages are relative within a group)");
        }
        if self.prompts_per_step == 0 {
            return bad("grpo.prompts_per_step", "must be at least 1");
        }
        if self.max_new_tokens == 0 {
            return bad("grpo.max_new_tokens", "must be at least 1");
        }
        if !(self.temperature > 0.0 && self.temperature.is_finite()) {
            return bad("grpo.temperature", "must be a finite number > 0");
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad("grpo.top_p", "must be in (0, 1]");
        }
        if !(self.beta >= 0.0 && self.beta.is_finite()) {
            return bad("grpo.beta", "must be a finite number >= 0");
        }
        if !(self.eps_low > 0.0 && self.eps_low < 1.0) {
            return bad("grpo.eps_low", "must be in (0, 1)");
        }
        if !(self.eps_high > 0.0 && self.eps_high.is_finite()) {
            return bad("grpo.eps_high", "must be a finite number > 0");
        }
        if let Some(c) = self.dual_clip {
            if !(c > 1.0 && c.is_finite()) {
                return bad(
                    "grpo.dual_clip",
                    "must be a finite number > 1 (it caps a negative advantage's loss at c * |A|)",
                );
            }
        }
        if !(self.importance_sampling_cap > 1.0 && self.importance_sampling_cap.is_finite()) {
            return bad("grpo.importance_sampling_cap", "must be a finite number > 1");
        }
        if self.importance_sampling != ImportanceSampling::None && self.old_logprobs != OldLogprobs::Learner {
            return bad(
                "grpo.importance_sampling",
                "needs grpo.old_logprobs = \"learner\" (with the sampler's log-probs in the ratio, the ratio already corrects for them)",
            );
        }
        if !(self.reward.jaccard >= 0.0 && self.reward.format >= 0.0) {
            return bad("grpo.reward", "weights must be >= 0");
        }
        Ok(())
    }
}

fn require_dir(file: &Path, key: &str, dir: &Path) -> Result<(), ConfigError> {
    if dir.is_dir() {
        Ok(())
    } else {
        Err(ConfigError::invalid(file, key, format!("= \"{}\": no such directory", dir.display())))
    }
}

fn require_safetensors_file(file: &Path, key: &str, path: &Path) -> Result<(), ConfigError> {
    let shown = path.display();
    if !path.is_file() {
        return Err(ConfigError::invalid(file, key, format!("= \"{shown}\": no such file")));
    }
    if path.extension().is_none_or(|e| e != "safetensors") {
        return Err(ConfigError::invalid(file, key, format!("= \"{shown}\": expected a .safetensors file")));
    }
    Ok(())
}
