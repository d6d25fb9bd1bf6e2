//! The GRPO math as pure functions over tensors: group-relative advantages, the clipped
//! policy-ratio surrogate, KL estimators to the reference policy, loss aggregation over masked
//! tokens, and [`grpo_loss`] that combines them. Each function carries its formula; options are
//! typed enums a run config selects by snake_case name (the same names as medtvt-config's
//! `grpo` section).
//!
//! Shapes: `n_groups` prompts with `G` completions each; `b = n_groups * G` sequences of `t`
//! completion tokens; a `[b, t]` mask is 1 on real completion tokens and 0 on padding. Tensors
//! keep the caller's dtype and device; only the scalar metrics are copied to the host.

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum GrpoError {
    #[error("GRPO: {what} has shape {got:?}, expected {expected}")]
    Shape { what: &'static str, got: Vec<i64>, expected: String },

    #[error("GRPO: groups of {group_size} completions carry no relative signal; sample at least 2 per prompt")]
    GroupTooSmall { group_size: i64 },

    #[error("GRPO option {field} = {value} is invalid: {reason}")]
    BadOption { field: &'static str, value: f64, reason: &'static str },

    #[error(
        "GRPO: beta = {beta} needs the reference policy's log-probs, but none were given; pass them or set beta = 0"
    )]
    MissingReference { beta: f64 },

    #[error("GRPO: the importance-sampling correction needs the sampler's log-probs, but none were given")]
    MissingSamplerLogprobs,

    #[error("GRPO: reading a metric from a tensor failed: {0}")]
    Torch(#[from] tch::TchError),
}

// The options are the run config's own enums (advantage estimator, KL estimator, loss
// aggregation), so a config value reaches the loss without a translation table.
pub use medtvt_config::{AdvantageEstimator, ImportanceSampling, KlEstimator, LossAggregation};

/// Everything that selects and parameterises the GRPO loss.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GrpoOptions {
    pub advantage: AdvantageEstimator,
    /// The eps in (r - mean) / (std + eps); TRL uses 1e-4.
    pub advantage_eps: f64,
    /// The ratio is clipped below at 1 - eps_low (TRL `epsilon`, 0.2).
    pub eps_low: f64,
    /// The ratio is clipped above at 1 + eps_high (TRL `epsilon_high`, defaulting to `epsilon`;
    /// DAPO's clip-higher raises it, e.g. to 0.28).
    pub eps_high: f64,
    /// Dual-clip constant c > 1: for negative advantages the loss is capped at c * |A| (verl's
    /// `clip_ratio_c`, 3.0 there); `None` (TRL) disables it.
    pub dual_clip: Option<f64>,
    /// KL coefficient; 0 skips the reference policy entirely. 0.04 is the value the MedTVT-R1
    /// reference run used (TRL's default at the time; TRL now defaults to 0).
    pub beta: f64,
    pub kl_estimator: KlEstimator,
    pub loss_aggregation: LossAggregation,
    /// Dr. GRPO's constant divisor of token sums; `None` uses the completion axis length `t`,
    /// which equals TRL's `max_completion_length` when completions are padded to it.
    pub token_sum_divisor: Option<f64>,
    /// Correction of the sampler/learner mismatch (see [`importance_weights`]); needs
    /// [`GrpoBatch::logp_sampler`].
    pub importance_sampling: ImportanceSampling,
    /// The cap of the importance weights (TRL's `vllm_importance_sampling_clip_max`, 3.0).
    pub importance_sampling_cap: f64,
}

impl Default for GrpoOptions {
    fn default() -> Self {
        GrpoOptions {
            advantage: AdvantageEstimator::Grpo,
            advantage_eps: 1e-4,
            eps_low: 0.2,
            eps_high: 0.2,
            dual_clip: None,
            beta: 0.04,
            kl_estimator: KlEstimator::K3,
            loss_aggregation: LossAggregation::TokenMean,
            token_sum_divisor: None,
            importance_sampling: ImportanceSampling::None,
            importance_sampling_cap: 3.0,
        }
    }
}

impl GrpoOptions {
    /// Reject values that would make the loss meaningless, naming the field.
    // `!(x > 0.0)` on purpose: it refuses NaN too, which `x <= 0.0` would let through.
    #[allow(clippy::neg_cmp_op_on_partial_ord)]
    pub fn validate(&self) -> Result<(), GrpoError> {
        let bad = |field, value, reason| Err(GrpoError::BadOption { field, value, reason });
        if !(0.0..1.0).contains(&self.eps_low) {
            return bad("eps_low", self.eps_low, "must be in [0, 1)");
        }
        if !(self.eps_high >= 0.0) {
            return bad("eps_high", self.eps_high, "must be >= 0");
        }
        if !(self.advantage_eps >= 0.0) {
            return bad("advantage_eps", self.advantage_eps, "must be >= 0");
        }
        if !(self.beta >= 0.0) {
            return bad("beta", self.beta, "must be >= 0");
        }
        if let Some(c) = self.dual_clip {
            if !(c > 1.0) {
                return bad("dual_clip", c, "must be > 1 (it caps the loss of negative advantages at c * |A|)");
            }
        }
        if !(self.importance_sampling_cap > 1.0) {
            return bad("importance_sampling_cap", self.importance_sampling_cap, "must be > 1");
        }
        match self.token_sum_divisor {
            Some(d) if !(d > 0.0) => bad("token_sum_divisor", d, "must be > 0"),
            _ => Ok(()),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Advantages
// ---------------------------------------------------------------------------------------------

fn check_rewards(rewards: &Tensor) -> Result<(), GrpoError> {
    let size = rewards.size();
    if size.len() != 2 {
        return Err(GrpoError::Shape { what: "rewards", got: size, expected: "[n_groups, G]".into() });
    }
    if size[1] < 2 {
        return Err(GrpoError::GroupTooSmall { group_size: size[1] });
    }
    Ok(())
}

/// GRPO: A_i = (r_i - mean_j r_j) / (std_j r_j + eps), std unbiased (divisor G - 1) as
/// `torch.std` in TRL. A tied group (`medtvt_proto::groups`) gets A = 0.
pub fn grpo_advantages(rewards: &Tensor, eps: f64) -> Result<Tensor, GrpoError> {
    check_rewards(rewards)?;
    let std = rewards.std_dim(1, true, true); // [n_groups, 1]
    let mean = rewards.mean_dim(1, true, None);
    Ok((rewards - mean) / (std + eps))
}

/// Dr. GRPO: A_i = r_i - mean_j r_j.
pub fn dr_grpo_advantages(rewards: &Tensor) -> Result<Tensor, GrpoError> {
    check_rewards(rewards)?;
    let mean = rewards.mean_dim(1, true, None);
    Ok(rewards - mean)
}

/// RLOO: A_i = r_i - (sum_j r_j - r_i) / (G - 1), the baseline being the mean of the others.
pub fn rloo_advantages(rewards: &Tensor) -> Result<Tensor, GrpoError> {
    check_rewards(rewards)?;
    let g = rewards.size()[1] as f64;
    let sum = rewards.sum_dim_intlist(1, true, None); // [n_groups, 1]
    let leave_one_out_mean = (sum - rewards) / (g - 1.0);
    Ok(rewards - leave_one_out_mean)
}

/// The advantages `[n_groups, G]` the chosen estimator gives for a `[n_groups, G]` reward tensor.
pub fn group_advantages(rewards: &Tensor, estimator: AdvantageEstimator, eps: f64) -> Result<Tensor, GrpoError> {
    match estimator {
        AdvantageEstimator::Grpo => grpo_advantages(rewards, eps),
        AdvantageEstimator::DrGrpo => dr_grpo_advantages(rewards),
        AdvantageEstimator::Rloo => rloo_advantages(rewards),
    }
}

// ---------------------------------------------------------------------------------------------
// Clipped policy-ratio surrogate
// ---------------------------------------------------------------------------------------------

/// The ratio clip range and the optional dual-clip constant.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ClipRange {
    pub eps_low: f64,
    pub eps_high: f64,
    pub dual_clip: Option<f64>,
}

/// Per-token surrogate loss and where each clip was active (all `[b, t]`).
#[derive(Debug)]
pub struct ClippedPolicyLoss {
    pub per_token_loss: Tensor,
    /// ratio < 1 - eps_low with A < 0: the clipped term is taken and the gradient is 0.
    pub low_clipped: Tensor,
    /// ratio > 1 + eps_high with A > 0: the clipped term is taken and the gradient is 0.
    pub high_clipped: Tensor,
    /// A < 0 and the dual-clip cap c * |A| was taken (all false without dual clip).
    pub dual_clipped: Tensor,
}

/// PPO/GRPO clipped surrogate per token:
///
///   ratio = exp(logp - logp_old)
///   loss  = -min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A)
///
/// and with dual clip c (for A < 0 only): loss = min(loss, -c * A), so a very large ratio on a
/// bad completion cannot blow the loss up. `logp`, `logp_old`: `[b, t]`; `advantages`: `[b, 1]`
/// or `[b, t]` (broadcast over tokens).
pub fn clipped_policy_loss(
    logp: &Tensor,
    logp_old: &Tensor,
    advantages: &Tensor,
    clip: ClipRange,
) -> ClippedPolicyLoss {
    let ratio = (logp - logp_old).exp();
    let unclipped = &ratio * advantages;
    let clipped = ratio.clamp(1.0 - clip.eps_low, 1.0 + clip.eps_high) * advantages;
    let mut per_token_loss = -unclipped.minimum(&clipped);
    let negative = advantages.lt(0.0).expand_as(&ratio);
    let low_clipped = ratio.lt(1.0 - clip.eps_low).logical_and(&negative);
    let high_clipped = ratio.gt(1.0 + clip.eps_high).logical_and(&advantages.gt(0.0));
    let mut dual_clipped = low_clipped.zeros_like();
    if let Some(c) = clip.dual_clip {
        let cap = advantages * (-c); // positive where A < 0
        dual_clipped = per_token_loss.gt_tensor(&cap).logical_and(&negative);
        per_token_loss = per_token_loss.where_self(&dual_clipped.logical_not(), &cap.expand_as(&ratio));
    }
    ClippedPolicyLoss { per_token_loss, low_clipped, high_clipped, dual_clipped }
}

// ---------------------------------------------------------------------------------------------
// KL to the reference policy
// ---------------------------------------------------------------------------------------------

/// Per-token estimate of KL(pi || pi_ref) from the sampled tokens' log-probs (Schulman,
/// "Approximating KL divergence"), with log r = logp_ref - logp:
///
///   k1 = logp - logp_ref                       (unbiased, high variance, can be negative)
///   k2 = 0.5 * (logp - logp_ref)^2             (low variance, biased)
///   k3 = exp(logp_ref - logp) - (logp_ref - logp) - 1   (unbiased, low variance, >= 0)
pub fn kl_estimate(logp: &Tensor, logp_ref: &Tensor, estimator: KlEstimator) -> Tensor {
    match estimator {
        KlEstimator::K1 => logp - logp_ref,
        KlEstimator::K2 => (logp - logp_ref).square() * 0.5,
        KlEstimator::K3 => {
            let log_ratio = logp_ref - logp;
            log_ratio.exp() - log_ratio - 1.0
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Sampler/learner mismatch
// ---------------------------------------------------------------------------------------------

/// Per-token importance weights of the learner's policy against the sampler's, and where the
/// correction changed them (both `[b, t]`, no grad):
///
///   w = exp(logp - logp_sampler)
///   truncate: w' = min(w, cap)                    (truncated importance sampling, TIS)
///   mask:     w' = w if w <= cap else 0           (masked importance sampling, MIS)
///
/// With `old_logprobs = "learner"` the ratio starts at 1 and says nothing of how the sampler's
/// distribution (other kernels, other dtype, an older version) differs from the learner's;
/// multiplying the surrogate by w' corrects for it, the cap bounding the variance a rare
/// token with a tiny sampler probability would add (TRL's vLLM correction, verl's rollout
/// correction, both at token level).
pub fn importance_weights(
    logp: &Tensor,
    logp_sampler: &Tensor,
    mode: ImportanceSampling,
    cap: f64,
) -> (Tensor, Tensor) {
    let w = (logp.detach() - logp_sampler).exp();
    let over = w.gt(cap);
    let corrected = match mode {
        ImportanceSampling::None => return (w.ones_like(), over.zeros_like()),
        ImportanceSampling::Truncate => w.clamp_max(cap),
        ImportanceSampling::Mask => w.masked_fill(&over, 0.0),
    };
    (corrected, over)
}

/// How far the sampler's log-probs are from the learner's on some tokens, as sums that add up
/// over micro-batches and ranks. The percentile comes from a histogram of |delta| over
/// [`MISMATCH_BINS`] log-spaced bins, [`MISMATCH_BINS_PER_DECADE`] to a decade from
/// [`MISMATCH_FLOOR`] (smaller values count in the first bin, larger ones in the last).
#[derive(Debug, Clone, PartialEq)]
pub struct MismatchSums {
    /// Tokens compared.
    pub tokens: f64,
    /// sum |logp_learner - logp_sampler|.
    pub abs_sum: f64,
    /// max |logp_learner - logp_sampler| (0 with no tokens).
    pub abs_max: f64,
    /// Tokens whose ratio exp(logp_learner - logp_sampler) lies outside [1 - eps_low, 1 + eps_high].
    pub outside_clip: f64,
    /// Token counts per |delta| bin.
    pub histogram: Vec<f64>,
}

pub const MISMATCH_BINS: usize = 240;
pub const MISMATCH_BINS_PER_DECADE: f64 = 20.0;
pub const MISMATCH_FLOOR: f64 = 1e-10;

impl MismatchSums {
    pub fn empty() -> MismatchSums {
        MismatchSums { tokens: 0.0, abs_sum: 0.0, abs_max: 0.0, outside_clip: 0.0, histogram: vec![0.0; MISMATCH_BINS] }
    }

    pub fn add(&mut self, other: &MismatchSums) {
        self.tokens += other.tokens;
        self.abs_sum += other.abs_sum;
        self.abs_max = self.abs_max.max(other.abs_max);
        self.outside_clip += other.outside_clip;
        for (a, b) in self.histogram.iter_mut().zip(&other.histogram) {
            *a += b;
        }
    }

    /// The upper edge of the histogram bin holding the `q` quantile (e.g. 0.99) of |delta|: an
    /// upper bound within one bin width (a factor 10^(1/20), 12%) of the exact quantile.
    pub fn quantile(&self, q: f64) -> f64 {
        let wanted = q * self.tokens;
        let mut seen = 0.0;
        for (bin, count) in self.histogram.iter().enumerate() {
            seen += count;
            if seen >= wanted && seen > 0.0 {
                return (MISMATCH_FLOOR * 10f64.powf((bin + 1) as f64 / MISMATCH_BINS_PER_DECADE)).min(self.abs_max);
            }
        }
        self.abs_max
    }
}

/// [`MismatchSums`] of the tokens where `mask` `[b, t]` is 1, for learner log-probs `logp` and
/// sampler log-probs `logp_sampler` (both `[b, t]`) and the ratio clip range `clip`.
pub fn sampler_mismatch(
    logp: &Tensor,
    logp_sampler: &Tensor,
    mask: &Tensor,
    clip: ClipRange,
) -> Result<MismatchSums, GrpoError> {
    let on = mask.to_kind(Kind::Bool);
    let delta = (logp.detach().to_kind(Kind::Double) - logp_sampler.to_kind(Kind::Double)).masked_select(&on); // [n]
    let tokens = delta.numel() as f64;
    if tokens == 0.0 {
        return Ok(MismatchSums::empty());
    }
    let abs = delta.abs();
    let ratio = delta.exp();
    let outside = ratio.lt(1.0 - clip.eps_low).logical_or(&ratio.gt(1.0 + clip.eps_high));
    let bins = ((abs.clamp_min(MISMATCH_FLOOR).log10() - MISMATCH_FLOOR.log10()) * MISMATCH_BINS_PER_DECADE)
        .floor()
        .clamp(0.0, (MISMATCH_BINS - 1) as f64)
        .to_kind(Kind::Int64);
    let histogram = Vec::<f64>::try_from(bins.bincount(None::<Tensor>, MISMATCH_BINS as i64).to_kind(Kind::Double))?;
    Ok(MismatchSums {
        tokens,
        abs_sum: scalar(&abs.sum(Kind::Double))?,
        abs_max: scalar(&abs.max())?,
        outside_clip: scalar(&outside.sum(Kind::Double))?,
        histogram,
    })
}

// ---------------------------------------------------------------------------------------------
// Aggregation
// ---------------------------------------------------------------------------------------------

/// sum(values * mask) / max(sum(mask), 1): the mean over real tokens (0 when there are none).
pub fn masked_mean(values: &Tensor, mask: &Tensor) -> Tensor {
    let mask = mask.to_kind(values.kind());
    (values * &mask).sum(values.kind()) / mask.sum(values.kind()).clamp_min(1.0)
}

/// Reduce a `[b, t]` per-token loss over the `[b, t]` mask:
///
///   token_mean:          sum_{i,t} m L / max(sum_{i,t} m, 1)
///   seq_mean_token_mean: (1 / b) sum_i [ sum_t m L / max(sum_t m, 1) ]
///   seq_mean_token_sum:  (1 / b) sum_i [ sum_t m L ] / divisor   (divisor: a constant, e.g. t)
///
/// (The max(·, 1) guards, as in TRL, make an all-padding sequence count as 0.)
pub fn aggregate_loss(per_token: &Tensor, mask: &Tensor, mode: LossAggregation, token_sum_divisor: f64) -> Tensor {
    let numerator = aggregation_numerator(per_token, mask, mode, token_sum_divisor);
    let tokens = mask.to_kind(Kind::Double).sum(Kind::Double).double_value(&[]);
    numerator / aggregation_denominator(mode, tokens, mask.size()[0] as f64).max(1.0)
}

/// The sum every aggregation mode divides, so that `aggregate_loss = numerator / denominator`:
///
///   token_mean:          sum_{i,t} m L                        (denominator: tokens)
///   seq_mean_token_mean: sum_i [ sum_t m L / max(sum_t m, 1) ] (denominator: sequences)
///   seq_mean_token_sum:  sum_i [ sum_t m L ] / divisor        (denominator: sequences)
///
/// Numerators add up over micro-batches and learner ranks; dividing their total by the step's
/// total denominator gives exactly the loss of the whole step's batch on one learner, whatever
/// the shards' token counts (a mean of per-shard means would weight a shard's tokens by
/// 1 / its own token count instead).
pub fn aggregation_numerator(
    per_token: &Tensor,
    mask: &Tensor,
    mode: LossAggregation,
    token_sum_divisor: f64,
) -> Tensor {
    let kind = per_token.kind();
    let mask = mask.to_kind(kind);
    let masked = per_token * &mask;
    match mode {
        LossAggregation::TokenMean => masked.sum(kind),
        LossAggregation::SeqMeanTokenMean => {
            let sums = masked.sum_dim_intlist(1, false, kind); // [b]
            let counts = mask.sum_dim_intlist(1, false, kind).clamp_min(1.0);
            (sums / counts).sum(kind)
        }
        LossAggregation::SeqMeanTokenSum => masked.sum(kind) / token_sum_divisor,
    }
}

/// What a mode divides its numerator by: the real tokens for `token_mean`, the sequences
/// otherwise. Known before any forward pass (from the completions' lengths).
pub fn aggregation_denominator(mode: LossAggregation, tokens: f64, sequences: f64) -> f64 {
    match mode {
        LossAggregation::TokenMean => tokens,
        LossAggregation::SeqMeanTokenMean | LossAggregation::SeqMeanTokenSum => sequences,
    }
}

// ---------------------------------------------------------------------------------------------
// The combined loss
// ---------------------------------------------------------------------------------------------

/// The tensors one GRPO loss needs, for `b` sequences of `t` completion tokens.
#[derive(Debug, Clone, Copy)]
pub struct GrpoBatch<'a> {
    /// `[b, t]` log-probs of the sampled tokens under the policy being trained (with grad).
    pub logp: &'a Tensor,
    /// `[b, t]` behaviour log-probs from when the completions were sampled; `None` = on-policy
    /// (the detached `logp`, ratio 1, as TRL with one optimisation step per batch).
    pub logp_old: Option<&'a Tensor>,
    /// `[b, t]` reference-policy log-probs; needed only when beta > 0.
    pub logp_ref: Option<&'a Tensor>,
    /// `[b, t]` the sampler's log-probs of the tokens; needed only for the importance-sampling
    /// correction (when `logp_old` is the learner's own).
    pub logp_sampler: Option<&'a Tensor>,
    /// `[b]` one advantage per sequence.
    pub advantages: &'a Tensor,
    /// `[b, t]` 1 on completion tokens, 0 on padding.
    pub mask: &'a Tensor,
}

/// Scalar metrics of one loss evaluation (each a masked token mean unless said otherwise).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct GrpoMetrics {
    /// The total loss (policy + beta * KL, aggregated).
    pub loss: f64,
    /// The clipped surrogate alone, aggregated the same way.
    pub policy_loss: f64,
    /// Mean per-token KL estimate; `None` when beta = 0 (the reference was skipped).
    pub kl_mean: Option<f64>,
    /// Fraction of tokens where either ratio clip was active (TRL's `clip_ratio/region_mean`).
    pub clip_fraction: f64,
    pub clip_low_fraction: f64,
    pub clip_high_fraction: f64,
    pub dual_clip_fraction: f64,
    /// With an importance-sampling correction: the mean and max applied weight, and the fraction
    /// of tokens the cap truncated or masked (`None` without one).
    pub is_weight_mean: Option<f64>,
    pub is_weight_max: Option<f64>,
    pub is_corrected_fraction: Option<f64>,
    /// Over the `b` sequences.
    pub advantage_mean: f64,
    pub advantage_std: f64,
    pub advantage_min: f64,
    pub advantage_max: f64,
    /// Real (unmasked) tokens in the batch.
    pub tokens: f64,
}

/// The loss to backpropagate and its metrics.
#[derive(Debug)]
pub struct GrpoLoss {
    /// Scalar, with grad through `logp`: `numerator / max(denominator, 1)`.
    pub loss: Tensor,
    /// Scalar, with grad: the aggregation's [`aggregation_numerator`] of the total per-token
    /// loss, for a caller that normalises by a denominator summed over several batches.
    pub numerator: Tensor,
    /// This batch's [`aggregation_denominator`].
    pub denominator: f64,
    pub metrics: GrpoMetrics,
}

/// GRPO loss = aggregate( clipped_surrogate(logp, logp_old, A) + beta * KL(logp, logp_ref) ).
pub fn grpo_loss(batch: GrpoBatch<'_>, options: &GrpoOptions) -> Result<GrpoLoss, GrpoError> {
    options.validate()?;
    check_batch(&batch)?;
    let detached;
    let logp_old = match batch.logp_old {
        Some(old) => old,
        None => {
            detached = batch.logp.detach();
            &detached
        }
    };
    let clip = ClipRange { eps_low: options.eps_low, eps_high: options.eps_high, dual_clip: options.dual_clip };
    let advantages = batch.advantages.to_kind(batch.logp.kind()).unsqueeze(1); // [b, 1]
    let surrogate = clipped_policy_loss(batch.logp, logp_old, &advantages, clip);
    let correction = importance_term(&batch, options)?;
    let policy_per_token = match &correction {
        Some((weights, _)) => &surrogate.per_token_loss * weights,
        None => surrogate.per_token_loss.shallow_clone(),
    };
    let kl = kl_term(&batch, options)?;
    let per_token = match &kl {
        Some(kl) => &policy_per_token + kl * options.beta,
        None => policy_per_token.shallow_clone(),
    };
    let divisor = options.token_sum_divisor.unwrap_or(batch.mask.size()[1] as f64);
    let aggregate = |values: &Tensor| aggregate_loss(values, batch.mask, options.loss_aggregation, divisor);
    let numerator = aggregation_numerator(&per_token, batch.mask, options.loss_aggregation, divisor);
    let tokens = scalar(&batch.mask.to_kind(Kind::Double).sum(Kind::Double))?;
    let denominator = aggregation_denominator(options.loss_aggregation, tokens, batch.mask.size()[0] as f64);
    let loss = &numerator / denominator.max(1.0);
    let metrics = GrpoMetrics {
        loss: scalar(&loss)?,
        policy_loss: scalar(&aggregate(&policy_per_token))?,
        kl_mean: kl.as_ref().map(|kl| scalar(&masked_mean(kl, batch.mask))).transpose()?,
        clip_fraction: fraction(&surrogate.low_clipped.logical_or(&surrogate.high_clipped), batch.mask)?,
        clip_low_fraction: fraction(&surrogate.low_clipped, batch.mask)?,
        clip_high_fraction: fraction(&surrogate.high_clipped, batch.mask)?,
        dual_clip_fraction: fraction(&surrogate.dual_clipped, batch.mask)?,
        is_weight_mean: correction.as_ref().map(|(w, _)| scalar(&masked_mean(w, batch.mask))).transpose()?,
        is_weight_max: correction.as_ref().map(|(w, _)| masked_max(w, batch.mask)).transpose()?,
        is_corrected_fraction: correction.as_ref().map(|(_, over)| fraction(over, batch.mask)).transpose()?,
        advantage_mean: scalar(&batch.advantages.to_kind(Kind::Double).mean(Kind::Double))?,
        advantage_std: advantage_std(batch.advantages)?,
        advantage_min: scalar(&batch.advantages.min())?,
        advantage_max: scalar(&batch.advantages.max())?,
        tokens,
    };
    Ok(GrpoLoss { loss, numerator, denominator, metrics })
}

/// The importance weights and where the cap acted, or `None` without a correction.
fn importance_term(batch: &GrpoBatch<'_>, options: &GrpoOptions) -> Result<Option<(Tensor, Tensor)>, GrpoError> {
    if options.importance_sampling == ImportanceSampling::None {
        return Ok(None);
    }
    let sampler = batch.logp_sampler.ok_or(GrpoError::MissingSamplerLogprobs)?;
    let (weights, over) =
        importance_weights(batch.logp, sampler, options.importance_sampling, options.importance_sampling_cap);
    Ok(Some((weights.to_kind(batch.logp.kind()), over)))
}

/// The largest value on real tokens (0 when there are none).
fn masked_max(values: &Tensor, mask: &Tensor) -> Result<f64, GrpoError> {
    let on = values.masked_select(&mask.to_kind(Kind::Bool));
    if on.numel() == 0 {
        return Ok(0.0);
    }
    scalar(&on.max())
}

/// The per-token KL, or `None` when beta = 0 (the reference is then never touched).
fn kl_term(batch: &GrpoBatch<'_>, options: &GrpoOptions) -> Result<Option<Tensor>, GrpoError> {
    if options.beta == 0.0 {
        return Ok(None);
    }
    let logp_ref = batch.logp_ref.ok_or(GrpoError::MissingReference { beta: options.beta })?;
    Ok(Some(kl_estimate(batch.logp, logp_ref, options.kl_estimator)))
}

fn check_batch(batch: &GrpoBatch<'_>) -> Result<(), GrpoError> {
    let expected = batch.mask.size();
    let shape_error = |what, got: Vec<i64>, expected: String| Err(GrpoError::Shape { what, got, expected });
    if expected.len() != 2 {
        return shape_error("mask", expected, "[b, t]".into());
    }
    let pairs = [
        ("logp", Some(batch.logp)),
        ("logp_old", batch.logp_old),
        ("logp_ref", batch.logp_ref),
        ("logp_sampler", batch.logp_sampler),
    ];
    for (what, tensor) in pairs {
        if let Some(tensor) = tensor {
            if tensor.size() != expected {
                return shape_error(what, tensor.size(), format!("{expected:?} (the mask's shape)"));
            }
        }
    }
    if batch.advantages.size() != [expected[0]] {
        return shape_error("advantages", batch.advantages.size(), format!("[{}] (one per sequence)", expected[0]));
    }
    Ok(())
}

fn scalar(tensor: &Tensor) -> Result<f64, GrpoError> {
    Ok(f64::try_from(tensor.detach().to_kind(Kind::Double))?)
}

fn fraction(flags: &Tensor, mask: &Tensor) -> Result<f64, GrpoError> {
    scalar(&masked_mean(&flags.to_kind(Kind::Double), &mask.to_kind(Kind::Double)))
}

/// Unbiased std over the sequences (0 for a single sequence rather than NaN).
fn advantage_std(advantages: &Tensor) -> Result<f64, GrpoError> {
    if advantages.numel() < 2 {
        return Ok(0.0);
    }
    scalar(&advantages.to_kind(Kind::Double).std(true))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::de::value::{Error as DeError, MapDeserializer, StrDeserializer};
    use serde::de::IntoDeserializer;

    fn t2(rows: &[&[f64]]) -> Tensor {
        let flat: Vec<f64> = rows.iter().flat_map(|r| r.iter().copied()).collect();
        Tensor::from_slice(&flat).view([rows.len() as i64, rows[0].len() as i64])
    }

    fn values(t: &Tensor) -> Vec<f64> {
        Vec::<f64>::try_from(t.detach().to_kind(Kind::Double).flatten(0, -1)).unwrap()
    }

    fn assert_all_close(got: &[f64], want: &[f64]) {
        assert_eq!(got.len(), want.len(), "{got:?} vs {want:?}");
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-9, "{got:?} vs {want:?}");
        }
    }

    #[test]
    fn grpo_advantages_normalise_by_unbiased_std() {
        let rewards = t2(&[&[1.0, 0.0, 0.0, 1.0], &[2.0, 2.0, 2.0, 2.0]]);
        let out = grpo_advantages(&rewards, 1e-4).unwrap();
        // Group 1: mean 0.5; unbiased std = sqrt(4 * 0.25 / 3) = sqrt(1/3); A = ±0.5 / (sqrt(1/3) + 1e-4).
        let a = 0.5 / ((1.0f64 / 3.0).sqrt() + 1e-4);
        // Group 2: all equal (tied) -> A = 0 / (0 + eps) = 0.
        assert_all_close(&values(&out), &[a, -a, -a, a, 0.0, 0.0, 0.0, 0.0]);
    }

    #[test]
    fn dr_grpo_advantages_subtract_the_mean_only() {
        let out = dr_grpo_advantages(&t2(&[&[1.0, 0.0, 0.0, 1.0], &[3.0, 1.0, 2.0, 2.0]])).unwrap();
        // Means 0.5 and 2.
        assert_all_close(&values(&out), &[0.5, -0.5, -0.5, 0.5, 1.0, -1.0, 0.0, 0.0]);
    }

    #[test]
    fn rloo_advantages_use_the_mean_of_the_others() {
        let out = rloo_advantages(&t2(&[&[1.0, 0.0, 0.0, 1.0], &[3.0, 1.0, 2.0, 2.0], &[5.0, 5.0, 5.0, 5.0]])).unwrap();
        // 1 - (0+0+1)/3 = 2/3, 0 - (1+0+1)/3 = -2/3; 3 - 5/3 = 4/3, 1 - 7/3 = -4/3, 2 - 6/3 = 0.
        let (a, b) = (2.0 / 3.0, 4.0 / 3.0);
        assert_all_close(&values(&out), &[a, -a, -a, a, b, -b, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]);
    }

    #[test]
    fn advantage_inputs_are_checked() {
        let flat = Tensor::from_slice(&[1.0f64, 2.0]);
        assert!(matches!(grpo_advantages(&flat, 1e-4), Err(GrpoError::Shape { what: "rewards", .. })));
        let single = t2(&[&[1.0], &[2.0]]);
        let err = group_advantages(&single, AdvantageEstimator::Rloo, 1e-4).unwrap_err();
        assert!(matches!(err, GrpoError::GroupTooSmall { group_size: 1 }), "{err}");
    }

    const CLIP: ClipRange = ClipRange { eps_low: 0.2, eps_high: 0.2, dual_clip: None };

    /// Five tokens of one sequence, logp_old = 0, ratios 1.1, 1.5, 0.5, 0.9, 1.5 with per-token
    /// advantages +1, +1, -1, -1, -1.
    fn five_tokens() -> (Tensor, Tensor, Tensor) {
        let ratios = [1.1f64, 1.5, 0.5, 0.9, 1.5];
        let logp = Tensor::from_slice(&ratios.map(f64::ln)).view([1, 5]).set_requires_grad(true);
        let old = Tensor::zeros([1, 5], (Kind::Double, tch::Device::Cpu));
        let adv = t2(&[&[1.0, 1.0, -1.0, -1.0, -1.0]]);
        (logp, old, adv)
    }

    #[test]
    fn clipped_loss_takes_the_pessimistic_term() {
        let (logp, old, adv) = five_tokens();
        let out = clipped_policy_loss(&logp, &old, &adv, CLIP);
        // -min(1.1, 1.1) = -1.1; -min(1.5, 1.2) = -1.2 (high clip); -min(-0.5, -0.8) = 0.8 (low
        // clip); -min(-0.9, -0.9) = 0.9; -min(-1.5, -1.2) = 1.5 (A < 0: the large ratio is kept).
        assert_all_close(&values(&out.per_token_loss), &[-1.1, -1.2, 0.8, 0.9, 1.5]);
        assert_all_close(&values(&out.high_clipped), &[0.0, 1.0, 0.0, 0.0, 0.0]);
        assert_all_close(&values(&out.low_clipped), &[0.0, 0.0, 1.0, 0.0, 0.0]);
        assert_all_close(&values(&out.dual_clipped), &[0.0; 5]);
    }

    #[test]
    fn clipped_tokens_get_zero_gradient() {
        let (logp, old, adv) = five_tokens();
        clipped_policy_loss(&logp, &old, &adv, CLIP).per_token_loss.sum(Kind::Double).backward();
        // d(-ratio * A)/dlogp = -ratio * A where unclipped; 0 where the clipped term is taken.
        assert_all_close(&values(&logp.grad()), &[-1.1, 0.0, 0.0, 0.9, 1.5]);
    }

    #[test]
    fn dual_clip_caps_negative_advantage_losses() {
        let (logp, old, adv) = five_tokens();
        let dual = ClipRange { dual_clip: Some(1.3), ..CLIP };
        let out = clipped_policy_loss(&logp, &old, &adv, dual);
        // Only the last token's loss 1.5 exceeds c * |A| = 1.3.
        assert_all_close(&values(&out.per_token_loss), &[-1.1, -1.2, 0.8, 0.9, 1.3]);
        assert_all_close(&values(&out.dual_clipped), &[0.0, 0.0, 0.0, 0.0, 1.0]);
        out.per_token_loss.sum(Kind::Double).backward();
        assert_all_close(&values(&logp.grad()), &[-1.1, 0.0, 0.0, 0.9, 0.0]);
    }

    #[test]
    fn kl_estimators_at_equal_and_known_log_probs() {
        let logp = t2(&[&[-1.0, 0.0]]);
        let reference = t2(&[&[-1.0, 0.5f64.ln()]]);
        let ln2 = 2.0f64.ln();
        // Token 1: equal -> 0 for every estimator. Token 2: logp - ref = ln 2.
        assert_all_close(&values(&kl_estimate(&logp, &reference, KlEstimator::K1)), &[0.0, ln2]);
        assert_all_close(&values(&kl_estimate(&logp, &reference, KlEstimator::K2)), &[0.0, 0.5 * ln2 * ln2]);
        // k3 = exp(-ln 2) - (-ln 2) - 1 = 0.5 + ln 2 - 1 ≈ 0.193147.
        assert_all_close(&values(&kl_estimate(&logp, &reference, KlEstimator::K3)), &[0.0, 0.5 + ln2 - 1.0]);
    }

    fn padded_batch() -> (Tensor, Tensor) {
        // Padding positions hold large values that must not leak into any mode.
        (t2(&[&[1.0, 2.0, 300.0], &[4.0, 500.0, 600.0]]), t2(&[&[1.0, 1.0, 0.0], &[1.0, 0.0, 0.0]]))
    }

    #[test]
    fn aggregation_modes_hand_computed() {
        let (loss, mask) = padded_batch();
        let get = |mode| values(&aggregate_loss(&loss, &mask, mode, 3.0))[0];
        // (1 + 2 + 4) / 3 tokens.
        assert!((get(LossAggregation::TokenMean) - 7.0 / 3.0).abs() < 1e-12);
        // ((1 + 2) / 2 + 4 / 1) / 2 = 2.75.
        assert!((get(LossAggregation::SeqMeanTokenMean) - 2.75).abs() < 1e-12);
        // ((1 + 2) + 4) / 2 sequences / 3 = 7 / 6.
        assert!((get(LossAggregation::SeqMeanTokenSum) - 7.0 / 6.0).abs() < 1e-12);
    }

    #[test]
    fn numerators_and_denominators_of_shards_add_up_to_the_whole_batch() {
        // Two shards of unequal token counts: summing numerators and denominators over shards
        // gives the whole batch's loss in every mode, which a mean of the shards' losses does not.
        let (loss, mask) = padded_batch();
        for mode in [LossAggregation::TokenMean, LossAggregation::SeqMeanTokenMean, LossAggregation::SeqMeanTokenSum] {
            let whole = values(&aggregate_loss(&loss, &mask, mode, 3.0))[0];
            let (mut num, mut den) = (0.0, 0.0);
            for row in 0..2 {
                let (l, m) = (loss.narrow(0, row, 1), mask.narrow(0, row, 1));
                num += values(&aggregation_numerator(&l, &m, mode, 3.0))[0];
                den += aggregation_denominator(mode, values(&m.sum(Kind::Double))[0], 1.0);
            }
            assert!((num / den - whole).abs() < 1e-12, "{mode:?}: {} vs {whole}", num / den);
        }
        // Token mean of shard means: (1.5 + 4) / 2 = 2.75, not the batch's 7 / 3.
        let shard_means: f64 = (0..2)
            .map(|r| {
                values(&aggregate_loss(&loss.narrow(0, r, 1), &mask.narrow(0, r, 1), LossAggregation::TokenMean, 3.0))
                    [0]
            })
            .sum::<f64>()
            / 2.0;
        assert!((shard_means - 2.75).abs() < 1e-12);
    }

    #[test]
    fn all_padding_sequence_counts_as_zero() {
        let loss = t2(&[&[2.0, 4.0], &[9.0, 9.0]]);
        let mask = t2(&[&[1.0, 1.0], &[0.0, 0.0]]);
        // Sequence 2 has no tokens: (3 + 0) / 2.
        assert_eq!(values(&aggregate_loss(&loss, &mask, LossAggregation::SeqMeanTokenMean, 2.0))[0], 1.5);
        assert_eq!(values(&masked_mean(&loss, &Tensor::zeros([2, 2], (Kind::Double, tch::Device::Cpu))))[0], 0.0);
    }

    #[test]
    fn grpo_loss_on_policy_with_kl_hand_computed() {
        // Two sequences of 2 tokens; the second token of sequence 2 is padding.
        let logp = t2(&[&[-1.0, -2.0], &[-0.5, -7.0]]).set_requires_grad(true);
        let reference = t2(&[&[-1.0, -2.0 + 2.0f64.ln()], &[-0.5, 0.0]]);
        let mask = t2(&[&[1.0, 1.0], &[1.0, 0.0]]);
        let advantages = Tensor::from_slice(&[1.0f64, -2.0]);
        let options = GrpoOptions { beta: 0.1, ..GrpoOptions::default() };
        let batch = GrpoBatch {
            logp: &logp,
            logp_old: None,
            logp_ref: Some(&reference),
            logp_sampler: None,
            advantages: &advantages,
            mask: &mask,
        };
        let out = grpo_loss(batch, &options).unwrap();
        // On-policy: ratio 1, surrogate = -A per token: [-1, -1, 2]; token mean = 0 / 3 = 0.
        // k3 on token 2 of sequence 1 (ref - logp = ln 2): 2 - ln 2 - 1; others 0.
        let k3 = 1.0 - 2.0f64.ln();
        let m = out.metrics;
        assert!(m.policy_loss.abs() < 1e-12);
        assert!((m.kl_mean.unwrap() - k3 / 3.0).abs() < 1e-12);
        assert!((m.loss - 0.1 * k3 / 3.0).abs() < 1e-12);
        assert_eq!((m.clip_fraction, m.tokens), (0.0, 3.0));
        assert_eq!((m.advantage_mean, m.advantage_min, m.advantage_max), (-0.5, -2.0, 1.0));
        assert!((m.advantage_std - 4.5f64.sqrt()).abs() < 1e-12); // unbiased: (1.5² + 1.5²) / 1
        out.loss.backward();
        // d/dlogp: surrogate -A * ratio -> -A / 3; k3 -> beta * (1 - exp(ref - logp)) / 3.
        let kl_grad = 0.1 * (1.0 - 2.0) / 3.0;
        assert_all_close(&values(&logp.grad()), &[-1.0 / 3.0, -1.0 / 3.0 + kl_grad, 2.0 / 3.0, 0.0]);
    }

    #[test]
    fn grpo_loss_counts_clipping_against_behaviour_log_probs() {
        let logp = t2(&[&[1.5f64.ln(), 0.0]]);
        let old = Tensor::zeros([1, 2], (Kind::Double, tch::Device::Cpu));
        let mask = t2(&[&[1.0, 1.0]]);
        let advantages = Tensor::from_slice(&[1.0f64]);
        let options = GrpoOptions { beta: 0.0, ..GrpoOptions::default() };
        let batch = GrpoBatch {
            logp: &logp,
            logp_old: Some(&old),
            logp_ref: None,
            logp_sampler: None,
            advantages: &advantages,
            mask: &mask,
        };
        let m = grpo_loss(batch, &options).unwrap().metrics;
        // Token 1: ratio 1.5 clipped to 1.2 -> -1.2; token 2: ratio 1 -> -1. Mean -1.1.
        assert!((m.loss + 1.1).abs() < 1e-12);
        assert_eq!((m.clip_fraction, m.clip_high_fraction, m.clip_low_fraction), (0.5, 0.5, 0.0));
        assert_eq!(m.kl_mean, None);
    }

    #[test]
    fn grpo_loss_rejects_missing_reference_and_bad_shapes() {
        let logp = t2(&[&[0.0, 0.0]]);
        let mask = t2(&[&[1.0, 1.0]]);
        let advantages = Tensor::from_slice(&[1.0f64]);
        let batch = GrpoBatch {
            logp: &logp,
            logp_old: None,
            logp_ref: None,
            logp_sampler: None,
            advantages: &advantages,
            mask: &mask,
        };
        let err = grpo_loss(batch, &GrpoOptions::default()).unwrap_err();
        assert!(matches!(err, GrpoError::MissingReference { .. }), "{err}");
        let wrong = Tensor::from_slice(&[1.0f64, 2.0]);
        let err =
            grpo_loss(GrpoBatch { advantages: &wrong, ..batch }, &GrpoOptions { beta: 0.0, ..Default::default() })
                .unwrap_err();
        assert!(err.to_string().contains("advantages has shape [2], expected [1] (one per sequence)"), "{err}");
    }

    #[test]
    fn importance_weights_truncate_or_mask_above_the_cap() {
        // Learner - sampler log-prob differences ln 0.5, 0, ln 3 (weights 0.5, 1, 3), cap 2.
        let logp = t2(&[&[0.5f64.ln(), 0.0, 3.0f64.ln()]]);
        let sampler = Tensor::zeros([1, 3], (Kind::Double, tch::Device::Cpu));
        let (w, over) = importance_weights(&logp, &sampler, ImportanceSampling::Truncate, 2.0);
        assert_all_close(&values(&w), &[0.5, 1.0, 2.0]);
        assert_all_close(&values(&over), &[0.0, 0.0, 1.0]);
        let (w, _) = importance_weights(&logp, &sampler, ImportanceSampling::Mask, 2.0);
        assert_all_close(&values(&w), &[0.5, 1.0, 0.0]);
    }

    #[test]
    fn importance_correction_scales_the_surrogate_and_reports_its_weights() {
        // On-policy ratio (old = None); the sampler saw token 2 three times less likely than the
        // learner does: its weight 3 is truncated to 2.
        let logp = t2(&[&[-1.0, -2.0]]).set_requires_grad(true);
        let sampler = t2(&[&[-1.0, -2.0 - 3.0f64.ln()]]);
        let mask = t2(&[&[1.0, 1.0]]);
        let advantages = Tensor::from_slice(&[1.0f64]);
        let options = GrpoOptions {
            beta: 0.0,
            importance_sampling: ImportanceSampling::Truncate,
            importance_sampling_cap: 2.0,
            ..Default::default()
        };
        let batch = GrpoBatch {
            logp: &logp,
            logp_old: None,
            logp_ref: None,
            logp_sampler: Some(&sampler),
            advantages: &advantages,
            mask: &mask,
        };
        let out = grpo_loss(batch, &options).unwrap();
        // Surrogate -A * ratio = -1 per token, weighted 1 and 2: token mean -1.5.
        assert!((out.metrics.loss + 1.5).abs() < 1e-12, "{}", out.metrics.loss);
        assert_eq!(
            (out.metrics.is_weight_mean, out.metrics.is_weight_max, out.metrics.is_corrected_fraction),
            (Some(1.5), Some(2.0), Some(0.5))
        );
        out.loss.backward();
        assert_all_close(&values(&logp.grad()), &[-0.5, -1.0]);
        let missing = GrpoBatch { logp_sampler: None, ..batch };
        assert!(matches!(grpo_loss(missing, &options), Err(GrpoError::MissingSamplerLogprobs)));
    }

    #[test]
    fn sampler_mismatch_counts_only_masked_tokens() {
        let logp = t2(&[&[-1.0, -2.0, -3.0], &[-1.0, 0.0, 0.0]]);
        let sampler = t2(&[&[-1.0 - 1e-6, -2.0 + 1e-3, -3.0 - 0.5], &[-1.0 - 0.7, 0.0, 9.0]]);
        // Row 2 was not sampled by the version being trained: masked out entirely.
        let mask = t2(&[&[1.0, 1.0, 1.0], &[0.0, 0.0, 0.0]]);
        let m = sampler_mismatch(&logp, &sampler, &mask, CLIP).unwrap();
        assert_eq!(m.tokens, 3.0);
        assert!((m.abs_sum - (1e-6 + 1e-3 + 0.5)).abs() < 1e-12);
        assert!((m.abs_max - 0.5).abs() < 1e-12);
        // Ratios e^(1e-6), e^(-1e-3), e^0.5 = 1.65: one outside [0.8, 1.2].
        assert_eq!(m.outside_clip, 1.0);
        assert_eq!(m.histogram.iter().sum::<f64>(), 3.0);
        // The 99th percentile is the largest of three: within one bin (12%) above 0.5, capped by the max.
        assert!((m.quantile(0.99) - 0.5).abs() < 1e-12);
        // The median is the 1e-3 token's bin: its upper edge is within 12% above it.
        let median = m.quantile(0.5);
        assert!((0.99e-3..=1.13e-3).contains(&median), "{median}");
        let none = sampler_mismatch(&logp, &sampler, &mask.zeros_like(), CLIP).unwrap();
        assert_eq!((none.tokens, none.abs_max), (0.0, 0.0));
    }

    #[test]
    fn options_validate_and_deserialise_from_snake_case() {
        assert!(GrpoOptions::default().validate().is_ok());
        let err = GrpoOptions { dual_clip: Some(0.5), ..Default::default() }.validate().unwrap_err();
        assert!(err.to_string().contains("dual_clip = 0.5"), "{err}");
        assert!(GrpoOptions { eps_low: 1.0, ..Default::default() }.validate().is_err());
        assert!(GrpoOptions { beta: -0.1, ..Default::default() }.validate().is_err());

        let estimator = |name: &'static str| {
            let de: StrDeserializer<DeError> = name.into_deserializer();
            AdvantageEstimator::deserialize(de)
        };
        assert_eq!(estimator("dr_grpo").unwrap(), AdvantageEstimator::DrGrpo);
        assert!(estimator("DrGrpo").is_err());
        let fields = vec![("advantage", "rloo"), ("kl_estimator", "k2"), ("loss_aggregation", "seq_mean_token_sum")];
        let options = GrpoOptions::deserialize(MapDeserializer::<_, DeError>::new(fields.into_iter())).unwrap();
        assert_eq!(options.advantage, AdvantageEstimator::Rloo);
        assert_eq!(options.kl_estimator, KlEstimator::K2);
        assert_eq!(options.loss_aggregation, LossAggregation::SeqMeanTokenSum);
        assert_eq!((options.eps_low, options.beta), (0.2, 0.04));
        let unknown = vec![("epsilon", "0.2")];
        assert!(GrpoOptions::deserialize(MapDeserializer::<_, DeError>::new(unknown.into_iter())).is_err());
    }
}
