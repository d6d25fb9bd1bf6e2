//! One GRPO job on one rollout worker, on a blocking thread: build the policy from the job's
//! starting checkpoint, then lease prompts until the job is done, fetching each newer policy
//! version before sampling with it, and stream the rewarded groups back. Each non-empty lease is
//! rolled out in a `rollout` span, the root of the trace its groups carry to the learner.

use crate::rollout::{roll_out, RolloutError, RolloutSettings};
use medtvt_config::{RunConfig, Stage};
use medtvt_eval::vocabulary::{DiseaseVocabulary, NameMatching};
use medtvt_eval::{DiagnosisReward, RewardWeights};
use medtvt_model::policy::{Policy, PolicyError, RolloutSampling};
use medtvt_proto::v1::{FetchWeightsRequest, JobAssignment, LeaseRequest, RolloutGroup, WeightChunk};
use medtvt_role::device::{job_device, ConfigDeviceError};
use medtvt_role::inputs::InputLoader;
use medtvt_role::rpc::{CoordinatorLink, RpcError};
use medtvt_role::weights::{assemble_weights, WeightsError};
use std::path::PathBuf;
use std::time::Duration;
use tch::Device;

#[derive(Debug, thiserror::Error)]
pub enum WorkerJobError {
    #[error("job {job_id}: config: {source}")]
    Config { job_id: u64, source: medtvt_config::ConfigError },
    #[error("job {job_id}: a GRPO job needs model.checkpoint (the SFT output) so workers and learners start from the same policy")]
    NoCheckpoint { job_id: u64 },
    #[error("job {job_id}: reward vocabulary: {source}")]
    Vocabulary { job_id: u64, source: medtvt_eval::EvalError },
    #[error(transparent)]
    Rpc(#[from] RpcError),
    #[error(transparent)]
    Policy(#[from] PolicyError),
    #[error(transparent)]
    Weights(#[from] WeightsError),
    #[error(transparent)]
    Rollout(#[from] RolloutError),
    #[error(transparent)]
    Data(#[from] medtvt_data::DataError),
    #[error("job {job_id}: {source}")]
    Device { job_id: u64, source: ConfigDeviceError },
}

/// What a worker did in one job.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RolloutTally {
    pub leases: u64,
    pub groups_submitted: u64,
    pub groups_accepted: u64,
    pub policy_version: u64,
}

/// Runs the rollouts of a GRPO job until the coordinator says it is done (other stages: nothing).
/// `device` is the `--device` flag's; without it the job's `model.device` decides
/// ([`medtvt_role::device::job_device`]).
pub fn run_rollout_job<P: Policy>(
    link: &CoordinatorLink,
    job: &JobAssignment,
    device: Option<Device>,
    max_prompts: u32,
) -> Result<RolloutTally, WorkerJobError> {
    let origin = PathBuf::from(format!("<job {} config>", job.job_id));
    let cfg = medtvt_config::parse_run_config(&job.config_toml, &origin, &[])
        .map_err(|source| WorkerJobError::Config { job_id: job.job_id, source })?;
    let (Stage::Grpo, Some(grpo)) = (cfg.run.stage, cfg.grpo.as_ref()) else {
        return Ok(RolloutTally::default());
    };
    if cfg.model.checkpoint.is_none() {
        return Err(WorkerJobError::NoCheckpoint { job_id: job.job_id });
    }
    let device =
        job_device(device, cfg.model.device).map_err(|source| WorkerJobError::Device { job_id: job.job_id, source })?;
    tracing::info!(job = job.job_id, ?device, "job device");
    let mut policy = P::load(&cfg, device, None)?;
    // The stage decides the model's wiring (e.g. the Modality Perception Layer is on after PT).
    policy.set_trainable(cfg.run.stage, false);
    let reward = diagnosis_reward(&cfg).map_err(|source| WorkerJobError::Vocabulary { job_id: job.job_id, source })?;
    let loader = InputLoader::from_config(&cfg, policy.image_size())?;
    let settings = RolloutSettings {
        group_size: grpo.group_size as usize,
        max_prompt_tokens: cfg.data.max_prompt_tokens,
        sampling: RolloutSampling {
            max_new_tokens: grpo.max_new_tokens as usize,
            temperature: grpo.temperature,
            top_p: grpo.top_p,
            top_k: grpo.top_k as usize,
            seed: cfg.run.seed,
        },
    };
    let mut tally = RolloutTally::default();
    while !link.stop_flag().is_stopped() {
        let lease = link.call_as_worker("LeasePrompts", |mut c, worker_id| {
            let request = LeaseRequest { worker_id, job_id: job.job_id, max_prompts };
            async move { c.lease_prompts(request).await }
        })?;
        if lease.job_done {
            break;
        }
        if lease.prompts.is_empty() {
            link.pause(Duration::from_millis(lease.retry_after_ms.clamp(20, 5_000)));
            continue;
        }
        // One trace per lease: the weight fetch and the submission are its children at the
        // coordinator, and each group carries it to the learner that trains it (traceparent).
        let span = tracing::info_span!(
            "rollout",
            job_id = job.job_id,
            lease_id = lease.lease_id,
            prompts = lease.prompts.len(),
            policy_version = tracing::field::Empty
        );
        let _entered = span.enter();
        if lease.policy_version > tally.policy_version {
            tally.policy_version = fetch_policy(link, job.job_id, tally.policy_version, &mut policy)?;
        }
        span.record("policy_version", tally.policy_version);
        let groups = roll_out(&policy, &loader, &reward, &settings, &lease, link.worker_id(), tally.policy_version)?;
        tally.leases += 1;
        tally.groups_submitted += groups.len() as u64;
        // After a coordinator restart the lease is unknown there (its prompts went back to the
        // queue): the groups are then counted as unknown-lease and the loop leases again.
        let response = link.call_as_worker("SubmitGroups", |mut c, worker_id| {
            let groups: Vec<RolloutGroup> = groups.iter().cloned().map(|g| RolloutGroup { worker_id, ..g }).collect();
            async move { c.submit_groups(tokio_stream::iter(groups)).await }
        })?;
        tally.groups_accepted += u64::from(response.accepted);
        tracing::info!(
            lease = lease.lease_id,
            version = tally.policy_version,
            accepted = response.accepted,
            duplicates = response.duplicates,
            stale = response.stale,
            unknown_lease = response.unknown_lease,
            "lease rolled out"
        );
    }
    Ok(tally)
}

/// The job's reward: `grpo.reward` weights over `data.diseases` (synonyms or exact names).
pub fn diagnosis_reward(cfg: &RunConfig) -> Result<DiagnosisReward, medtvt_eval::EvalError> {
    let weights = cfg.grpo.as_ref().map(|g| g.reward.clone()).unwrap_or_default();
    let matching = if weights.synonyms { NameMatching::Synonyms } else { NameMatching::Exact };
    let vocabulary = DiseaseVocabulary::from_names(&cfg.data.diseases, matching)?;
    Ok(DiagnosisReward::new(vocabulary, RewardWeights { jaccard: weights.jaccard, format: weights.format }))
}

/// Fetches the latest policy version newer than `have` and loads it; returns the version held.
fn fetch_policy<P: Policy>(
    link: &CoordinatorLink,
    job_id: u64,
    have: u64,
    policy: &mut P,
) -> Result<u64, WorkerJobError> {
    let chunks: Vec<WeightChunk> = link.call_as_worker("FetchWeights", |mut c, worker_id| {
        let request = FetchWeightsRequest { job_id, have_version: have, worker_id };
        async move {
            let mut stream = c.fetch_weights(request).await?.into_inner();
            let mut chunks = Vec::new();
            while let Some(chunk) = stream.message().await? {
                chunks.push(chunk);
            }
            Ok(tonic::Response::new(chunks))
        }
    })?;
    match assemble_weights(chunks)? {
        Some(weights) => {
            policy.copy_named_tensors(&weights.tensors)?;
            tracing::info!(version = weights.policy_version, tensors = weights.tensors.len(), "loaded policy weights");
            Ok(weights.policy_version)
        }
        None => Ok(have),
    }
}
