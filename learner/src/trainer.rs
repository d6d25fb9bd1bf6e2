//! One learner rank's optimisation state and its step: loss over this rank's shard (PT/SFT
//! next-token NLL on the answers, or the GRPO loss on rollout groups), gradient accumulation over
//! micro-batches, the mean all-reduce of the gradients, the non-finite guard, clipping and the
//! AdamW update. Every rank runs the same step on its own shard; because the collective hands
//! every rank the very same averaged bytes, the ranks' weights stay bit-identical.
//!
//! Loss normalisation: W learners on shards of one batch equal one learner on the whole batch
//! (up to float summation order). The step's loss is sum(numerators) / sum(denominators) over
//! every micro-batch of every rank (PT/SFT: answer-token NLL sums over answer tokens; GRPO: see
//! `grpo::aggregation_numerator`, tokens for `token_mean`, sequences for the `seq_mean_*` modes).
//! The denominators are all-reduced before the forward passes, each micro-batch backpropagates
//! numerator * W / total, and the mean all-reduce of the gradients divides the W back out. A mean
//! of per-rank (or per-micro-batch) means would instead over-weight the tokens of short shards.
//! Dr. GRPO's divisor is the constant `grpo.max_new_tokens`, not a batch's longest completion,
//! for the same reason.
//!
//! The trainer knows nothing of the network: the job runner ([`crate::job`]) pulls batches, loads
//! their modality inputs and hands them over as [`StepData`].

use crate::batch::{self, BatchError};
use crate::checkpoint::{self, CheckpointContent, CheckpointError, LoadedCheckpoint, TrainerState};
use crate::collective::{CollectiveError, GradientCollective};
use crate::grpo::{self, ClipRange, GrpoBatch, GrpoError, GrpoOptions, MismatchSums};
use crate::optim::{clip_grad_norm, AdamW, AdamWConfig, LrSchedule};
use medtvt_config::{OldLogprobs, RunConfig, Stage};
use medtvt_data::ModalityInputs;
use medtvt_model::policy::{Policy, PolicyError};
use medtvt_proto::v1::{Completion, RolloutGroup};
use medtvt_telemetry::metrics::StepMetric;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;
use tch::{Kind, Tensor};

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Policy(#[from] PolicyError),
    #[error(transparent)]
    Grpo(#[from] GrpoError),
    #[error(transparent)]
    Collective(#[from] CollectiveError),
    #[error(transparent)]
    Batch(#[from] BatchError),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error("reading a metric: {0}")]
    Torch(#[from] tch::TchError),
    #[error("checkpoint {path} does not fit the model: {problem}")]
    Resume { path: PathBuf, problem: String },
}

/// A question with its loaded modality inputs.
pub type PromptInput = (String, ModalityInputs);

/// One rank's shard of one step.
pub enum StepData {
    /// PT/SFT: prompts and their reference answers.
    Supervised { prompts: Vec<PromptInput>, answers: Vec<String> },
    /// GRPO: rollout groups and, aligned with them, their prompts.
    Grpo { groups: Vec<RolloutGroup>, prompts: Vec<PromptInput> },
}

/// What the step loop needs from the run config.
#[derive(Debug, Clone)]
pub struct TrainerOptions {
    pub stage: Stage,
    pub max_prompt_tokens: usize,
    /// Reference answers longer than this (in tokens) are cut, without an end token.
    pub max_answer_tokens: usize,
    pub grad_accumulation: usize,
    pub grad_clip: f64,
    pub schedule: LrSchedule,
    pub adamw: AdamWConfig,
    pub grpo: Option<GrpoStepOptions>,
}

#[derive(Debug, Clone, Copy)]
pub struct GrpoStepOptions {
    pub loss: GrpoOptions,
    pub group_size: usize,
    /// The sampling temperature: log-probs are scored at the temperature they were sampled at.
    pub temperature: f64,
    /// The sampler's log-probs or the learner's own as the ratio's "old" log-probs.
    pub old_logprobs: OldLogprobs,
}

impl TrainerOptions {
    pub fn from_config(cfg: &RunConfig) -> Self {
        let t = &cfg.train;
        let grpo = cfg.grpo.as_ref().map(|g| GrpoStepOptions {
            loss: GrpoOptions {
                advantage: g.advantage,
                eps_low: g.eps_low,
                eps_high: g.eps_high,
                beta: g.beta,
                kl_estimator: g.kl_estimator,
                loss_aggregation: g.loss_aggregation,
                dual_clip: g.dual_clip,
                // Dr. GRPO divides token sums by the fixed completion budget, not the batch's longest.
                token_sum_divisor: Some(f64::from(g.max_new_tokens)),
                importance_sampling: g.importance_sampling,
                importance_sampling_cap: g.importance_sampling_cap,
                ..GrpoOptions::default()
            },
            group_size: g.group_size as usize,
            temperature: g.temperature,
            old_logprobs: g.old_logprobs,
        });
        TrainerOptions {
            stage: cfg.run.stage,
            max_prompt_tokens: cfg.data.max_prompt_tokens,
            max_answer_tokens: cfg.data.max_answer_tokens,
            grad_accumulation: t.grad_accumulation.max(1) as usize,
            grad_clip: t.grad_clip,
            schedule: LrSchedule {
                peak: t.learning_rate,
                warmup: t.warmup_steps,
                total: t.steps,
                min_ratio: t.min_lr_ratio,
            },
            adamw: AdamWConfig { weight_decay: t.weight_decay, ..AdamWConfig::default() },
            grpo,
        }
    }
}

/// The outcome of one step: the metrics summed over every rank (so identical on all ranks).
#[derive(Debug, Clone)]
pub struct StepOutcome {
    pub metrics: BTreeMap<String, f64>,
    /// The gradient was not finite: the weights were left alone.
    pub skipped: bool,
}

fn completions_of(groups: &[RolloutGroup]) -> usize {
    groups.iter().map(|g| g.completions.len()).sum()
}

/// Sums a step accumulates on one rank; added over ranks with the collective.
#[derive(Debug, Clone)]
struct Sums {
    loss_x_tokens: f64,
    tokens: f64,
    samples: f64,
    rewards: batch::RewardSums,
    kl_x_tokens: f64,
    clip_x_tokens: f64,
    tied_groups: f64,
    groups_trained: f64,
    non_finite_loss: f64,
    /// Sampler vs learner log-probs on the tokens sampled by the version being trained (lag 0).
    mismatch: MismatchSums,
    /// Importance-sampling weight sums (with a correction): weight x tokens, corrected x tokens.
    is_weight_x_tokens: f64,
    is_corrected_x_tokens: f64,
    is_weight_max: f64,
}

impl Default for Sums {
    fn default() -> Self {
        Sums {
            loss_x_tokens: 0.0,
            tokens: 0.0,
            samples: 0.0,
            rewards: batch::RewardSums::default(),
            kl_x_tokens: 0.0,
            clip_x_tokens: 0.0,
            tied_groups: 0.0,
            groups_trained: 0.0,
            non_finite_loss: 0.0,
            mismatch: MismatchSums::empty(),
            is_weight_x_tokens: 0.0,
            is_corrected_x_tokens: 0.0,
            is_weight_max: 0.0,
        }
    }
}

impl Sums {
    /// Every value that adds up over ranks, each once (the maxima are reduced separately): the
    /// one list both the all-reduce and its read-back go through, so no field can be sent in one
    /// position and read from another.
    fn additive(&mut self) -> Vec<&mut f64> {
        let r = &mut self.rewards;
        let m = &mut self.mismatch;
        let mut fields = vec![
            &mut self.loss_x_tokens,
            &mut self.tokens,
            &mut self.samples,
            &mut r.completions,
            &mut r.reward,
            &mut r.reward_sq,
            &mut r.jaccard,
            &mut r.format,
            &mut r.truncated,
            &mut r.completion_tokens,
            &mut self.kl_x_tokens,
            &mut self.clip_x_tokens,
            &mut self.tied_groups,
            &mut self.groups_trained,
            &mut self.non_finite_loss,
            &mut m.tokens,
            &mut m.abs_sum,
            &mut m.outside_clip,
            &mut self.is_weight_x_tokens,
            &mut self.is_corrected_x_tokens,
        ];
        fields.extend(m.histogram.iter_mut());
        fields
    }
}

/// One learner rank.
pub struct Trainer<P: Policy> {
    policy: P,
    /// The frozen starting policy for the KL term (GRPO with beta > 0 only).
    reference: Option<P>,
    optimizer: AdamW,
    collective: Box<dyn GradientCollective>,
    options: TrainerOptions,
    /// Optimizer steps completed (skipped ones included).
    step: u64,
    skipped_steps: u64,
}

impl<P: Policy> Trainer<P> {
    /// `policy` must already have its trainable set chosen; its trainable tensors become the
    /// optimizer's parameters.
    pub fn new(
        policy: P,
        reference: Option<P>,
        collective: Box<dyn GradientCollective>,
        options: TrainerOptions,
    ) -> Self {
        let optimizer = AdamW::new(policy.trainable_tensors(), options.adamw);
        Trainer { policy, reference, optimizer, collective, options, step: 0, skipped_steps: 0 }
    }

    pub fn policy(&self) -> &P {
        &self.policy
    }

    pub fn rank(&self) -> usize {
        self.collective.rank()
    }

    /// Steps completed so far: the next step to train.
    pub fn step_index(&self) -> u64 {
        self.step
    }

    /// Makes every rank start from rank 0's weights (for a from-scratch model).
    pub fn broadcast_weights(&mut self) -> Result<(), TrainError> {
        let all: Vec<Tensor> = self.policy.all_tensors().into_iter().map(|(_, t)| t).collect();
        self.collective.broadcast_from_root(&all)?;
        self.optimizer.refresh_masters_from_params();
        Ok(())
    }

    /// Swaps in the collective of a new learner group (or [`crate::collective::Disconnected`]
    /// between groups, which closes the old one's sockets); returns the old one.
    pub fn replace_collective(&mut self, collective: Box<dyn GradientCollective>) -> Box<dyn GradientCollective> {
        std::mem::replace(&mut self.collective, collective)
    }

    /// Makes every rank of a newly formed group hold rank 0's whole training state: weights (the
    /// f32 masters too), AdamW moments, and the step counters. Rank 0 of a new group is the
    /// member with the most optimizer steps, so a rank that is behind (a replacement, or a
    /// survivor whose last step was cut short) catches up, and survivors keep what they hold in
    /// memory.
    pub fn sync_from_root(&mut self) -> Result<(), TrainError> {
        if self.collective.world_size() == 1 {
            return Ok(());
        }
        let weights: Vec<Tensor> = self.policy.all_tensors().into_iter().map(|(_, t)| t).collect();
        self.collective.broadcast_from_root(&weights)?;
        let masters: Vec<Tensor> = self.optimizer.master_weights().into_iter().map(|(_, t)| t).collect();
        self.collective.broadcast_from_root(&masters)?;
        self.collective.broadcast_from_root(&self.optimizer.exp_avg)?;
        self.collective.broadcast_from_root(&self.optimizer.exp_avg_sq)?;
        // Counts travel as f32: exact below 2^24 steps.
        let counters = Tensor::from_slice(&[self.step as f32, self.skipped_steps as f32, self.optimizer.steps as f32]);
        self.collective.broadcast_from_root(std::slice::from_ref(&counters))?;
        let counters = Vec::<f32>::try_from(&counters)?;
        (self.step, self.skipped_steps, self.optimizer.steps) =
            (counters[0] as u64, counters[1] as u64, counters[2] as u64);
        Ok(())
    }

    /// Trains one step on this rank's shard.
    pub fn step(&mut self, data: &StepData) -> Result<StepOutcome, TrainError> {
        let started = Instant::now();
        self.optimizer.zero_grad();
        let local = match data {
            StepData::Supervised { prompts, answers } => self.supervised_backward(prompts, answers)?,
            StepData::Grpo { groups, prompts } => self.grpo_backward(groups, prompts)?,
        };
        let grads = self.optimizer.grads();
        self.collective.all_reduce_mean(&grads)?;
        let totals = self.sum_over_ranks(local)?;
        // The reduced gradients are identical on every rank, so every rank makes the same call.
        let grad_norm = clip_grad_norm(&grads, self.options.grad_clip);
        let lr = self.options.schedule.at(self.step);
        let skipped = !grad_norm.is_finite();
        if skipped {
            self.skipped_steps += 1;
            self.optimizer.zero_grad();
        } else {
            self.optimizer.step(lr);
        }
        self.step += 1;
        let elapsed = started.elapsed().as_secs_f64();
        Ok(StepOutcome { metrics: self.metrics(&totals, grad_norm, lr, elapsed, skipped), skipped })
    }

    /// The next-token loss of the step is the mean over every answer token of every rank's
    /// shard: each micro-batch backpropagates its NLL sum divided by the step's global token
    /// count (all-reduced first), so shards of different token counts and any number of ranks or
    /// micro-batches give the gradient of one learner on the whole batch.
    fn supervised_backward(&mut self, prompts: &[PromptInput], answers: &[String]) -> Result<Sums, TrainError> {
        let mut sums = Sums::default();
        let parts = batch::micro_batches(prompts.len(), self.options.grad_accumulation);
        let mut encoded_answers = Vec::with_capacity(parts.len());
        let mut local_tokens = 0.0;
        for range in &parts {
            let (ids, mask) = self.policy.encode_answers(&answers[range.clone()], self.options.max_answer_tokens)?;
            local_tokens += f64::try_from(mask.to_kind(Kind::Double).sum(Kind::Double))?;
            encoded_answers.push((ids, mask));
        }
        let normaliser = self.global_normaliser(local_tokens)?;
        for (range, (ids, mask)) in parts.into_iter().zip(encoded_answers) {
            let encoded = self.policy.encode_prompts(&prompts[range.clone()], self.options.max_prompt_tokens)?;
            let logp = self.policy.score(&encoded, &ids, &mask, 1.0, true); // [b, tc]
            let nll_sum = batch::answer_nll_sum(&logp, &mask);
            let tokens = f64::try_from(mask.to_kind(Kind::Double).sum(Kind::Double))?;
            let value = f64::try_from(nll_sum.detach().to_kind(Kind::Double))? / tokens.max(1.0);
            sums.samples += range.len() as f64;
            self.backward(&(nll_sum * normaliser), value, tokens, &mut sums);
        }
        Ok(sums)
    }

    /// The factor that turns this rank's loss numerators into its share of the step's loss:
    /// world size / (the denominators summed over all ranks). The collective then averages the
    /// ranks' gradients, which cancels the world size and leaves sum(numerators) / sum(denominators).
    /// Every rank calls this once per step (one extra all-reduce of one number).
    fn global_normaliser(&mut self, local_denominator: f64) -> Result<f64, TrainError> {
        let world = self.collective.world_size() as f64;
        let t = Tensor::from_slice(&[local_denominator as f32]);
        self.collective.all_reduce_mean(std::slice::from_ref(&t))?;
        // Denominators are counts: rounding undoes the f32 mean's error.
        let total = (f64::try_from(t.to_kind(Kind::Double))? * world).round();
        Ok(world / total.max(1.0))
    }

    fn grpo_backward(&mut self, groups: &[RolloutGroup], prompts: &[PromptInput]) -> Result<Sums, TrainError> {
        let Some(opts) = self.options.grpo else {
            return Err(TrainError::Policy(PolicyError::Model(
                "a GRPO batch reached a trainer without grpo options".into(),
            )));
        };
        let mut sums = Sums { rewards: batch::reward_sums(groups), ..Sums::default() };
        batch::group_prompts(groups, opts.group_size)?;
        // Tied groups are filtered (under grpo.filter_tied_groups) by the coordinator, the one
        // place that decides what is trained; here they are only counted.
        sums.tied_groups = groups.iter().filter(|g| g.is_tied()).count() as f64;
        sums.groups_trained = groups.len() as f64;
        let completions: Vec<&Completion> = groups.iter().flat_map(|g| g.completions.iter()).collect();
        let tokens: usize = completions.iter().map(|c| c.token_ids.len()).sum();
        let local = grpo::aggregation_denominator(opts.loss.loss_aggregation, tokens as f64, completions.len() as f64);
        let normaliser = self.global_normaliser(local)?;
        let parts = batch::micro_batches(groups.len(), self.options.grad_accumulation);
        for range in parts {
            let (loss, mismatch) = self.grpo_micro_loss(&groups[range.clone()], &prompts[range], &opts)?;
            let metrics = loss.metrics;
            sums.kl_x_tokens += metrics.kl_mean.unwrap_or(0.0) * metrics.tokens;
            sums.clip_x_tokens += metrics.clip_fraction * metrics.tokens;
            sums.mismatch.add(&mismatch);
            sums.is_weight_x_tokens += metrics.is_weight_mean.unwrap_or(0.0) * metrics.tokens;
            sums.is_corrected_x_tokens += metrics.is_corrected_fraction.unwrap_or(0.0) * metrics.tokens;
            sums.is_weight_max = sums.is_weight_max.max(metrics.is_weight_max.unwrap_or(0.0));
            self.backward(&(loss.numerator * normaliser), metrics.loss, metrics.tokens, &mut sums);
        }
        sums.samples = groups.len() as f64;
        Ok(sums)
    }

    /// The GRPO loss of some groups: prompts repeated G times in place, completions scored at the
    /// sampling temperature against the old (the sampler's or the learner's own) and, with
    /// beta > 0, the reference log-probs; and how far the sampler's log-probs are from the
    /// learner's on the groups the version being trained sampled (lag 0), where any difference
    /// is numerical (kernels, dtype), not a policy change.
    fn grpo_micro_loss(
        &self,
        groups: &[RolloutGroup],
        prompts: &[PromptInput],
        opts: &GrpoStepOptions,
    ) -> Result<(grpo::GrpoLoss, MismatchSums), TrainError> {
        let device = self.policy.device();
        let encoded = self.policy.encode_prompts(prompts, self.options.max_prompt_tokens)?;
        let repeated = self.policy.repeat_prompts(&encoded, opts.group_size as i64); // b = n * G rows
        let t = batch::assemble_grpo(groups, 0, device);
        let advantages =
            grpo::group_advantages(&t.rewards, opts.loss.advantage, opts.loss.advantage_eps)?.reshape([-1]);
        let logp = self.policy.score(&repeated, &t.ids, &t.mask, opts.temperature, false); // [b, t]: eval mode (no dropout), as the workers sampled
        let logp_ref = match (&self.reference, opts.loss.beta > 0.0) {
            (Some(reference), true) => {
                Some(tch::no_grad(|| reference.score(&repeated, &t.ids, &t.mask, opts.temperature, false)))
            }
            _ => None,
        };
        // Per token: was it sampled by the version being trained? (A partial rollout's tokens
        // carry their own versions.)
        let width = t.mask.size()[1] as usize;
        let mut lag0 = Vec::with_capacity(width * completions_of(groups));
        for g in groups {
            for c in &g.completions {
                lag0.extend((0..width).map(|i| {
                    let version = c.token_policy_versions.get(i).copied().unwrap_or(g.policy_version);
                    f32::from(u8::from(i < c.token_ids.len() && version == self.step))
                }));
            }
        }
        let lag0_mask = &t.mask * Tensor::from_slice(&lag0).view([-1, width as i64]).to_device(device); // [b, t]
        let clip =
            ClipRange { eps_low: opts.loss.eps_low, eps_high: opts.loss.eps_high, dual_clip: opts.loss.dual_clip };
        let mismatch = grpo::sampler_mismatch(&logp, &t.logp_old, &lag0_mask, clip)?;
        let logp_old = match opts.old_logprobs {
            OldLogprobs::Sampler => Some(&t.logp_old),
            // The learner's own log-probs before the update: the detached `logp` (one
            // optimisation step per batch, so the weights have not moved yet).
            OldLogprobs::Learner => None,
        };
        let batch = GrpoBatch {
            logp: &logp,
            logp_old,
            logp_ref: logp_ref.as_ref(),
            logp_sampler: Some(&t.logp_old),
            advantages: &advantages,
            mask: &t.mask,
        };
        Ok((grpo::grpo_loss(batch, &opts.loss)?, mismatch))
    }

    /// Backpropagates `share` (this micro-batch's share of the step's loss, see
    /// [`Self::global_normaliser`]) unless the micro-batch's loss `value` is not finite, in which
    /// case the whole step will be skipped: a NaN gradient is planted so that every rank sees a
    /// non-finite reduced gradient and skips together.
    fn backward(&mut self, share: &Tensor, value: f64, tokens: f64, sums: &mut Sums) {
        if value.is_finite() {
            share.backward();
            sums.loss_x_tokens += value * tokens;
            sums.tokens += tokens;
        } else {
            sums.non_finite_loss += 1.0;
            if let Some((_, p)) = self.optimizer.params().first() {
                (p.sum(Kind::Float) * f64::NAN).backward();
            }
        }
    }

    fn sum_over_ranks(&mut self, local: Sums) -> Result<Sums, TrainError> {
        let mut sums = local.clone();
        let values: Vec<f64> = sums.additive().into_iter().map(|v| *v).collect();
        let world = self.collective.world_size() as f64;
        let t = Tensor::from_slice(&values).to_kind(Kind::Float);
        self.collective.all_reduce_mean(std::slice::from_ref(&t))?;
        let mean = Vec::<f64>::try_from(t.to_kind(Kind::Double))?;
        for (slot, m) in sums.additive().into_iter().zip(mean) {
            *slot = m * world;
        }
        // Only GRPO steps have maxima to reduce (every rank runs the same stage, so all skip or none).
        if self.options.grpo.is_some() {
            let [mismatch_max, is_max] = self.max_over_ranks([local.mismatch.abs_max, local.is_weight_max])?;
            sums.mismatch.abs_max = mismatch_max;
            sums.is_weight_max = is_max;
        }
        Ok(sums)
    }

    /// The maximum of each value over all ranks, with the mean all-reduce: every rank writes its
    /// values into its own slot of a zero vector, so the mean times the world size is every
    /// rank's values side by side.
    fn max_over_ranks<const N: usize>(&mut self, local: [f64; N]) -> Result<[f64; N], TrainError> {
        let world = self.collective.world_size();
        let mut slots = vec![0f64; world * N];
        slots[self.collective.rank() * N..][..N].copy_from_slice(&local);
        let t = Tensor::from_slice(&slots);
        self.collective.all_reduce_mean(std::slice::from_ref(&t))?;
        let all = Vec::<f64>::try_from(t)?;
        let mut out = [f64::NEG_INFINITY; N];
        for rank in all.chunks(N) {
            for (o, v) in out.iter_mut().zip(rank) {
                *o = o.max(v * world as f64);
            }
        }
        Ok(out)
    }

    fn metrics(&self, s: &Sums, grad_norm: f64, lr: f64, elapsed: f64, skipped: bool) -> BTreeMap<String, f64> {
        let mut m = BTreeMap::new();
        let per_token = |x: f64| if s.tokens > 0.0 { x / s.tokens } else { 0.0 };
        m.insert("loss".into(), per_token(s.loss_x_tokens));
        m.insert("lr".into(), lr);
        m.insert("grad_norm".into(), if grad_norm.is_finite() { grad_norm } else { -1.0 });
        m.insert("tokens".into(), s.tokens);
        m.insert("tokens_per_s".into(), if elapsed > 0.0 { s.tokens / elapsed } else { 0.0 });
        m.insert("step_time_s".into(), elapsed);
        m.insert("samples".into(), s.samples);
        m.insert("skipped".into(), f64::from(u8::from(skipped)));
        m.insert("skipped_steps".into(), self.skipped_steps as f64);
        m.insert("non_finite_losses".into(), s.non_finite_loss);
        if self.options.grpo.is_some() {
            let r = s.rewards;
            let n = r.completions.max(1.0);
            let mean = r.reward / n;
            let var = if r.completions > 1.0 { ((r.reward_sq - n * mean * mean) / (n - 1.0)).max(0.0) } else { 0.0 };
            m.insert("reward_mean".into(), mean);
            m.insert("reward_std".into(), var.sqrt());
            m.insert("jaccard".into(), r.jaccard / n);
            m.insert("format".into(), r.format / n);
            m.insert("completions".into(), r.completions);
            // TRL's completions/clipped_ratio and completions/mean_length.
            m.insert("truncated_fraction".into(), r.truncated / n);
            m.insert("completion_length".into(), r.completion_tokens / n);
            m.insert("kl".into(), per_token(s.kl_x_tokens));
            m.insert("clip_fraction".into(), per_token(s.clip_x_tokens));
            m.insert("tied_groups".into(), s.tied_groups);
            m.insert("groups_trained".into(), s.groups_trained);
            let mm = &s.mismatch;
            if mm.tokens > 0.0 {
                // Over the tokens the version being trained sampled itself (lag 0); see docs/grpo.md.
                m.insert("mismatch/tokens".into(), mm.tokens);
                m.insert(StepMetric::SamplerMismatchMean.key().into(), mm.abs_sum / mm.tokens);
                m.insert(StepMetric::SamplerMismatchP99.key().into(), mm.quantile(0.99));
                m.insert(StepMetric::SamplerMismatchMax.key().into(), mm.abs_max);
                m.insert(StepMetric::SamplerMismatchOutsideClip.key().into(), mm.outside_clip / mm.tokens);
            }
            if self.options.grpo.is_some_and(|g| g.loss.importance_sampling != grpo::ImportanceSampling::None) {
                m.insert("is/weight_mean".into(), per_token(s.is_weight_x_tokens));
                m.insert("is/weight_max".into(), s.is_weight_max);
                m.insert("is/corrected_fraction".into(), per_token(s.is_corrected_x_tokens));
            }
        }
        m
    }

    /// Writes a checkpoint of the trainable weights and optimizer state under `root`.
    pub fn save_checkpoint(&self, root: &Path) -> Result<PathBuf, TrainError> {
        // The f32 masters, not the model's (possibly bf16) copies: a resumed run continues exactly.
        let weights = self.optimizer.master_weights();
        let mut optimizer = Vec::with_capacity(2 * weights.len());
        for (i, (name, _)) in weights.iter().enumerate() {
            optimizer.push((format!("exp_avg.{name}"), self.optimizer.exp_avg[i].shallow_clone()));
            optimizer.push((format!("exp_avg_sq.{name}"), self.optimizer.exp_avg_sq[i].shallow_clone()));
        }
        let state = TrainerState {
            step: self.step,
            adam_steps: self.optimizer.steps,
            weights_sha256: String::new(),
            optimizer_sha256: String::new(),
        };
        Ok(checkpoint::save(root, CheckpointContent { weights: &weights, optimizer: &optimizer, state })?)
    }

    /// Restores weights (f32 masters and the model's copies), optimizer moments and the step
    /// counter from a verified checkpoint.
    pub fn restore(&mut self, ckpt: &LoadedCheckpoint) -> Result<(), TrainError> {
        let names: Vec<String> = self.optimizer.params().iter().map(|(n, _)| n.clone()).collect();
        let mut weights = Vec::with_capacity(names.len());
        for (i, name) in names.iter().enumerate() {
            let w = checkpoint::find(&ckpt.weights, name, &ckpt.path)?;
            weights.push((name.clone(), w.to_kind(Kind::Float)));
            for (prefix, dst) in
                [("exp_avg", &self.optimizer.exp_avg[i]), ("exp_avg_sq", &self.optimizer.exp_avg_sq[i])]
            {
                let src = checkpoint::find(&ckpt.optimizer, &format!("{prefix}.{name}"), &ckpt.path)?;
                if src.size() != dst.size() {
                    return Err(TrainError::Resume {
                        path: ckpt.path.clone(),
                        problem: format!("{prefix}.{name} has shape {:?}, the model {:?}", src.size(), dst.size()),
                    });
                }
                tch::no_grad(|| dst.shallow_clone().copy_(&src.to_device(dst.device()).to_kind(dst.kind())));
            }
        }
        // By name through the model first (which checks every name and shape), then exactly
        // into the masters.
        self.policy.copy_named_tensors(&weights)?;
        for (i, (_, w)) in weights.iter().enumerate() {
            self.optimizer.set_weight(i, w);
        }
        self.optimizer.steps = ckpt.state.adam_steps;
        self.step = ckpt.state.step;
        Ok(())
    }

    /// The trainable weights in f32 as the optimizer holds them (the masters of a bf16 model).
    pub fn master_weights(&self) -> Vec<(String, Tensor)> {
        self.optimizer.master_weights()
    }

    /// SHA-256 over every variable's f32 little-endian bytes in name order: equal digests mean
    /// bit-identical weights.
    pub fn weights_digest(&self) -> String {
        weights_digest(&self.policy.all_tensors())
    }
}

/// See [`Trainer::weights_digest`].
pub fn weights_digest(tensors: &[(String, Tensor)]) -> String {
    let mut sorted: Vec<&(String, Tensor)> = tensors.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    let mut hasher = Sha256::new();
    for (name, t) in sorted {
        hasher.update(name.as_bytes());
        hasher.update(medtvt_role::weights::f32_le_bytes(t));
    }
    hasher.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collective::{SingleRank, TcpCollective};
    use crate::grpo::LossAggregation;
    use medtvt_model::policy::byte_policy::BytePolicy;
    use medtvt_model::policy::RolloutSampling;
    use medtvt_proto::v1::{Completion, Prompt};
    use std::net::TcpListener;
    use std::time::Duration;

    fn options(stage: Stage, grpo: Option<GrpoStepOptions>) -> TrainerOptions {
        TrainerOptions {
            stage,
            max_prompt_tokens: 64,
            max_answer_tokens: 64,
            grad_accumulation: 2,
            grad_clip: 1.0,
            schedule: LrSchedule { peak: 0.05, warmup: 0, total: 100, min_ratio: 1.0 },
            adamw: AdamWConfig::default(),
            grpo,
        }
    }

    fn trainer(
        seed: i64,
        collective: Box<dyn GradientCollective>,
        grpo: Option<GrpoStepOptions>,
    ) -> Trainer<BytePolicy> {
        let stage = if grpo.is_some() { Stage::Grpo } else { Stage::Pt };
        Trainer::new(BytePolicy::with_seed(16, seed), None, collective, options(stage, grpo))
    }

    fn supervised(pairs: &[(&str, &str)]) -> StepData {
        StepData::Supervised {
            prompts: pairs.iter().map(|(q, _)| (q.to_string(), ModalityInputs::default())).collect(),
            answers: pairs.iter().map(|(_, a)| a.to_string()).collect(),
        }
    }

    const PAIRS: [(&str, &str); 4] =
        [("<ecg> rhythm?", "afib"), ("<lab> kidneys?", "arf"), ("<cxr> lungs?", "pna"), ("<lab> sugar?", "dm")];

    #[test]
    fn supervised_steps_reduce_the_answer_loss() {
        let mut t = trainer(1, Box::new(SingleRank), None);
        let data = supervised(&PAIRS);
        let first = t.step(&data).unwrap().metrics["loss"];
        let mut last = first;
        for _ in 0..30 {
            last = t.step(&data).unwrap().metrics["loss"];
        }
        assert!(last < 0.5 * first, "loss {first} -> {last}");
        assert_eq!(t.step_index(), 31);
    }

    #[test]
    fn non_finite_loss_skips_the_step_and_leaves_weights_alone() {
        let mut t = trainer(2, Box::new(SingleRank), None);
        let before = t.weights_digest();
        let poisoned = ModalityInputs { lab: Some(vec![f32::NAN; 4]), ..Default::default() };
        let data = StepData::Supervised { prompts: vec![("<lab> q".into(), poisoned)], answers: vec!["a".into()] };
        let outcome = t.step(&data).unwrap();
        assert!(outcome.skipped);
        assert_eq!(outcome.metrics["skipped_steps"], 1.0);
        assert_eq!(t.weights_digest(), before);
        // A good step afterwards trains normally.
        assert!(!t.step(&supervised(&PAIRS)).unwrap().skipped);
        assert_ne!(t.weights_digest(), before);
    }

    #[test]
    fn two_tcp_ranks_stay_bit_identical_and_match_in_metrics() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let root = listener.local_addr().unwrap();
        let leaf = std::thread::spawn(move || {
            let c = TcpCollective::connect(1, 2, None, root, Duration::from_secs(10)).unwrap();
            // Different init seed: the broadcast must make rank 1 start from rank 0's weights.
            let mut t = trainer(99, Box::new(c), None);
            t.broadcast_weights().unwrap();
            let losses: Vec<f64> = (0..5).map(|_| t.step(&supervised(&PAIRS[2..])).unwrap().metrics["loss"]).collect();
            (t.weights_digest(), losses)
        });
        let c = TcpCollective::connect(0, 2, Some(listener), root, Duration::from_secs(10)).unwrap();
        let mut t = trainer(3, Box::new(c), None);
        t.broadcast_weights().unwrap();
        let losses: Vec<f64> = (0..5).map(|_| t.step(&supervised(&PAIRS[..2])).unwrap().metrics["loss"]).collect();
        let (leaf_digest, leaf_losses) = leaf.join().unwrap();
        assert_eq!(t.weights_digest(), leaf_digest);
        assert_eq!(losses, leaf_losses, "metrics are summed over ranks, so both ranks report the same");
        assert!(losses[4] < losses[0], "{losses:?}");
    }

    /// Issue #15: rank 1 dies before step 2's all-reduce. Rank 0's step fails and leaves its
    /// weights and optimizer alone; redone alone on the whole batch (the group shrunk to one
    /// rank), it ends where one learner that trained the whole batch all along ends.
    #[test]
    fn a_step_cut_short_by_a_lost_rank_is_redone_by_the_survivor_exactly() {
        let mut alone = trainer(3, Box::new(SingleRank), None);
        for _ in 0..3 {
            alone.step(&supervised(&PAIRS)).unwrap();
        }
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let root = listener.local_addr().unwrap();
        let leaf = std::thread::spawn(move || {
            let c = TcpCollective::connect(1, 2, None, root, Duration::from_secs(10)).unwrap();
            let mut t = trainer(3, Box::new(c), None);
            for _ in 0..2 {
                t.step(&supervised(&PAIRS[2..])).unwrap();
            }
            // Dropped here: its sockets close as a killed process's would.
        });
        let c = TcpCollective::connect(0, 2, Some(listener), root, Duration::from_secs(10)).unwrap();
        let mut t = trainer(3, Box::new(c.with_op_timeout(Duration::from_secs(5)).unwrap()), None);
        for _ in 0..2 {
            t.step(&supervised(&PAIRS[..2])).unwrap();
        }
        leaf.join().unwrap();
        let before = (t.weights_digest(), t.step_index(), t.optimizer.steps);
        let err = t.step(&supervised(&PAIRS[..2])).err().unwrap();
        assert!(matches!(err, TrainError::Collective(_)), "{err}");
        assert_eq!((t.weights_digest(), t.step_index(), t.optimizer.steps), before, "nothing of the cut step applied");
        t.replace_collective(Box::new(SingleRank));
        t.sync_from_root().unwrap();
        t.step(&supervised(&PAIRS)).unwrap();
        assert_eq!(t.step_index(), 3);
        // Two ranks on halves equal one on the whole batch up to float summation order.
        let diff = max_difference(&t.policy().all_tensors(), &alone.policy().all_tensors());
        assert!(diff < 1e-5, "the survivor and one learner differ by {diff}");
    }

    /// A rank that is behind (a replacement) takes rank 0's whole state when a group forms.
    #[test]
    fn a_new_group_starts_from_rank_zeros_state() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let root = listener.local_addr().unwrap();
        let behind = std::thread::spawn(move || {
            let c = TcpCollective::connect(1, 2, None, root, Duration::from_secs(10)).unwrap();
            let mut t = trainer(8, Box::new(SingleRank), None);
            t.replace_collective(Box::new(c));
            t.sync_from_root().unwrap();
            t.step(&supervised(&PAIRS[2..])).unwrap();
            (t.weights_digest(), t.step_index(), t.optimizer.steps)
        });
        let mut t = trainer(3, Box::new(SingleRank), None);
        for _ in 0..2 {
            t.step(&supervised(&PAIRS)).unwrap();
        }
        let c = TcpCollective::connect(0, 2, Some(listener), root, Duration::from_secs(10)).unwrap();
        t.replace_collective(Box::new(c));
        t.sync_from_root().unwrap();
        t.step(&supervised(&PAIRS[..2])).unwrap();
        assert_eq!(behind.join().unwrap(), (t.weights_digest(), 3, 3));
    }

    fn completion(text: &str, reward: f32, policy: &BytePolicy, prompt: &str) -> Completion {
        let (ids, mask) = policy.encode_answers(&[text.to_string()], 64).unwrap();
        let prompts = policy.encode_prompts(&[(prompt.to_string(), ModalityInputs::default())], 64).unwrap();
        let logp = tch::no_grad(|| policy.score(&prompts, &ids, &mask, 1.0, false));
        Completion {
            token_ids: Vec::<i64>::try_from(ids.view([-1])).unwrap(),
            logprobs: Vec::<f32>::try_from(logp.view([-1])).unwrap(),
            reward,
            reward_parts: [("jaccard".to_string(), reward), ("format".to_string(), 1.0)].into_iter().collect(),
            text: text.into(),
            truncated: false,
            token_policy_versions: Vec::new(),
        }
    }

    fn grpo_options() -> GrpoStepOptions {
        GrpoStepOptions {
            loss: GrpoOptions { beta: 0.0, ..GrpoOptions::default() },
            group_size: 2,
            temperature: 1.0,
            old_logprobs: OldLogprobs::Sampler,
        }
    }

    #[test]
    fn grpo_steps_raise_the_better_completion_and_count_ties() {
        let mut t = trainer(4, Box::new(SingleRank), Some(grpo_options()));
        let q = "<lab> which?";
        let sample = br#"{"id":"s","split":"train","kind":"disease","encounter_id":"e","ecg":null,"cxr":null,"lab":"l.csv","question":"<lab> which?","answer":"<answer>x</answer>","labels":[]}"#;
        let group = |good: f32, bad: f32, policy: &BytePolicy| RolloutGroup {
            prompt_id: 1,
            completions: vec![completion("<answer>sepsis</answer>", good, policy, q), completion("zz", bad, policy, q)],
            prompt: Some(Prompt { prompt_id: 1, epoch: 0, sample_json: sample.to_vec().into() }),
            ..Default::default()
        };
        let margin = |policy: &BytePolicy| {
            let g = group(1.0, 0.0, policy);
            let mean = |c: &Completion| c.logprobs.iter().sum::<f32>() / c.logprobs.len() as f32;
            mean(&g.completions[0]) - mean(&g.completions[1])
        };
        let before = margin(t.policy());
        for _ in 0..10 {
            // Rebuild the groups each step: on-policy behaviour log-probs, as a fresh rollout.
            let groups = vec![group(1.0, 0.0, t.policy()), group(0.5, 0.5, t.policy())];
            let prompts = vec![(q.to_string(), ModalityInputs::default()); 2];
            let m = t.step(&StepData::Grpo { groups, prompts }).unwrap().metrics;
            assert_eq!(m["tied_groups"], 1.0);
            assert_eq!(m["groups_trained"], 2.0, "tied groups are filtered by the coordinator, not here");
            assert_eq!(m["completions"], 4.0);
            assert!((m["reward_mean"] - 0.5).abs() < 1e-6);
            assert!(m["clip_fraction"] >= 0.0 && m["clip_fraction"] <= 1.0);
        }
        let after = margin(t.policy());
        assert!(after > before + 0.5, "log-prob margin of the rewarded completion {before} -> {after}");
    }

    /// On-policy GRPO on a reward the policy can learn: sample G completions per prompt from the
    /// current policy, reward each by the share of its bytes below 128 (about one half at
    /// initialisation), train, repeat. The mean sampled reward must rise well above its start.
    #[test]
    fn on_policy_grpo_raises_the_mean_sampled_reward() {
        let g = 8;
        let opts = GrpoStepOptions {
            loss: GrpoOptions { beta: 0.0, ..GrpoOptions::default() },
            group_size: g,
            temperature: 1.0,
            old_logprobs: OldLogprobs::Sampler,
        };
        let mut t = trainer(5, Box::new(SingleRank), Some(opts));
        let questions = ["<lab> which?", "<ecg> rhythm?", "<cxr> lungs?", "<lab> kidneys?"];
        let sample = br#"{"id":"s","split":"train","kind":"disease","encounter_id":"e","ecg":null,"cxr":null,"lab":null,"question":"q","answer":"<answer>x</answer>","labels":[]}"#;
        let mut means = Vec::new();
        for step in 0..40u64 {
            let prompts: Vec<PromptInput> =
                questions.iter().map(|q| (q.to_string(), ModalityInputs::default())).collect();
            let encoded = t.policy().encode_prompts(&prompts, 64).unwrap();
            let repeated = t.policy().repeat_prompts(&encoded, g as i64);
            let sampling =
                RolloutSampling { max_new_tokens: 6, temperature: 1.0, top_p: 1.0, top_k: 0, seed: 1000 + step };
            let sampled = t.policy().sample(&repeated, &sampling).unwrap();
            let mut total = 0.0;
            let groups: Vec<RolloutGroup> = (0..questions.len())
                .map(|i| RolloutGroup {
                    prompt_id: i as u64,
                    completions: (i * g..(i + 1) * g)
                        .map(|row| {
                            let ids = &sampled.tokens[row];
                            let reward = ids.iter().filter(|&&id| id < 128).count() as f32 / ids.len().max(1) as f32;
                            total += f64::from(reward);
                            Completion {
                                token_ids: ids.clone(),
                                logprobs: sampled.logprobs[row].clone(),
                                reward,
                                ..Default::default()
                            }
                        })
                        .collect(),
                    prompt: Some(Prompt { prompt_id: i as u64, epoch: 0, sample_json: sample.to_vec().into() }),
                    ..Default::default()
                })
                .collect();
            means.push(total / (questions.len() * g) as f64);
            t.step(&StepData::Grpo { groups, prompts }).unwrap();
        }
        let first: f64 = means[..5].iter().sum::<f64>() / 5.0;
        let last: f64 = means[35..].iter().sum::<f64>() / 5.0;
        assert!(
            first < 0.7 && last > first + 0.2,
            "mean sampled reward {first:.3} (first 5 steps) -> {last:.3} (last 5): {means:?}"
        );
    }

    #[test]
    fn checkpoint_resume_continues_bit_identically() {
        let dir = tempfile::tempdir().unwrap();
        let data = supervised(&PAIRS);
        let mut straight = trainer(5, Box::new(SingleRank), None);
        for _ in 0..3 {
            straight.step(&data).unwrap();
        }
        let mut first = trainer(5, Box::new(SingleRank), None);
        for _ in 0..2 {
            first.step(&data).unwrap();
        }
        first.save_checkpoint(dir.path()).unwrap();
        let (loaded, skipped) = checkpoint::latest_valid(dir.path());
        assert!(skipped.is_empty());
        // A resumed learner starts from a differently initialised model and takes over.
        let mut resumed = trainer(6, Box::new(SingleRank), None);
        resumed.restore(&loaded.unwrap()).unwrap();
        assert_eq!(resumed.step_index(), 2);
        resumed.step(&data).unwrap();
        assert_eq!(resumed.weights_digest(), straight.weights_digest());
    }

    /// Trains `steps` steps of `shards[r]` on rank `r` of `shards.len()` ranks (threads, the TCP
    /// collective when more than one), every rank starting from the same seed; returns each rank's
    /// final weights.
    fn train_shards(shards: Vec<StepData>, steps: usize, grpo: Option<GrpoStepOptions>) -> Vec<Vec<(String, Tensor)>> {
        let world = shards.len();
        let run = move |collective: Box<dyn GradientCollective>, data: StepData| {
            let mut t = trainer(21, collective, grpo);
            for _ in 0..steps {
                assert!(!t.step(&data).unwrap().skipped);
            }
            t.policy().all_tensors()
        };
        if world == 1 {
            return shards.into_iter().map(|data| run(Box::new(SingleRank), data)).collect();
        }
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let root = listener.local_addr().unwrap();
        let mut listener = Some(listener);
        let handles: Vec<_> = shards
            .into_iter()
            .enumerate()
            .map(|(rank, data)| {
                let listener = if rank == 0 { listener.take() } else { None };
                std::thread::spawn(move || {
                    let c = TcpCollective::connect(rank, world, listener, root, Duration::from_secs(10)).unwrap();
                    run(Box::new(c), data)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    }

    /// Largest absolute difference between two sets of weights of the same names.
    fn max_difference(a: &[(String, Tensor)], b: &[(String, Tensor)]) -> f64 {
        a.iter()
            .zip(b)
            .map(|((na, ta), (nb, tb))| {
                assert_eq!(na, nb);
                (ta - tb).abs().max().double_value(&[])
            })
            .fold(0.0, f64::max)
    }

    /// Issue #5: two learners each on half of a batch equal one learner on the whole batch, the
    /// halves having different answer-token counts (9 and 7 here), with two micro-batches each.
    #[test]
    fn two_learners_equal_one_learner_with_twice_the_batch_in_sft() {
        let one = train_shards(vec![supervised(&PAIRS)], 6, None);
        let two = train_shards(vec![supervised(&PAIRS[..2]), supervised(&PAIRS[2..])], 6, None);
        let init = BytePolicy::with_seed(16, 21).all_tensors();
        assert!(
            max_difference(&one[0], &init) > 0.05,
            "training must move the weights for the comparison to mean anything"
        );
        assert_eq!(max_difference(&two[0], &two[1]), 0.0, "the two ranks hold identical weights");
        let diff = max_difference(&one[0], &two[0]);
        assert!(diff < 1e-5, "one learner and two learners differ by {diff}");
    }

    /// The same for a GRPO step, in every loss aggregation mode: each rank's loss numerator is
    /// divided by the step's global denominator (tokens or sequences), so the split does not
    /// matter. Dr. GRPO's token-sum divisor must be a constant (the trainer uses
    /// grpo.max_new_tokens): the default, the batch's longest completion, differs between shards.
    #[test]
    fn two_learners_equal_one_learner_with_twice_the_batch_in_grpo() {
        let policy = BytePolicy::with_seed(16, 21);
        let q = "<lab> which?";
        let sample = br#"{"id":"s","split":"train","kind":"disease","encounter_id":"e","ecg":null,"cxr":null,"lab":"l.csv","question":"<lab> which?","answer":"<answer>x</answer>","labels":[]}"#;
        let group = |id: u64, texts: [&str; 2], rewards: [f32; 2]| RolloutGroup {
            prompt_id: id,
            completions: vec![
                completion(texts[0], rewards[0], &policy, q),
                completion(texts[1], rewards[1], &policy, q),
            ],
            prompt: Some(Prompt { prompt_id: id, epoch: 0, sample_json: sample.to_vec().into() }),
            ..Default::default()
        };
        // Completion lengths differ within and between the ranks' shards (16 vs 35 tokens).
        let groups = [
            group(1, ["<answer>sepsis</answer>", "zz"], [1.0, 0.0]),
            group(2, ["a", "<answer>pneumonia</answer>"], [0.2, 0.9]),
            group(3, ["<think>lactate up</think><answer>sepsis</answer>", "no"], [0.7, 0.1]),
            group(4, ["<answer>diabetes mellitus</answer>", "<answer>x</answer>"], [0.3, 0.6]),
        ];
        let data = |range: std::ops::Range<usize>| StepData::Grpo {
            groups: groups[range.clone()].to_vec(),
            prompts: vec![(q.to_string(), ModalityInputs::default()); range.len()],
        };
        for mode in [LossAggregation::TokenMean, LossAggregation::SeqMeanTokenMean, LossAggregation::SeqMeanTokenSum] {
            let mut opts = grpo_options();
            opts.loss.loss_aggregation = mode;
            opts.loss.token_sum_divisor = Some(32.0);
            let one = train_shards(vec![data(0..4)], 3, Some(opts));
            let two = train_shards(vec![data(0..2), data(2..4)], 3, Some(opts));
            assert!(max_difference(&one[0], &policy.all_tensors()) > 0.01, "{mode:?}: the weights must move");
            assert_eq!(max_difference(&two[0], &two[1]), 0.0, "{mode:?}: ranks differ");
            let diff = max_difference(&one[0], &two[0]);
            assert!(diff < 1e-5, "{mode:?}: one learner and two learners differ by {diff}");
        }
    }
}
