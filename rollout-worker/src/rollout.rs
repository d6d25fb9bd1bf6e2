//! Turning sampled completions into rollout groups: decode, and reward every completion against
//! its prompt's reference answer (Jaccard over the disease sets + format). [`roll_out`] does a
//! whole lease at once (one static batch: the prompts repeated G times in place), as benchmarks
//! and tests use it; the worker's loop (`job.rs`) streams groups through the policy's rollout
//! engine and builds each with [`rewarded_group`]. Each group carries the trace context
//! (`traceparent`) of the lease it came from to the learner.

use medtvt_data::QaSample;
use medtvt_eval::{DiagnosisReward, RewardBreakdown};
use medtvt_model::policy::{Policy, PolicyError, RolloutSampling, Sampled};
use medtvt_proto::v1::{Completion, Lease, RolloutGroup};
use medtvt_role::inputs::InputLoader;

#[derive(Debug, thiserror::Error)]
pub enum RolloutError {
    #[error("lease {lease_id}: prompt {prompt_id} is not a QA JSON line: {source}")]
    Prompt { lease_id: u64, prompt_id: u64, source: serde_json::Error },
    #[error(transparent)]
    Data(#[from] medtvt_data::DataError),
    #[error(transparent)]
    Policy(#[from] PolicyError),
    #[error("sampling returned {got} rows for {expected} prompt rows")]
    Rows { got: usize, expected: usize },
}

/// The fixed settings of a job's rollouts.
#[derive(Debug, Clone, Copy)]
pub struct RolloutSettings {
    pub group_size: usize,
    pub max_prompt_tokens: usize,
    /// `seed` here is the run seed; each lease samples with a seed derived from it.
    pub sampling: RolloutSampling,
}

/// A different, reproducible sampling seed per lease (splitmix64 of run seed and lease id).
pub fn lease_seed(run_seed: u64, lease_id: u64) -> u64 {
    let mut z = run_seed ^ lease_id.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The seed of one group's random streams: the lease's seed mixed with the prompt id, so two
/// prompts of one lease draw differently and a re-leased prompt draws anew.
pub fn group_seed(run_seed: u64, lease_id: u64, prompt_id: u64) -> u64 {
    lease_seed(lease_seed(run_seed, lease_id), prompt_id)
}

/// The leased prompts' QA samples.
pub fn lease_samples(lease: &Lease) -> Result<Vec<QaSample>, RolloutError> {
    lease
        .prompts
        .iter()
        .map(|p| {
            serde_json::from_slice(&p.sample_json).map_err(|source| RolloutError::Prompt {
                lease_id: lease.lease_id,
                prompt_id: p.prompt_id,
                source,
            })
        })
        .collect()
}

/// Where a group comes from: everything of a [`RolloutGroup`] but its completions.
#[derive(Debug, Clone)]
pub struct GroupOrigin {
    pub job_id: u64,
    pub lease_id: u64,
    pub worker_id: u64,
    pub prompt_id: u64,
    pub epoch: u64,
    /// The version that sampled its first tokens (the oldest one).
    pub policy_version: u64,
    pub traceparent: String,
}

/// Decodes and rewards a group's completions against the reference answer. `token_versions`
/// (one list per completion, may be empty) are kept only for a completion that newer weights
/// reached while it was generated.
pub fn rewarded_group<P: Policy>(
    policy: &P,
    reward: &DiagnosisReward,
    reference: &str,
    origin: GroupOrigin,
    sampled: &Sampled,
    token_versions: &[Vec<u64>],
) -> RolloutGroup {
    let texts: Vec<String> = sampled.tokens.iter().map(|t| policy.decode(t)).collect();
    let scores = score_group(reward, reference, &texts);
    let completions = scores
        .into_iter()
        .enumerate()
        .map(|(row, score)| {
            let mut c = completion(sampled, &texts, row, score);
            let versions = token_versions.get(row).map(Vec::as_slice).unwrap_or_default();
            if versions.iter().any(|&v| v != origin.policy_version) {
                c.token_policy_versions = versions.to_vec();
            }
            c
        })
        .collect();
    RolloutGroup {
        job_id: origin.job_id,
        lease_id: origin.lease_id,
        worker_id: origin.worker_id,
        prompt_id: origin.prompt_id,
        epoch: origin.epoch,
        policy_version: origin.policy_version,
        completions,
        prompt: None,
        traceparent: origin.traceparent,
    }
}

/// Samples and rewards one group per leased prompt, all at once (one static batch; the worker's
/// loop streams groups through [`Policy::rollout_engine`] instead).
pub fn roll_out<P: Policy>(
    policy: &P,
    loader: &InputLoader,
    reward: &DiagnosisReward,
    settings: &RolloutSettings,
    lease: &Lease,
    worker_id: u64,
    policy_version: u64,
) -> Result<Vec<RolloutGroup>, RolloutError> {
    let samples = lease_samples(lease)?;
    let inputs = loader.prompts(&samples)?;
    let encoded = policy.encode_prompts(&inputs, settings.max_prompt_tokens)?;
    let g = settings.group_size;
    let repeated = policy.repeat_prompts(&encoded, g as i64);
    let sampling = RolloutSampling { seed: lease_seed(settings.sampling.seed, lease.lease_id), ..settings.sampling };
    let sampled = policy.sample(&repeated, &sampling)?;
    let expected = samples.len() * g;
    if sampled.tokens.len() != expected || sampled.logprobs.len() != expected {
        return Err(RolloutError::Rows { got: sampled.tokens.len(), expected });
    }
    // The caller's span, when traced: the learner that trains a group joins its trace.
    let traceparent = medtvt_telemetry::propagation::current_traceparent().unwrap_or_default();
    let groups = lease
        .prompts
        .iter()
        .zip(&samples)
        .enumerate()
        .map(|(i, (prompt, sample))| {
            let rows = i * g..(i + 1) * g;
            let part = Sampled {
                tokens: sampled.tokens[rows.clone()].to_vec(),
                logprobs: sampled.logprobs[rows.clone()].to_vec(),
                finished_by_eos: sampled.finished_by_eos[rows].to_vec(),
            };
            let origin = GroupOrigin {
                job_id: lease.job_id,
                lease_id: lease.lease_id,
                worker_id,
                prompt_id: prompt.prompt_id,
                epoch: prompt.epoch,
                policy_version,
                traceparent: traceparent.clone(),
            };
            rewarded_group(policy, reward, &sample.answer, origin, &part, &[])
        })
        .collect();
    Ok(groups)
}

/// Rewards each completion text against the reference answer (parsed once).
pub fn score_group(reward: &DiagnosisReward, reference: &str, texts: &[String]) -> Vec<RewardBreakdown> {
    let parsed = reward.parse(reference);
    texts.iter().map(|t| reward.score_parsed(t, parsed.as_ref())).collect()
}

fn completion(sampled: &Sampled, texts: &[String], row: usize, score: RewardBreakdown) -> Completion {
    Completion {
        token_ids: sampled.tokens[row].clone(),
        logprobs: sampled.logprobs[row].clone(),
        reward: score.total as f32,
        reward_parts: [("jaccard".to_string(), score.jaccard as f32), ("format".to_string(), score.format as f32)]
            .into_iter()
            .collect(),
        text: texts[row].clone(),
        truncated: !sampled.finished_by_eos.get(row).copied().unwrap_or(false),
        token_policy_versions: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use medtvt_eval::vocabulary::{DiseaseVocabulary, NameMatching};
    use medtvt_eval::RewardWeights;

    #[test]
    fn completions_are_rewarded_against_their_reference() {
        let reward = DiagnosisReward::new(
            DiseaseVocabulary::paper_default(NameMatching::Synonyms),
            RewardWeights { jaccard: 1.0, format: 0.5 },
        );
        let reference = "<think>fever, high lactate</think><answer>sepsis; pneumonia</answer>";
        let texts = vec![
            "<think>x</think><answer>Sepsis; pneumonia</answer>".to_string(),
            "<think>x</think><answer>sepsis</answer>".to_string(),
            "sepsis".to_string(),
        ];
        let scores = score_group(&reward, reference, &texts);
        assert_eq!(scores[0].jaccard, 1.0);
        assert_eq!(scores[0].total, 1.5);
        assert_eq!(scores[1].jaccard, 0.5);
        assert_eq!((scores[2].jaccard, scores[2].format, scores[2].total), (0.0, 0.0, 0.0));
    }

    #[test]
    fn a_lease_becomes_one_rewarded_group_per_prompt() {
        use medtvt_model::policy::byte_policy::BytePolicy;
        use medtvt_proto::v1::Prompt;
        let tmp = tempfile::tempdir().unwrap();
        let mut synth = medtvt_data::synth::SynthConfig::new(3, 5);
        synth.image_size = 32;
        medtvt_data::synth::synthesize(tmp.path(), &synth).unwrap();
        let samples = medtvt_data::read_jsonl(&tmp.path().join("qa.jsonl")).unwrap();
        let percentiles = medtvt_data::LabPercentiles::load(&tmp.path().join("lab_percentiles.json")).unwrap();
        let loader = InputLoader::new(tmp.path().to_path_buf(), percentiles, 32);
        let prompts: Vec<Prompt> = samples
            .iter()
            .take(2)
            .enumerate()
            .map(|(i, s)| Prompt {
                prompt_id: 10 + i as u64,
                epoch: 1,
                sample_json: serde_json::to_vec(s).unwrap().into(),
            })
            .collect();
        let lease = Lease { lease_id: 4, job_id: 2, policy_version: 3, group_size: 3, prompts, ..Default::default() };
        let reward =
            DiagnosisReward::new(DiseaseVocabulary::paper_default(NameMatching::Synonyms), RewardWeights::default());
        let settings = RolloutSettings {
            group_size: 3,
            max_prompt_tokens: 64,
            sampling: RolloutSampling { max_new_tokens: 6, temperature: 1.0, top_p: 1.0, top_k: 0, seed: 1 },
        };
        tch::manual_seed(0);
        let policy = BytePolicy::new(8);
        let groups = roll_out(&policy, &loader, &reward, &settings, &lease, 77, 3).unwrap();
        assert_eq!(groups.len(), 2);
        for (g, id) in groups.iter().zip([10, 11]) {
            assert_eq!(
                (g.prompt_id, g.epoch, g.lease_id, g.job_id, g.worker_id, g.policy_version),
                (id, 1, 4, 2, 77, 3)
            );
            assert_eq!(g.completions.len(), 3);
            for c in &g.completions {
                assert!(!c.token_ids.is_empty() && c.token_ids.len() <= 6);
                assert_eq!(c.token_ids.len(), c.logprobs.len());
                assert!(c.logprobs.iter().all(|lp| lp.is_finite() && *lp <= 0.0));
                assert!((0.0..=2.0).contains(&c.reward));
                assert!((c.reward - (c.reward_parts["jaccard"] + c.reward_parts["format"])).abs() < 1e-6);
                assert_eq!(c.truncated, c.token_ids.last() != Some(&256));
            }
        }
        // The same lease and seed sample the same completions.
        let again = roll_out(&policy, &loader, &reward, &settings, &lease, 77, 3).unwrap();
        assert_eq!(again[0].completions[0].token_ids, groups[0].completions[0].token_ids);
    }

    #[test]
    fn lease_seeds_differ_per_lease_and_repeat_per_run() {
        assert_ne!(lease_seed(7, 1), lease_seed(7, 2));
        assert_ne!(lease_seed(7, 1), lease_seed(8, 1));
        assert_eq!(lease_seed(7, 1), lease_seed(7, 1));
    }
}
