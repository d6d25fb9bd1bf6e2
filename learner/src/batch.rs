//! Turning what the coordinator hands a learner into loss inputs, as pure functions: the
//! supervised next-token loss over answer tokens (PT/SFT), and the tensors of a GRPO step
//! assembled from rollout groups (completion ids, masks, behaviour log-probs, rewards).

use medtvt_data::QaSample;
use medtvt_proto::v1::RolloutGroup;
use std::ops::Range;
use tch::{Device, Kind, Tensor};

#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    #[error("training batch: sample {index} is not a QA JSON line: {source}")]
    Sample { index: usize, source: serde_json::Error },
    #[error("training batch: group of prompt {prompt_id} (epoch {epoch}) carries no prompt sample")]
    MissingPrompt { prompt_id: u64, epoch: u64 },
    #[error(
        "training batch: group of prompt {prompt_id} has {got} completions, expected grpo.group_size = {expected}"
    )]
    GroupSize { prompt_id: u64, got: usize, expected: usize },
    #[error("training batch: a completion of prompt {prompt_id} has {tokens} tokens but {logprobs} log-probs")]
    LogprobCount { prompt_id: u64, tokens: usize, logprobs: usize },
    #[error("training batch: a completion of prompt {prompt_id} is empty")]
    EmptyCompletion { prompt_id: u64 },
    #[error("training batch: a completion of prompt {prompt_id} has {tokens} tokens but {versions} token policy versions (0 or one per token)")]
    TokenVersionCount { prompt_id: u64, tokens: usize, versions: usize },
}

/// Parses raw QA JSONL lines (PT/SFT batches, or a group's prompt).
pub fn parse_samples<B: AsRef<[u8]>>(raw: &[B]) -> Result<Vec<QaSample>, BatchError> {
    raw.iter()
        .enumerate()
        .map(|(index, line)| {
            serde_json::from_slice(line.as_ref()).map_err(|source| BatchError::Sample { index, source })
        })
        .collect()
}

/// The PT/SFT loss: mean negative log-likelihood over the answer tokens only,
///
///   L = - sum_{i,t} m_{i,t} log p(y_{i,t} | x_i, y_{i,<t}) / sum_{i,t} m_{i,t}
///
/// where `logp` `[b, tc]` holds the log-probs of the reference answer tokens (the prompt is never
/// scored) and `mask` `[b, tc]` is 1 on real answer tokens and 0 on padding.
pub fn answer_nll(logp: &Tensor, mask: &Tensor) -> Tensor {
    -crate::grpo::masked_mean(logp, mask)
}

/// The numerator of [`answer_nll`], - sum_{i,t} m_{i,t} log p(y_{i,t} | ...): the trainer divides
/// the sum over a step's micro-batches and ranks by their total answer-token count.
pub fn answer_nll_sum(logp: &Tensor, mask: &Tensor) -> Tensor {
    -(logp * mask.to_kind(logp.kind())).sum(logp.kind())
}

/// Group `groups.len()` items into at most `parts` contiguous, near-equal, non-empty ranges
/// (the micro-batches of gradient accumulation).
pub fn micro_batches(len: usize, parts: usize) -> Vec<Range<usize>> {
    let parts = parts.clamp(1, len.max(1));
    let (base, extra) = (len / parts, len % parts);
    let mut start = 0;
    (0..parts)
        .map(|i| {
            let end = start + base + usize::from(i < extra);
            let range = start..end;
            start = end;
            range
        })
        .filter(|r| !r.is_empty())
        .collect()
}

/// Checks the groups' shapes and parses each group's prompt sample.
pub fn group_prompts(groups: &[RolloutGroup], group_size: usize) -> Result<Vec<QaSample>, BatchError> {
    groups
        .iter()
        .map(|g| {
            if g.completions.len() != group_size {
                return Err(BatchError::GroupSize {
                    prompt_id: g.prompt_id,
                    got: g.completions.len(),
                    expected: group_size,
                });
            }
            for c in &g.completions {
                if c.token_ids.is_empty() {
                    return Err(BatchError::EmptyCompletion { prompt_id: g.prompt_id });
                }
                if c.token_ids.len() != c.logprobs.len() {
                    return Err(BatchError::LogprobCount {
                        prompt_id: g.prompt_id,
                        tokens: c.token_ids.len(),
                        logprobs: c.logprobs.len(),
                    });
                }
                if !c.token_policy_versions.is_empty() && c.token_policy_versions.len() != c.token_ids.len() {
                    return Err(BatchError::TokenVersionCount {
                        prompt_id: g.prompt_id,
                        tokens: c.token_ids.len(),
                        versions: c.token_policy_versions.len(),
                    });
                }
            }
            let prompt =
                g.prompt.as_ref().ok_or(BatchError::MissingPrompt { prompt_id: g.prompt_id, epoch: g.epoch })?;
            serde_json::from_slice(&prompt.sample_json)
                .map_err(|source| BatchError::Sample { index: g.prompt_id as usize, source })
        })
        .collect()
}

/// The tensors of `n` groups of `G` completions, flattened group-major to `b = n * G` rows
/// (row `i * G + j` is completion `j` of group `i`, matching prompts repeated in place).
#[derive(Debug)]
pub struct GrpoTensors {
    /// `[b, t]` completion ids, right-padded with `pad_id`.
    pub ids: Tensor,
    /// `[b, t]` f32: 1 on completion tokens, 0 on padding.
    pub mask: Tensor,
    /// `[b, t]` f32 behaviour log-probs (0 on padding).
    pub logp_old: Tensor,
    /// `[n, G]` f32 total rewards.
    pub rewards: Tensor,
}

/// Assembles [`GrpoTensors`] from groups already checked by [`group_prompts`].
pub fn assemble_grpo(groups: &[RolloutGroup], pad_id: i64, device: Device) -> GrpoTensors {
    let completions: Vec<_> = groups.iter().flat_map(|g| g.completions.iter()).collect();
    let b = completions.len();
    let t = completions.iter().map(|c| c.token_ids.len()).max().unwrap_or(0);
    let mut ids = vec![pad_id; b * t];
    let mut mask = vec![0f32; b * t];
    let mut logp_old = vec![0f32; b * t];
    for (row, c) in completions.iter().enumerate() {
        for (col, (&id, &lp)) in c.token_ids.iter().zip(&c.logprobs).enumerate() {
            ids[row * t + col] = id;
            mask[row * t + col] = 1.0;
            logp_old[row * t + col] = lp;
        }
    }
    let g = groups.first().map_or(0, |g| g.completions.len());
    let rewards: Vec<f32> = completions.iter().map(|c| c.reward).collect();
    let shape = [b as i64, t as i64];
    GrpoTensors {
        ids: Tensor::from_slice(&ids).view(shape).to_device(device),
        mask: Tensor::from_slice(&mask).view(shape).to_device(device),
        logp_old: Tensor::from_slice(&logp_old).view(shape).to_device(device),
        rewards: Tensor::from_slice(&rewards)
            .view([groups.len() as i64, g as i64])
            .to_kind(Kind::Float)
            .to_device(device),
    }
}

/// Reward statistics of a shard: sums, so that ranks can add them up.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RewardSums {
    pub completions: f64,
    pub reward: f64,
    pub reward_sq: f64,
    pub jaccard: f64,
    pub format: f64,
    /// Completions that hit max_new_tokens without an end token.
    pub truncated: f64,
    /// Completion tokens, summed.
    pub completion_tokens: f64,
}

pub fn reward_sums(groups: &[RolloutGroup]) -> RewardSums {
    let mut sums = RewardSums::default();
    for c in groups.iter().flat_map(|g| g.completions.iter()) {
        let r = f64::from(c.reward);
        sums.completions += 1.0;
        sums.reward += r;
        sums.reward_sq += r * r;
        sums.jaccard += c.reward_parts.get("jaccard").copied().map_or(0.0, f64::from);
        sums.format += c.reward_parts.get("format").copied().map_or(0.0, f64::from);
        sums.truncated += f64::from(u8::from(c.truncated));
        sums.completion_tokens += c.token_ids.len() as f64;
    }
    sums
}

#[cfg(test)]
mod tests {
    use super::*;
    use medtvt_proto::v1::{Completion, Prompt};

    fn completion(tokens: &[i64], reward: f32) -> Completion {
        Completion {
            token_ids: tokens.to_vec(),
            logprobs: tokens.iter().map(|&t| -(t as f32) / 10.0).collect(),
            reward,
            reward_parts: [("jaccard".to_string(), reward / 2.0), ("format".to_string(), 1.0)].into_iter().collect(),
            text: String::new(),
            truncated: false,
            token_policy_versions: Vec::new(),
        }
    }

    fn sample_json(id: &str) -> Vec<u8> {
        format!(
            r#"{{"id":"{id}","split":"train","kind":"disease","encounter_id":"e1","ecg":null,"cxr":null,"lab":"lab/e1.csv","question":"<lab> which diseases?","answer":"<think>x</think><answer>sepsis</answer>","labels":["sepsis"]}}"#
        )
        .into_bytes()
    }

    fn group(prompt_id: u64, completions: Vec<Completion>) -> RolloutGroup {
        RolloutGroup {
            prompt_id,
            completions,
            prompt: Some(Prompt { prompt_id, epoch: 0, sample_json: sample_json(&format!("s{prompt_id}")).into() }),
            ..Default::default()
        }
    }

    #[test]
    fn answer_nll_counts_only_answer_tokens() {
        // Padding positions hold huge log-probs that would dominate the mean if counted.
        let logp = Tensor::from_slice(&[-1.0f32, -3.0, -1000.0, -2.0, -1000.0, -1000.0]).view([2, 3]);
        let mask = Tensor::from_slice(&[1.0f32, 1.0, 0.0, 1.0, 0.0, 0.0]).view([2, 3]);
        let loss = f64::try_from(answer_nll(&logp, &mask)).unwrap();
        assert!((loss - 2.0).abs() < 1e-6, "loss {loss}");
    }

    #[test]
    fn answer_nll_sum_is_the_mean_times_the_tokens() {
        let logp = Tensor::from_slice(&[-1.0f32, -3.0, -1000.0, -2.0, -1000.0, -1000.0]).view([2, 3]);
        let mask = Tensor::from_slice(&[1.0f32, 1.0, 0.0, 1.0, 0.0, 0.0]).view([2, 3]);
        let sum = f64::try_from(answer_nll_sum(&logp, &mask)).unwrap();
        assert!((sum - 6.0).abs() < 1e-6, "sum {sum}");
    }

    #[test]
    fn answer_nll_gradient_is_zero_on_padding() {
        let logp = Tensor::from_slice(&[-1.0f32, -3.0, -5.0, -2.0]).view([2, 2]).set_requires_grad(true);
        let mask = Tensor::from_slice(&[1.0f32, 1.0, 1.0, 0.0]).view([2, 2]);
        answer_nll(&logp, &mask).backward();
        let grad = Vec::<f32>::try_from(logp.grad().view([-1])).unwrap();
        assert_eq!(grad, vec![-1.0 / 3.0, -1.0 / 3.0, -1.0 / 3.0, 0.0]);
    }

    #[test]
    fn grpo_tensors_are_group_major_and_right_padded() {
        let groups = vec![
            group(7, vec![completion(&[5, 6, 2], 1.0), completion(&[9], 0.0)]),
            group(8, vec![completion(&[3, 2], 0.5), completion(&[4, 4, 4], 1.5)]),
        ];
        let prompts = group_prompts(&groups, 2).unwrap();
        assert_eq!(prompts.iter().map(|s| s.id.as_str()).collect::<Vec<_>>(), ["s7", "s8"]);
        let t = assemble_grpo(&groups, 0, Device::Cpu);
        assert_eq!(t.ids.size(), [4, 3]);
        assert_eq!(Vec::<i64>::try_from(t.ids.view([-1])).unwrap(), vec![5, 6, 2, 9, 0, 0, 3, 2, 0, 4, 4, 4]);
        assert_eq!(
            Vec::<f32>::try_from(t.mask.view([-1])).unwrap(),
            vec![1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0]
        );
        assert_eq!(Vec::<f32>::try_from(t.logp_old.view([-1])).unwrap()[..4], [-0.5, -0.6, -0.2, -0.9]);
        assert_eq!(Vec::<f32>::try_from(t.logp_old.view([-1])).unwrap()[4], 0.0);
        assert_eq!(t.rewards.size(), [2, 2]);
        assert_eq!(Vec::<f32>::try_from(t.rewards.view([-1])).unwrap(), vec![1.0, 0.0, 0.5, 1.5]);
        let sums = reward_sums(&groups);
        assert_eq!((sums.completions, sums.reward, sums.format), (4.0, 3.0, 4.0));
        assert!((sums.jaccard - 1.5).abs() < 1e-9);
    }

    #[test]
    fn malformed_groups_are_rejected_with_the_prompt_named() {
        let short = vec![group(3, vec![completion(&[1], 1.0)])];
        assert!(matches!(group_prompts(&short, 2), Err(BatchError::GroupSize { prompt_id: 3, got: 1, expected: 2 })));
        let mut bad = completion(&[1, 2], 1.0);
        bad.logprobs.pop();
        let uneven = vec![group(4, vec![bad, completion(&[1], 0.0)])];
        assert!(matches!(group_prompts(&uneven, 2), Err(BatchError::LogprobCount { prompt_id: 4, .. })));
        let mut versions = completion(&[1, 2], 1.0);
        versions.token_policy_versions = vec![3];
        let partial = vec![group(6, vec![versions, completion(&[1], 0.0)])];
        assert!(matches!(group_prompts(&partial, 2), Err(BatchError::TokenVersionCount { prompt_id: 6, .. })));
        let mut no_prompt = group(5, vec![completion(&[1], 1.0), completion(&[2], 0.0)]);
        no_prompt.prompt = None;
        assert!(matches!(group_prompts(&[no_prompt], 2), Err(BatchError::MissingPrompt { prompt_id: 5, .. })));
    }

    #[test]
    fn micro_batches_cover_everything_once() {
        assert_eq!(micro_batches(5, 2), vec![0..3, 3..5]);
        assert_eq!(micro_batches(2, 4), vec![0..1, 1..2]);
        assert_eq!(micro_batches(0, 3), Vec::<Range<usize>>::new());
        assert_eq!(micro_batches(4, 1), vec![0..4]);
    }
}
