//! One GRPO job on one rollout worker, on a blocking thread: build the policy from the job's
//! starting checkpoint, then stream prompt groups through the policy's rollout engine until the
//! job is done.
//!
//! The loop keeps the engine full: whenever a whole group's slots are free it leases more
//! prompts (as many groups as fit, up to `--max-prompts`), then decodes one step; a group is
//! rewarded and handed to a submitting thread the moment its last completion ends, so submission
//! overlaps generation. A newer policy version is fetched on its own thread while generation goes
//! on and loaded between two steps: rows in flight continue with it (a partial rollout; each token
//! records the version that sampled it, and the group reports its oldest). Only when the weights
//! held are so old that new prompts would arrive stale (`grpo.max_staleness`) does the loop wait
//! for the fetch before admitting them. Nothing waits on a fixed poll interval: an empty lease is
//! retried after the coordinator's `retry_after_ms`, and only while the engine has nothing to do.
//! Each non-empty lease is admitted in a `rollout` span, the root of the trace its groups carry
//! to the learner.

use crate::rollout::{group_seed, lease_samples, rewarded_group, GroupOrigin, RolloutError};
use medtvt_config::{RunConfig, Stage};
use medtvt_eval::vocabulary::{DiseaseVocabulary, NameMatching};
use medtvt_eval::{DiagnosisReward, RewardWeights};
use medtvt_model::policy::{FinishedRollout, GroupSpec, Policy, PolicyError, RolloutEngine, RolloutSampling};
use medtvt_proto::v1::{FetchWeightsRequest, JobAssignment, Lease, LeaseRequest, RolloutGroup, WeightChunk};
use medtvt_role::device::{job_device, ConfigDeviceError};
use medtvt_role::inputs::InputLoader;
use medtvt_role::rpc::{CoordinatorLink, RpcError};
use medtvt_role::weights::{assemble_weights, PolicyWeights, WeightsError};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::{Duration, Instant};
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
    #[error("the {0} thread panicked")]
    Thread(&'static str),
}

/// What a worker did in one job.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RolloutTally {
    pub leases: u64,
    pub groups_submitted: u64,
    pub groups_accepted: u64,
    /// Groups dropped mid-generation for newer weights (`grpo.partial_rollouts = false`).
    pub groups_dropped: u64,
    pub policy_version: u64,
}

/// Runs the rollouts of a GRPO job until the coordinator says it is done (other stages: nothing).
/// `device` is the `--device` flag's; without it the job's `model.device` decides
/// ([`medtvt_role::device::job_device`]). At most `max_prompts` groups are generated at once.
pub fn run_rollout_job<P: Policy + 'static>(
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
    let sampling = RolloutSampling {
        max_new_tokens: grpo.max_new_tokens as usize,
        temperature: grpo.temperature,
        top_p: grpo.top_p,
        top_k: grpo.top_k as usize,
        seed: cfg.run.seed,
    };
    let setup = Setup {
        group_size: grpo.group_size as usize,
        max_prompt_tokens: cfg.data.max_prompt_tokens,
        max_staleness: u64::from(grpo.max_staleness),
        max_prompts,
        run_seed: cfg.run.seed,
        partial_rollouts: grpo.partial_rollouts,
    };
    let engine = policy.rollout_engine(max_prompts as usize * setup.group_size, &sampling)?;
    std::thread::scope(|scope| {
        let (to_submit, submissions) = mpsc::channel::<Submission>();
        let submitter = scope.spawn(move || submit_groups(link, submissions));
        let mut run = JobLoop {
            link,
            job_id: job.job_id,
            setup,
            policy: &mut policy,
            engine,
            loader: &loader,
            reward: &reward,
            in_flight: HashMap::new(),
            next_group: 0,
            held: 0,
            tally: RolloutTally::default(),
        };
        let outcome = run.run(scope, &to_submit);
        drop(to_submit);
        let accepted = submitter.join().map_err(|_| WorkerJobError::Thread("submitting"))?;
        let mut tally = outcome?;
        tally.groups_accepted = accepted?;
        Ok(tally)
    })
}

/// The job's fixed rollout settings.
#[derive(Debug, Clone, Copy)]
struct Setup {
    group_size: usize,
    max_prompt_tokens: usize,
    max_staleness: u64,
    max_prompts: u32,
    run_seed: u64,
    partial_rollouts: bool,
}

/// A group being generated: where it came from, its reference answer, and its lease's span
/// (its submission is made inside it, so the trace holds rollout, submission and training).
struct InFlight {
    origin: GroupOrigin,
    answer: String,
    span: tracing::Span,
}

/// Groups of one lease, ready to submit inside the lease's span.
type Submission = (tracing::Span, Vec<RolloutGroup>);

/// A policy version being fetched on its own thread.
type Fetch<'scope> = std::thread::ScopedJoinHandle<'scope, Result<Option<PolicyWeights>, WorkerJobError>>;

struct JobLoop<'a, P: Policy> {
    link: &'a CoordinatorLink,
    job_id: u64,
    setup: Setup,
    policy: &'a mut P,
    engine: Box<dyn RolloutEngine<P>>,
    loader: &'a InputLoader,
    reward: &'a DiagnosisReward,
    in_flight: HashMap<u64, InFlight>,
    next_group: u64,
    /// The policy version the loaded weights are.
    held: u64,
    tally: RolloutTally,
}

impl<'a, P: Policy + 'static> JobLoop<'a, P> {
    fn run<'scope>(
        &mut self,
        scope: &'scope std::thread::Scope<'scope, '_>,
        to_submit: &mpsc::Sender<Submission>,
    ) -> Result<RolloutTally, WorkerJobError>
    where
        'a: 'scope,
    {
        let g = self.setup.group_size;
        let mut fetch: Option<Fetch<'scope>> = None;
        let mut next_lease = Instant::now();
        while !self.link.stop_flag().is_stopped() {
            if fetch.as_ref().is_some_and(|f| f.is_finished()) {
                self.load(fetch.take())?;
            }
            let room = self.engine.free_slots() / g;
            if room > 0 && Instant::now() >= next_lease {
                let want = (room as u32).min(self.setup.max_prompts);
                let lease = self.link.call_as_worker("LeasePrompts", |mut c, worker_id| {
                    let request = LeaseRequest { worker_id, job_id: self.job_id, max_prompts: want };
                    async move { c.lease_prompts(request).await }
                })?;
                if lease.job_done {
                    break;
                }
                if lease.policy_version > self.held && fetch.is_none() {
                    let (link, job_id, have) = (self.link, self.job_id, self.held);
                    fetch = Some(scope.spawn(move || fetch_policy(link, job_id, have)));
                }
                if lease.prompts.is_empty() {
                    next_lease = Instant::now() + Duration::from_millis(lease.retry_after_ms.clamp(20, 5_000));
                } else {
                    // Prompts sampled with weights past the staleness bound would be dropped on
                    // arrival: wait for the newer ones first.
                    if lease.policy_version.saturating_sub(self.held) > self.setup.max_staleness {
                        self.load(fetch.take())?;
                    }
                    self.admit(&lease)?;
                }
            }
            if self.engine.is_idle() {
                // Nothing to decode: sleep until the next lease may be asked for.
                let wait = next_lease.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
                if !self.link.pause(wait) {
                    break; // asked to stop
                }
                continue;
            }
            let finished = self.engine.step(self.policy, self.held)?;
            for submission in self.rewarded(finished) {
                self.tally.groups_submitted += submission.1.len() as u64;
                if to_submit.send(submission).is_err() {
                    break; // the submitting thread failed; its error is reported when joined
                }
            }
        }
        if let Some(pending) = fetch {
            let _ = pending.join();
        }
        self.tally.policy_version = self.held;
        Ok(self.tally)
    }

    /// Loads what a finished fetch brought (nothing when there was no fetch).
    fn load(&mut self, fetch: Option<Fetch<'_>>) -> Result<(), WorkerJobError> {
        let Some(fetch) = fetch else { return Ok(()) };
        let weights = fetch.join().map_err(|_| WorkerJobError::Thread("fetching weights"))??;
        if let Some(weights) = weights.filter(|w| w.policy_version > self.held) {
            self.policy.copy_named_tensors(&weights.tensors)?;
            tracing::info!(
                version = weights.policy_version,
                tensors = weights.tensors.len(),
                in_flight = self.in_flight.len(),
                "loaded policy weights"
            );
            self.held = weights.policy_version;
            if !self.setup.partial_rollouts {
                // No completion may mix versions: drop what older weights started.
                let old: Vec<u64> = self
                    .in_flight
                    .iter()
                    .filter(|(_, f)| f.origin.policy_version < self.held)
                    .map(|(id, _)| *id)
                    .collect();
                self.engine.cancel(&old);
                for id in &old {
                    self.in_flight.remove(id);
                }
                self.tally.groups_dropped += old.len() as u64;
                if !old.is_empty() {
                    tracing::info!(dropped = old.len(), version = self.held, "dropped groups started on older weights");
                }
            }
        }
        Ok(())
    }

    /// Encodes a lease's prompts and queues one group per prompt in the engine.
    fn admit(&mut self, lease: &Lease) -> Result<(), WorkerJobError> {
        let span = tracing::info_span!(
            "rollout",
            job_id = self.job_id,
            lease_id = lease.lease_id,
            prompts = lease.prompts.len(),
            policy_version = self.held
        );
        let _entered = span.enter();
        let samples = lease_samples(lease)?;
        let inputs = self.loader.prompts(&samples)?;
        let encoded = self.policy.encode_prompts(&inputs, self.setup.max_prompt_tokens)?;
        // The lease's span: the learner that trains these groups joins its trace.
        let traceparent = medtvt_telemetry::propagation::current_traceparent().unwrap_or_default();
        let mut specs = Vec::with_capacity(samples.len());
        for (prompt, sample) in lease.prompts.iter().zip(samples) {
            let id = self.next_group;
            self.next_group += 1;
            specs.push(GroupSpec {
                id,
                group_size: self.setup.group_size,
                seed: group_seed(self.setup.run_seed, lease.lease_id, prompt.prompt_id),
            });
            let origin = GroupOrigin {
                job_id: self.job_id,
                lease_id: lease.lease_id,
                worker_id: self.link.worker_id(),
                prompt_id: prompt.prompt_id,
                epoch: prompt.epoch,
                policy_version: self.held,
                traceparent: traceparent.clone(),
            };
            self.in_flight.insert(id, InFlight { origin, answer: sample.answer, span: span.clone() });
        }
        self.engine.submit(self.policy, &encoded, &specs)?;
        self.tally.leases += 1;
        Ok(())
    }

    /// The groups that ended, decoded and rewarded, by lease.
    fn rewarded(&mut self, finished: Vec<FinishedRollout>) -> Vec<Submission> {
        let mut by_lease: Vec<(u64, Submission)> = Vec::new();
        for done in finished {
            let Some(flight) = self.in_flight.remove(&done.id) else { continue };
            let lease_id = flight.origin.lease_id;
            let group = rewarded_group(
                &*self.policy,
                self.reward,
                &flight.answer,
                flight.origin,
                &done.sampled,
                &done.token_versions,
            );
            match by_lease.iter_mut().find(|(lease, _)| *lease == lease_id) {
                Some((_, (_, groups))) => groups.push(group),
                None => by_lease.push((lease_id, (flight.span, vec![group]))),
            }
        }
        by_lease.into_iter().map(|(_, submission)| submission).collect()
    }
}

/// Submits groups as they come until the loop hangs up; returns how many were accepted. After a
/// coordinator restart a lease is unknown there (its prompts went back to the queue): its groups
/// are counted as unknown-lease and the loop leases again.
fn submit_groups(link: &CoordinatorLink, batches: mpsc::Receiver<Submission>) -> Result<u64, WorkerJobError> {
    let mut accepted = 0;
    for (span, groups) in batches {
        let _entered = span.enter();
        let response = link.call_as_worker("SubmitGroups", |mut c, worker_id| {
            let groups: Vec<RolloutGroup> = groups.iter().cloned().map(|g| RolloutGroup { worker_id, ..g }).collect();
            async move { c.submit_groups(tokio_stream::iter(groups)).await }
        })?;
        accepted += u64::from(response.accepted);
        tracing::info!(
            groups = groups.len(),
            accepted = response.accepted,
            duplicates = response.duplicates,
            stale = response.stale,
            unknown_lease = response.unknown_lease,
            "groups submitted"
        );
    }
    Ok(accepted)
}

/// The job's reward: `grpo.reward` weights over `data.diseases` (synonyms or exact names).
pub fn diagnosis_reward(cfg: &RunConfig) -> Result<DiagnosisReward, medtvt_eval::EvalError> {
    let weights = cfg.grpo.as_ref().map(|g| g.reward.clone()).unwrap_or_default();
    let matching = if weights.synonyms { NameMatching::Synonyms } else { NameMatching::Exact };
    let vocabulary = DiseaseVocabulary::from_names(&cfg.data.diseases, matching)?;
    Ok(DiagnosisReward::new(vocabulary, RewardWeights { jaccard: weights.jaccard, format: weights.format }))
}

/// Fetches the latest policy version newer than `have` (`None`: nothing newer).
fn fetch_policy(link: &CoordinatorLink, job_id: u64, have: u64) -> Result<Option<PolicyWeights>, WorkerJobError> {
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
    Ok(assemble_weights(chunks)?)
}
