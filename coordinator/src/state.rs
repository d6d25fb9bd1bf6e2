//! The run's state machine: jobs in a FIFO, registered processes, and for the running job the
//! prompt queue, leases, accepted groups and step batches. Pure and synchronous: every method
//! takes the current time, nothing here does I/O or waits, so the whole protocol is unit-tested
//! without a network. The gRPC layer (`service.rs`) holds it behind one mutex.
//!
//! GRPO bookkeeping, per prompt occurrence (`PromptKey`):
//! fresh/requeued -> leased -> accepted (ready queue) -> in step s (trained once step s is
//! reported by every rank). A lease that expires, or a group dropped as stale, sends the prompt
//! back to the front of the queue; a group is accepted at most once per key.
//!
//! Durability (with a run directory) stays out of this file's I/O: every transition that a
//! resumed run needs is also pushed as a [`Durable`] record, which the service drains after
//! each call (under the same lock, so in order) and `store.rs` writes to SQLite.
//! [`RunState::resume`] rebuilds the state from what was stored. Only what a restarted run
//! needs is recorded: jobs and their datasets, each job's scalar progress (policy version,
//! steps completed, ranks that reported, the lease cursor), sealed steps with their groups, and
//! the id counters. Leases, accepted groups not yet in a step, workers and rendezvous rounds are
//! not: on resume every prompt handed out but not in a sealed step goes back to the queue.

use crate::dataset::{self, EpochOrder, SkippedSample};
use crate::ids::{JobId, JobState, LeaseId, PromptKey, Role, WorkerId};
use medtvt_config::{RunConfig, Stage};
use medtvt_proto::errors::ErrorReason;
use medtvt_proto::v1::RolloutGroup;
use prost::bytes::Bytes;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What went wrong with a request; `service.rs` maps each variant to a gRPC status code.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum StateError {
    #[error("unknown worker id {0}: register again")]
    UnknownWorker(WorkerId),
    #[error("unknown job id {0}")]
    UnknownJob(JobId),
    #[error("job {job} is {state:?}, not running")]
    JobNotRunning { job: JobId, state: JobState },
    #[error("job {job} is a {stage:?} job; {what} needs a GRPO job")]
    NotGrpo { job: JobId, stage: Stage, what: &'static str },
    #[error("worker {worker} is a {role:?}; {what} needs a {needed:?}")]
    WrongRole { worker: WorkerId, role: Role, needed: Role, what: &'static str },
    /// The config or dataset of a submitted job is invalid (the text names file, line or key).
    #[error("{0}")]
    InvalidJob(String),
    #[error("{0}")]
    InvalidGroup(String),
    #[error("{0}")]
    BadRank(String),
    #[error("{0}")]
    StepOutOfRange(String),
    #[error("{0}")]
    StepNotReady(String),
    #[error("{0}")]
    StepPruned(String),
    #[error("{0}")]
    ForeignCheckpoint(String),
    #[error("{0}")]
    LastStepNotReported(String),
    #[error("the coordinator is shutting down and accepts no new jobs")]
    ShuttingDown,
}

impl StateError {
    /// The reason code this error crosses the wire with; its gRPC code follows from the reason
    /// (`medtvt_proto::errors::grpc_code`, the one place that mapping lives).
    pub fn reason(&self) -> ErrorReason {
        match self {
            StateError::UnknownWorker(_) => ErrorReason::UnknownWorker,
            StateError::UnknownJob(_) => ErrorReason::UnknownJob,
            StateError::JobNotRunning { .. } => ErrorReason::JobNotRunning,
            StateError::NotGrpo { .. } => ErrorReason::NotGrpo,
            StateError::WrongRole { .. } => ErrorReason::WrongRole,
            StateError::InvalidJob(_) => ErrorReason::InvalidJob,
            StateError::InvalidGroup(_) => ErrorReason::InvalidGroup,
            StateError::BadRank(_) => ErrorReason::BadRank,
            StateError::StepOutOfRange(_) => ErrorReason::StepOutOfRange,
            StateError::StepNotReady(_) => ErrorReason::StepNotReady,
            StateError::StepPruned(_) => ErrorReason::StepPruned,
            StateError::ForeignCheckpoint(_) => ErrorReason::ForeignCheckpoint,
            StateError::LastStepNotReported(_) => ErrorReason::LastStepNotReported,
            StateError::ShuttingDown => ErrorReason::ShuttingDown,
        }
    }
}

/// A submitted job with its config checked and its dataset read.
#[derive(Debug, Clone)]
pub struct LoadedJob {
    pub config: RunConfig,
    pub samples: Vec<Bytes>,
    /// Samples left out because a modality file they name is broken (see `dataset.rs`).
    pub skipped: Vec<SkippedSample>,
}

/// Parses and validates a submitted config (overrides applied) and reads its dataset, checking
/// every sample's modality files (`data.strict` refuses the job at the first broken one). Does
/// file I/O: call it outside the state lock. Errors name the file and line or the config key.
pub fn load_job(config_toml: &str, overrides: &[String]) -> Result<LoadedJob, StateError> {
    let config = medtvt_config::parse_run_config(config_toml, Path::new("submitted config"), overrides)
        .map_err(|e| StateError::InvalidJob(e.to_string()))?;
    let loaded = dataset::load_samples(&config.data.dir, config.run.stage, config.data.strict)
        .map_err(|e| StateError::InvalidJob(e.to_string()))?;
    Ok(LoadedJob { config, samples: loaded.samples, skipped: loaded.skipped })
}

/// Timing defaults that apply when no job is running.
#[derive(Debug, Clone)]
pub struct StateOptions {
    pub heartbeat_timeout: Duration,
    pub heartbeat_interval: Duration,
}

impl Default for StateOptions {
    fn default() -> Self {
        StateOptions { heartbeat_timeout: Duration::from_secs(30), heartbeat_interval: Duration::from_secs(5) }
    }
}

/// Something worth a line in the event log.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    JobQueued { job_id: JobId, name: String, stage: Stage },
    JobStarted { job_id: JobId },
    JobEnded { job_id: JobId, state: JobState, message: String },
    StepCompleted { job_id: JobId, step: u64, policy_version: u64 },
    WorkerRegistered { worker_id: WorkerId, role: Role, name: String },
    WorkerDead { worker_id: WorkerId },
    WorkerLeft { worker_id: WorkerId },
    LeaseExpired { job_id: JobId, lease_id: LeaseId, prompts_returned: usize },
    /// A sample left out at submission: `problem` names the broken file and what is wrong.
    SampleSkipped { job_id: JobId, line: usize, sample: String, problem: String },
    GroupDroppedStale { job_id: JobId, prompt_id: u64, epoch: u64, sampled_at: u64, policy_version: u64 },
    ShutdownRequested { drain: bool },
}

#[derive(Debug, Clone)]
pub struct Worker {
    pub name: String,
    pub role: Role,
    pub rank: u32,
    pub world_size: u32,
    pub last_seen: Instant,
    pub alive: bool,
}

/// What a process polling for work is told.
#[derive(Debug, Clone, PartialEq)]
pub enum Assignment {
    Job { job_id: JobId, name: String, stage: Stage, config_toml: String },
    Shutdown,
    /// Nothing yet: poll again.
    Wait,
}

/// One leased batch of prompts.
#[derive(Debug, Clone)]
pub struct LeaseGrant {
    pub lease_id: Option<LeaseId>,
    pub job_id: JobId,
    pub policy_version: u64,
    pub group_size: u32,
    pub timeout: Duration,
    pub prompts: Vec<(PromptKey, Bytes)>,
    pub job_state: JobState,
}

impl LeaseGrant {
    pub fn job_done(&self) -> bool {
        self.job_state.is_terminal()
    }
}

/// What happened to one submitted group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupOutcome {
    Accepted,
    Duplicate,
    /// Lease expired, job ended, or sampled too many versions ago.
    Stale,
    UnknownLease,
}

/// A learner's shard of one step.
#[derive(Debug, Clone, PartialEq)]
pub enum BatchOutcome {
    /// Not ready yet; pull again.
    Pending,
    /// No more steps: the job finished (state says how) or `step` is past the last step.
    Done(JobState),
    Samples { samples: Vec<Bytes>, policy_version: u64 },
    Groups { groups: Vec<Arc<RolloutGroup>>, policy_version: u64 },
}

/// Counters and gauges of one job, as shown by status.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct JobCounters {
    pub prompts_leased: u64,
    pub groups_accepted: u64,
    pub groups_trained: u64,
    pub groups_dropped_stale: u64,
    pub duplicates_ignored: u64,
    pub tied_groups: u64,
    pub late_groups_ignored: u64,
    pub unknown_lease_groups: u64,
    pub leases_expired: u64,
    /// Samples of the dataset left out at submission for broken modality files.
    #[serde(default)]
    pub samples_skipped: u64,
}

/// A change to record so that a killed coordinator can resume (see the module doc).
#[derive(Debug, Clone)]
pub enum Durable {
    /// A new job: its resolved config and the samples it leases or batches from.
    JobQueued { job_id: JobId, config_toml: String, samples: Arc<Vec<Bytes>> },
    /// The job's progress as it is now (replaces the previous record).
    Job(JobRecord),
    /// Step `step` of a GRPO job was assembled; it never changes.
    StepSealed { job_id: JobId, step: u64, groups: Vec<Arc<RolloutGroup>> },
    /// The groups of steps below `below` were freed (their keys stay recorded).
    StepsPruned { job_id: JobId, below: u64 },
    /// The next ids to hand out; ids are never reused across restarts.
    Ids(IdCounters),
}

/// The next job, worker and lease ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdCounters {
    pub next_job: u64,
    pub next_worker: u64,
    pub next_lease: u64,
}

/// The progress of one job, as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct JobRecord {
    pub job_id: JobId,
    pub state: JobState,
    pub message: String,
    pub policy_version: u64,
    pub steps_completed: u64,
    /// GRPO: positions of the epoch order handed out so far.
    pub next_fresh: u64,
    /// GRPO: steps below this have had their groups freed.
    pub pruned_below: u64,
    pub finish_requested: Option<String>,
    pub progress: JobProgress,
}

/// The less structured part of a [`JobRecord`] (stored as JSON).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobProgress {
    /// Ranks that reported each step not yet completed.
    pub reported: BTreeMap<u64, BTreeSet<u32>>,
    pub latest_metrics: BTreeMap<String, f64>,
    pub counters: JobCounters,
}

/// One sealed GRPO step as stored: its prompt keys in order, and its groups unless pruned.
#[derive(Debug, Clone, Default)]
pub struct SealedStep {
    pub keys: Vec<PromptKey>,
    pub groups: Vec<Arc<RolloutGroup>>,
}

/// Everything stored about one job, to resume it.
#[derive(Debug, Clone)]
pub struct ResumedJob {
    pub config_toml: String,
    pub samples: Vec<Bytes>,
    pub record: JobRecord,
    pub sealed: Vec<SealedStep>,
}

#[derive(Debug, Clone)]
pub struct JobSnapshot {
    pub job_id: JobId,
    pub name: String,
    pub stage: Stage,
    pub state: JobState,
    pub message: String,
    pub steps_completed: u64,
    pub total_steps: u64,
    pub policy_version: u64,
    pub counters: JobCounters,
    pub queue_depth: u64,
    pub leased_prompts_outstanding: u64,
    pub latest_metrics: BTreeMap<String, f64>,
}

/// The rollout pipeline of the running GRPO job, as the coordinator's gauges report it (all 0
/// when no GRPO job runs). A prompt moves from waiting to leased to a queued group.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PipelineGauges {
    /// Prompts a LeasePrompts call would hand out now: the pipeline has room and no rollout
    /// worker has taken them. Workers are the bottleneck while this stays above 0.
    pub prompts_waiting: u64,
    /// Prompts leased to rollout workers whose groups have not come back.
    pub leased_prompts: u64,
    /// Accepted groups waiting for the learners (not yet trained in a sealed step).
    pub queue_depth: u64,
    /// Staleness of the last sealed step: the policy version it was assembled at minus the
    /// oldest version that sampled one of its groups.
    pub policy_lag: u64,
}

struct LeaseRecord {
    worker: WorkerId,
    /// In lease order, so that an expired lease's prompts go back in the same order.
    prompts: Vec<PromptKey>,
    outstanding: HashSet<PromptKey>,
    deadline: Instant,
}

/// The GRPO part of a running job.
struct Rollouts {
    group_size: u32,
    prompts_per_step: u64,
    max_staleness: u64,
    filter_tied_groups: bool,
    lease_timeout: Duration,
    /// Next position in the epoch order not yet handed out.
    next_fresh: u64,
    /// Prompts returned by expired leases or stale drops; leased before fresh ones.
    requeued: VecDeque<PromptKey>,
    leases: HashMap<LeaseId, LeaseRecord>,
    expired_leases: HashSet<LeaseId>,
    /// Keys whose group is accepted and not dropped since (a second submission is a duplicate).
    accepted: HashSet<PromptKey>,
    /// Accepted groups not yet in a step, in arrival order.
    ready: VecDeque<Arc<RolloutGroup>>,
    /// Groups taken for the step being assembled (`steps.len()`).
    assembling: Vec<Arc<RolloutGroup>>,
    /// Sealed step batches, index = step; a sealed step never changes.
    steps: Vec<Vec<Arc<RolloutGroup>>>,
    /// Steps below this were trained long enough ago that their groups were freed.
    pruned_below: u64,
    /// How many trained steps stay pullable (a restarted learner resumes from its last
    /// checkpoint): train.checkpoint_every; 0 keeps every step.
    retain_steps: u64,
    /// The policy lag of the step sealed last (see [`PipelineGauges::policy_lag`]).
    last_step_lag: u64,
}

impl Rollouts {
    fn outstanding(&self) -> u64 {
        self.leases.values().map(|l| l.outstanding.len() as u64).sum()
    }

    /// Accepted groups not yet in a sealed step.
    fn queued_groups(&self) -> u64 {
        (self.ready.len() + self.assembling.len()) as u64
    }

    /// How many prompts may be leased now: no more than the remaining steps need, and no more
    /// than a pipeline of `max_staleness + 2` steps holds, less what is already in it.
    fn leasable(&self, total_steps: u64) -> u64 {
        let needed_total = total_steps * self.prompts_per_step;
        let sealed = self.steps.len() as u64 * self.prompts_per_step;
        let in_flight = self.queued_groups() + self.outstanding();
        let window = self.prompts_per_step * (self.max_staleness + 2);
        needed_total.saturating_sub(sealed).min(window).saturating_sub(in_flight)
    }

    fn requeue_front(&mut self, keys: impl DoubleEndedIterator<Item = PromptKey>) {
        for key in keys.rev() {
            self.requeued.push_front(key);
        }
    }
}

struct Job {
    id: JobId,
    config: RunConfig,
    config_toml: String,
    state: JobState,
    message: String,
    samples: Arc<Vec<Bytes>>,
    order: EpochOrder,
    world_size: u32,
    total_steps: u64,
    policy_version: u64,
    /// Ranks that reported each not-yet-completed step.
    reported: BTreeMap<u64, BTreeSet<u32>>,
    steps_completed: u64,
    /// Rank 0 asked to finish (with its checkpoint dir); the job succeeds once all steps are in.
    finish_requested: Option<String>,
    latest_metrics: BTreeMap<String, f64>,
    counters: JobCounters,
    rollouts: Option<Rollouts>,
}

impl Job {
    /// A queued job, once its config is checked against the cluster. Errors name the key.
    fn new(id: JobId, config: RunConfig, samples: Arc<Vec<Bytes>>) -> Result<Job, StateError> {
        let invalid = |key: &str, problem: String| Err(StateError::InvalidJob(format!("job {id} config: `{key}` {problem}")));
        let world_size = config.cluster.learners;
        if samples.is_empty() {
            return invalid("data.dir", "holds no samples for this stage".into());
        }
        let rollouts = match (&config.grpo, config.run.stage) {
            (Some(g), Stage::Grpo) => {
                if g.prompts_per_step % world_size != 0 {
                    return invalid(
                        "grpo.prompts_per_step",
                        format!("= {} is not divisible by cluster.learners = {world_size}", g.prompts_per_step),
                    );
                }
                Some(Rollouts {
                    group_size: g.group_size,
                    prompts_per_step: g.prompts_per_step as u64,
                    max_staleness: g.max_staleness as u64,
                    filter_tied_groups: g.filter_tied_groups,
                    lease_timeout: Duration::from_secs_f64(config.cluster.lease_timeout_s),
                    next_fresh: 0,
                    requeued: VecDeque::new(),
                    leases: HashMap::new(),
                    expired_leases: HashSet::new(),
                    accepted: HashSet::new(),
                    ready: VecDeque::new(),
                    assembling: Vec::new(),
                    steps: Vec::new(),
                    pruned_below: 0,
                    retain_steps: config.train.checkpoint_every,
                    last_step_lag: 0,
                })
            }
            (None, Stage::Grpo) => return invalid("grpo", "is required for a GRPO job".into()),
            _ => {
                if config.train.batch_size % world_size as usize != 0 {
                    return invalid(
                        "train.batch_size",
                        format!("= {} is not divisible by cluster.learners = {world_size}", config.train.batch_size),
                    );
                }
                None
            }
        };
        let config_toml = toml::to_string(&config).map_err(|e| StateError::InvalidJob(format!("job {id} config: {e}")))?;
        Ok(Job {
            id,
            order: EpochOrder::new(config.run.seed, samples.len()),
            samples,
            config_toml,
            state: JobState::Queued,
            message: String::new(),
            world_size,
            total_steps: config.train.steps,
            policy_version: 0,
            reported: BTreeMap::new(),
            steps_completed: 0,
            finish_requested: None,
            latest_metrics: BTreeMap::new(),
            counters: JobCounters::default(),
            rollouts,
            config,
        })
    }

    fn stage(&self) -> Stage {
        self.config.run.stage
    }

    fn record(&self) -> JobRecord {
        JobRecord {
            job_id: self.id,
            state: self.state,
            message: self.message.clone(),
            policy_version: self.policy_version,
            steps_completed: self.steps_completed,
            next_fresh: self.rollouts.as_ref().map_or(0, |r| r.next_fresh),
            pruned_below: self.rollouts.as_ref().map_or(0, |r| r.pruned_below),
            finish_requested: self.finish_requested.clone(),
            progress: JobProgress {
                reported: self.reported.clone(),
                latest_metrics: self.latest_metrics.clone(),
                counters: self.counters.clone(),
            },
        }
    }

    /// Rebuilds a stored job (see [`RunState::resume`]).
    fn resume(stored: ResumedJob) -> Result<Job, StateError> {
        let ResumedJob { config_toml, samples, record, sealed } = stored;
        let id = record.job_id;
        let source = format!("stored config of job {id}");
        let config = medtvt_config::parse_run_config(&config_toml, Path::new(&source), &[])
            .map_err(|e| StateError::InvalidJob(e.to_string()))?;
        let mut job = Job::new(id, config, Arc::new(samples))?;
        job.state = record.state;
        job.message = record.message;
        job.policy_version = record.policy_version;
        job.steps_completed = record.steps_completed;
        job.finish_requested = record.finish_requested;
        job.reported = record.progress.reported;
        job.latest_metrics = record.progress.latest_metrics;
        job.counters = record.progress.counters;
        let stored_steps = sealed.len() as u64;
        if let Some(r) = &mut job.rollouts {
            if stored_steps < job.steps_completed {
                return Err(StateError::InvalidJob(format!(
                    "job {id}: {} steps completed but only {stored_steps} sealed steps stored",
                    job.steps_completed
                )));
            }
            r.next_fresh = record.next_fresh;
            r.pruned_below = record.pruned_below;
            r.accepted = sealed.iter().flat_map(|s| s.keys.iter().copied()).collect();
            // Everything handed out but not in a sealed step was leased, or accepted and
            // waiting: none of it survived, so it is leased again, oldest first.
            for position in 0..r.next_fresh {
                let (prompt_id, epoch) = job.order.at(position);
                let key = PromptKey { prompt_id, epoch };
                if !r.accepted.contains(&key) {
                    r.requeued.push_back(key);
                }
            }
            r.steps = sealed.into_iter().map(|s| s.groups).collect();
        } else if stored_steps > 0 {
            return Err(StateError::InvalidJob(format!("job {id} is not a GRPO job but has {stored_steps} sealed steps stored")));
        }
        Ok(job)
    }
}

struct RendezvousRound {
    world_size: u32,
    payloads: Vec<Option<Bytes>>,
}

/// The whole run. See the module doc.
pub struct RunState {
    options: StateOptions,
    jobs: BTreeMap<JobId, Job>,
    queue: VecDeque<JobId>,
    running: Option<JobId>,
    workers: BTreeMap<WorkerId, Worker>,
    rendezvous: HashMap<(JobId, String), RendezvousRound>,
    next_job: u64,
    next_worker: u64,
    next_lease: u64,
    shutting_down: bool,
    events: Vec<Event>,
    /// Bumped by every change a long-poll may be waiting for.
    revision: u64,
    /// Records not yet drained by [`RunState::drain_journal`], in order.
    journal: Vec<Durable>,
    /// Jobs whose [`JobRecord`] changed since the last drain.
    dirty: BTreeSet<JobId>,
    ids_dirty: bool,
}

impl RunState {
    pub fn new(options: StateOptions) -> Self {
        RunState {
            options,
            jobs: BTreeMap::new(),
            queue: VecDeque::new(),
            running: None,
            workers: BTreeMap::new(),
            rendezvous: HashMap::new(),
            next_job: 1,
            next_worker: 1,
            next_lease: 1,
            shutting_down: false,
            events: Vec::new(),
            revision: 0,
            journal: Vec::new(),
            dirty: BTreeSet::new(),
            ids_dirty: false,
        }
    }

    /// Rebuilds a run from what the durable store recorded (see the module doc): the jobs in id
    /// order, RUNNING and QUEUED ones continuing. No workers, leases or rendezvous rounds: the
    /// processes register again.
    pub fn resume(options: StateOptions, jobs: Vec<ResumedJob>, ids: IdCounters) -> Result<Self, StateError> {
        let mut st = RunState::new(options);
        for stored in jobs {
            let job = Job::resume(stored)?;
            let id = job.id;
            if id.0 >= ids.next_job {
                return Err(StateError::InvalidJob(format!("stored job {id} is not below the stored next job id {}", ids.next_job)));
            }
            match job.state {
                JobState::Running if st.running.is_some() => {
                    return Err(StateError::InvalidJob(format!("stored jobs {} and {id} are both RUNNING", st.running.map_or(0, |j| j.0))));
                }
                JobState::Running => st.running = Some(id),
                JobState::Queued => st.queue.push_back(id),
                _ => {}
            }
            st.jobs.insert(id, job);
        }
        st.next_job = ids.next_job;
        st.next_worker = ids.next_worker;
        st.next_lease = ids.next_lease;
        st.start_next();
        Ok(st)
    }

    /// The durable records since the last call, in order; then the changed job records and
    /// the id counters.
    pub fn drain_journal(&mut self) -> Vec<Durable> {
        let mut out = std::mem::take(&mut self.journal);
        for id in std::mem::take(&mut self.dirty) {
            if let Some(job) = self.jobs.get(&id) {
                out.push(Durable::Job(job.record()));
            }
        }
        if std::mem::take(&mut self.ids_dirty) {
            out.push(Durable::Ids(self.ids()));
        }
        out
    }

    pub fn ids(&self) -> IdCounters {
        IdCounters { next_job: self.next_job, next_worker: self.next_worker, next_lease: self.next_lease }
    }

    /// Changes whenever something a long-poll may wait for changed.
    pub fn revision(&self) -> u64 {
        self.revision
    }

    /// Events since the last call, oldest first.
    pub fn drain_events(&mut self) -> Vec<Event> {
        std::mem::take(&mut self.events)
    }

    // ───────────────────────────── Jobs ─────────────────────────────

    /// Queues a job whose config and samples are loaded (see [`load_job`]), starting it when
    /// nothing runs. Errors name the config key.
    pub fn enqueue(&mut self, config: RunConfig, samples: Vec<Bytes>) -> Result<JobId, StateError> {
        if self.shutting_down {
            return Err(StateError::ShuttingDown);
        }
        let id = JobId(self.next_job);
        let job = Job::new(id, config, Arc::new(samples))?;
        self.next_job += 1;
        self.revision += 1;
        self.events.push(Event::JobQueued { job_id: id, name: job.config.run.name.clone(), stage: job.stage() });
        self.journal.push(Durable::JobQueued { job_id: id, config_toml: job.config_toml.clone(), samples: job.samples.clone() });
        self.dirty.insert(id);
        self.ids_dirty = true;
        self.jobs.insert(id, job);
        self.queue.push_back(id);
        self.start_next();
        Ok(id)
    }

    /// [`RunState::enqueue`] for a job from [`load_job`]: also records the skipped samples (one
    /// event each, and the job's `samples_skipped` counter).
    pub fn enqueue_loaded(&mut self, loaded: LoadedJob) -> Result<JobId, StateError> {
        let LoadedJob { config, samples, skipped } = loaded;
        let id = self.enqueue(config, samples)?;
        if let Some(job) = self.jobs.get_mut(&id) {
            job.counters.samples_skipped = skipped.len() as u64;
        }
        for SkippedSample { line, sample, problem } in skipped {
            self.events.push(Event::SampleSkipped { job_id: id, line, sample, problem });
        }
        Ok(id)
    }

    fn start_next(&mut self) {
        if self.running.is_some() {
            return;
        }
        if let Some(id) = self.queue.pop_front() {
            if let Some(job) = self.jobs.get_mut(&id) {
                job.state = JobState::Running;
                self.running = Some(id);
                self.dirty.insert(id);
                self.events.push(Event::JobStarted { job_id: id });
            }
        }
    }

    fn end_job(&mut self, id: JobId, state: JobState, message: String) {
        let Some(job) = self.jobs.get_mut(&id) else { return };
        if job.state.is_terminal() {
            return;
        }
        job.state = state;
        job.message = message.clone();
        self.revision += 1;
        self.dirty.insert(id);
        if let Some(r) = &mut job.rollouts {
            // Nothing more will be trained: leases are void.
            r.leases.clear();
        }
        self.queue.retain(|q| *q != id);
        self.rendezvous.retain(|(job, _), _| *job != id);
        if self.running == Some(id) {
            self.running = None;
        }
        self.events.push(Event::JobEnded { job_id: id, state, message });
        self.start_next();
    }

    pub fn running_job(&self) -> Option<JobId> {
        self.running
    }

    pub fn job_state(&self, id: JobId) -> Result<JobState, StateError> {
        self.jobs.get(&id).map(|j| j.state).ok_or(StateError::UnknownJob(id))
    }

    /// The running job's policy version (0 when nothing runs).
    pub fn policy_version(&self, id: JobId) -> Result<u64, StateError> {
        self.jobs.get(&id).map(|j| j.policy_version).ok_or(StateError::UnknownJob(id))
    }

    pub fn cancel_job(&mut self, id: JobId) -> Result<JobState, StateError> {
        let state = self.job_state(id)?;
        if !state.is_terminal() {
            self.end_job(id, JobState::Cancelled, "cancelled".into());
        }
        self.job_state(id)
    }

    /// Stop accepting jobs; unless `drain`, cancel the queued and running ones.
    pub fn shutdown(&mut self, drain: bool) {
        self.shutting_down = true;
        self.revision += 1;
        self.events.push(Event::ShutdownRequested { drain });
        if !drain {
            let pending: Vec<JobId> = self.running.iter().copied().chain(self.queue.iter().copied()).collect();
            for id in pending {
                self.end_job(id, JobState::Cancelled, "cancelled by shutdown".into());
            }
        }
    }

    pub fn shutting_down(&self) -> bool {
        self.shutting_down
    }

    /// Shutting down and nothing left to run: the server may stop.
    pub fn finished(&self) -> bool {
        self.shutting_down && self.running.is_none() && self.queue.is_empty()
    }

    /// What a process that last ran `after` should do next.
    pub fn assignment(&self, after: JobId) -> Assignment {
        if let Some(job) = self.running.and_then(|id| self.jobs.get(&id)) {
            if job.id > after {
                return Assignment::Job {
                    job_id: job.id,
                    name: job.config.run.name.clone(),
                    stage: job.stage(),
                    config_toml: job.config_toml.clone(),
                };
            }
        }
        if self.shutting_down && self.queue.is_empty() {
            Assignment::Shutdown
        } else {
            Assignment::Wait
        }
    }

    // ───────────────────────────── Membership ─────────────────────────────

    fn heartbeat_timeout(&self) -> Duration {
        self.running
            .and_then(|id| self.jobs.get(&id))
            .map_or(self.options.heartbeat_timeout, |j| Duration::from_secs_f64(j.config.cluster.heartbeat_timeout_s))
    }

    /// How often processes should heartbeat: a third of the timeout, at most the default.
    pub fn heartbeat_interval(&self) -> Duration {
        (self.heartbeat_timeout() / 3).min(self.options.heartbeat_interval)
    }

    pub fn register(&mut self, now: Instant, role: Role, name: String, rank: u32, world_size: u32) -> WorkerId {
        let id = WorkerId(self.next_worker);
        self.next_worker += 1;
        self.ids_dirty = true;
        self.events.push(Event::WorkerRegistered { worker_id: id, role, name: name.clone() });
        self.workers.insert(id, Worker { name, role, rank, world_size, last_seen: now, alive: true });
        id
    }

    /// Records a sign of life; a worker marked dead comes back (its leases are already gone).
    pub fn touch(&mut self, now: Instant, id: WorkerId) -> Result<&Worker, StateError> {
        let worker = self.workers.get_mut(&id).ok_or(StateError::UnknownWorker(id))?;
        worker.last_seen = now;
        worker.alive = true;
        Ok(worker)
    }

    pub fn deregister(&mut self, id: WorkerId) -> Result<usize, StateError> {
        self.workers.remove(&id).ok_or(StateError::UnknownWorker(id))?;
        self.events.push(Event::WorkerLeft { worker_id: id });
        Ok(self.expire_leases_where(|l| l.worker == id))
    }

    pub fn workers(&self) -> impl Iterator<Item = (WorkerId, &Worker)> {
        self.workers.iter().map(|(id, w)| (*id, w))
    }

    /// Marks silent workers dead and expires their leases and every lease past its deadline.
    /// Returns whether anything changed.
    pub fn expire(&mut self, now: Instant) -> bool {
        let timeout = self.heartbeat_timeout();
        let mut newly_dead = Vec::new();
        for (id, worker) in self.workers.iter_mut() {
            if worker.alive && now.saturating_duration_since(worker.last_seen) > timeout {
                worker.alive = false;
                newly_dead.push(*id);
            }
        }
        for id in &newly_dead {
            self.events.push(Event::WorkerDead { worker_id: *id });
        }
        let returned = self.expire_leases_where(|l| l.deadline <= now || newly_dead.contains(&l.worker));
        let changed = !newly_dead.is_empty() || returned > 0;
        if changed {
            self.revision += 1;
        }
        changed
    }

    /// Expires the running job's leases matching `pred`; returns the prompts sent back.
    fn expire_leases_where(&mut self, pred: impl Fn(&LeaseRecord) -> bool) -> usize {
        let Some(job) = self.running.and_then(|id| self.jobs.get_mut(&id)) else { return 0 };
        let job_id = job.id;
        let Some(r) = &mut job.rollouts else { return 0 };
        let mut expired: Vec<LeaseId> = r.leases.iter().filter(|(_, l)| pred(l)).map(|(id, _)| *id).collect();
        // Oldest lease last, so that it ends up first in the queue.
        expired.sort_by(|a, b| b.cmp(a));
        let mut returned = 0;
        for lease_id in expired {
            let Some(lease) = r.leases.remove(&lease_id) else { continue };
            let back: Vec<PromptKey> = lease.prompts.iter().copied().filter(|k| lease.outstanding.contains(k)).collect();
            returned += back.len();
            r.requeue_front(back.iter().copied());
            r.expired_leases.insert(lease_id);
            job.counters.leases_expired += 1;
            self.events.push(Event::LeaseExpired { job_id, lease_id, prompts_returned: back.len() });
        }
        returned
    }

    // ───────────────────────────── Rollout ─────────────────────────────

    fn running_job_mut(&mut self, id: JobId) -> Result<&mut Job, StateError> {
        let job = self.jobs.get_mut(&id).ok_or(StateError::UnknownJob(id))?;
        if job.state != JobState::Running {
            return Err(StateError::JobNotRunning { job: id, state: job.state });
        }
        Ok(job)
    }

    /// Leases up to `max_prompts` prompts of job `id` to a rollout worker, no more than the
    /// remaining steps (plus a pipeline of `max_staleness + 2` steps) need.
    pub fn lease(&mut self, now: Instant, worker: WorkerId, id: JobId, max_prompts: u32) -> Result<LeaseGrant, StateError> {
        let role = self.touch(now, worker)?.role;
        if role != Role::RolloutWorker {
            return Err(StateError::WrongRole { worker, role, needed: Role::RolloutWorker, what: "LeasePrompts" });
        }
        let job = self.jobs.get_mut(&id).ok_or(StateError::UnknownJob(id))?;
        let stage = job.stage();
        let (job_state, policy_version) = (job.state, job.policy_version);
        let Some(r) = &mut job.rollouts else {
            return Err(StateError::NotGrpo { job: id, stage, what: "LeasePrompts" });
        };
        let mut grant = LeaseGrant {
            lease_id: None,
            job_id: id,
            policy_version,
            group_size: r.group_size,
            timeout: r.lease_timeout,
            prompts: Vec::new(),
            job_state,
        };
        match job_state {
            JobState::Running => {}
            JobState::Queued => return Err(StateError::JobNotRunning { job: id, state: job_state }),
            _ => return Ok(grant),
        }
        let count = r.leasable(job.total_steps).min(max_prompts as u64) as usize;
        if count == 0 {
            return Ok(grant);
        }
        let mut keys = Vec::with_capacity(count);
        while keys.len() < count {
            let key = match r.requeued.pop_front() {
                Some(key) => key,
                None => {
                    let (prompt_id, epoch) = job.order.at(r.next_fresh);
                    r.next_fresh += 1;
                    PromptKey { prompt_id, epoch }
                }
            };
            keys.push(key);
        }
        let lease_id = LeaseId(self.next_lease);
        self.next_lease += 1;
        self.ids_dirty = true;
        self.dirty.insert(id);
        grant.prompts = keys.iter().map(|k| (*k, job.samples[k.prompt_id as usize].clone())).collect();
        grant.lease_id = Some(lease_id);
        job.counters.prompts_leased += keys.len() as u64;
        r.leases.insert(
            lease_id,
            LeaseRecord { worker, outstanding: keys.iter().copied().collect(), prompts: keys, deadline: now + r.lease_timeout },
        );
        Ok(grant)
    }

    /// Takes one submitted group: accepted at most once per prompt occurrence, ignored (and
    /// counted) when late, duplicate or unknown. A malformed group is an error.
    pub fn submit_group(&mut self, now: Instant, group: RolloutGroup) -> Result<GroupOutcome, StateError> {
        let worker = WorkerId(group.worker_id);
        self.touch(now, worker)?;
        let id = JobId(group.job_id);
        let job = self.jobs.get_mut(&id).ok_or(StateError::UnknownJob(id))?;
        let stage = job.stage();
        let Some(r) = &mut job.rollouts else {
            return Err(StateError::NotGrpo { job: id, stage, what: "SubmitGroups" });
        };
        if group.completions.len() != r.group_size as usize {
            return Err(StateError::InvalidGroup(format!(
                "group for prompt {} has {} completions; job {id} has grpo.group_size = {}",
                group.prompt_id,
                group.completions.len(),
                r.group_size
            )));
        }
        if let Some(c) = group.completions.iter().find(|c| !c.logprobs.is_empty() && c.logprobs.len() != c.token_ids.len()) {
            return Err(StateError::InvalidGroup(format!(
                "a completion of prompt {} has {} token ids but {} logprobs",
                group.prompt_id,
                c.token_ids.len(),
                c.logprobs.len()
            )));
        }
        if group.policy_version > job.policy_version {
            return Err(StateError::InvalidGroup(format!(
                "group sampled at policy version {} but job {id} is at version {}",
                group.policy_version, job.policy_version
            )));
        }
        if job.state != JobState::Running {
            job.counters.late_groups_ignored += 1;
            return Ok(GroupOutcome::Stale);
        }
        let key = PromptKey { prompt_id: group.prompt_id, epoch: group.epoch };
        let lease_id = LeaseId(group.lease_id);
        if r.accepted.contains(&key) {
            job.counters.duplicates_ignored += 1;
            return Ok(GroupOutcome::Duplicate);
        }
        let owned = r.leases.get(&lease_id).is_some_and(|l| l.worker == worker && l.outstanding.contains(&key));
        if !owned {
            if r.expired_leases.contains(&lease_id) {
                job.counters.late_groups_ignored += 1;
                return Ok(GroupOutcome::Stale);
            }
            job.counters.unknown_lease_groups += 1;
            return Ok(GroupOutcome::UnknownLease);
        }
        if let Some(lease) = r.leases.get_mut(&lease_id) {
            lease.outstanding.remove(&key);
            if lease.outstanding.is_empty() {
                r.leases.remove(&lease_id);
            }
        }
        if job.policy_version - group.policy_version > r.max_staleness {
            // It can only get older: drop it now rather than at step time.
            job.counters.groups_dropped_stale += 1;
            r.requeue_front(std::iter::once(key));
            self.events.push(Event::GroupDroppedStale {
                job_id: id,
                prompt_id: key.prompt_id,
                epoch: key.epoch,
                sampled_at: group.policy_version,
                policy_version: job.policy_version,
            });
            return Ok(GroupOutcome::Stale);
        }
        r.accepted.insert(key);
        job.counters.groups_accepted += 1;
        let first = group.completions.first().map(|c| c.reward);
        if group.completions.iter().all(|c| Some(c.reward) == first) {
            job.counters.tied_groups += 1;
            if r.filter_tied_groups {
                // No signal: consumed without training; the lease budget refills the batch.
                return Ok(GroupOutcome::Accepted);
            }
        }
        r.ready.push_back(Arc::new(group));
        self.revision += 1;
        Ok(GroupOutcome::Accepted)
    }

    // ───────────────────────────── Learners ─────────────────────────────

    fn check_rank(job: &Job, rank: u32, world_size: u32) -> Result<(), StateError> {
        if world_size != job.world_size {
            return Err(StateError::BadRank(format!(
                "world_size {world_size} does not match job {}'s cluster.learners = {}",
                job.id, job.world_size
            )));
        }
        if rank >= world_size {
            return Err(StateError::BadRank(format!("rank {rank} is not below world_size {world_size}")));
        }
        Ok(())
    }

    /// This rank's shard of step `step`. GRPO steps are assembled in order, each once the
    /// previous step was reported by every rank, from the ready groups in arrival order.
    pub fn pull_batch(&mut self, id: JobId, rank: u32, world_size: u32, step: u64) -> Result<BatchOutcome, StateError> {
        let job = self.jobs.get_mut(&id).ok_or(StateError::UnknownJob(id))?;
        Self::check_rank(job, rank, world_size)?;
        match job.state {
            JobState::Running => {}
            JobState::Queued => return Err(StateError::JobNotRunning { job: id, state: job.state }),
            state => return Ok(BatchOutcome::Done(state)),
        }
        if step >= job.total_steps {
            return Ok(BatchOutcome::Done(job.state));
        }
        let policy_version = job.policy_version;
        let Some(r) = &mut job.rollouts else {
            let batch = job.config.train.batch_size as u64;
            let per_rank = batch / world_size as u64;
            let start = step * batch + rank as u64 * per_rank;
            let samples = (start..start + per_rank).map(|p| job.samples[job.order.at(p).0 as usize].clone()).collect();
            return Ok(BatchOutcome::Samples { samples, policy_version });
        };
        // Steps are sealed in order and a learner only pulls step s after training s - 1, so a
        // step beyond the next one to seal comes from learners that resumed from another job's
        // checkpoint in the same run.out_dir: its rollouts would have to come from a policy
        // version this job never published. Refused at once rather than pending forever.
        if step > r.steps.len() as u64 {
            let out = job.config.run.out_dir.display();
            return Err(StateError::ForeignCheckpoint(format!(
                "job {id}: learner rank {rank} resumed at GRPO step {step} from a checkpoint in {out}/checkpoints, but this job has \
trained {} steps: the checkpoint was left by an earlier job with the same run.out_dir, and a GRPO job cannot continue \
another job's steps (its rollouts would come from a policy version it never published); submit it with a new \
run.out_dir, or remove {out}/checkpoints to start over",
                job.steps_completed
            )));
        }
        if step as usize == r.steps.len() && job.steps_completed >= step {
            let mut dropped = Vec::new();
            while (r.assembling.len() as u64) < r.prompts_per_step {
                let Some(group) = r.ready.pop_front() else { break };
                if policy_version - group.policy_version > r.max_staleness {
                    let key = PromptKey { prompt_id: group.prompt_id, epoch: group.epoch };
                    r.accepted.remove(&key);
                    dropped.push(key);
                    job.counters.groups_dropped_stale += 1;
                    self.events.push(Event::GroupDroppedStale {
                        job_id: id,
                        prompt_id: key.prompt_id,
                        epoch: key.epoch,
                        sampled_at: group.policy_version,
                        policy_version,
                    });
                } else {
                    r.assembling.push(group);
                }
            }
            if !dropped.is_empty() {
                r.requeue_front(dropped.into_iter());
                self.revision += 1;
            }
            if r.assembling.len() as u64 == r.prompts_per_step {
                let groups = std::mem::take(&mut r.assembling);
                r.last_step_lag = groups.iter().map(|g| policy_version.saturating_sub(g.policy_version)).max().unwrap_or(0);
                self.journal.push(Durable::StepSealed { job_id: id, step, groups: groups.clone() });
                self.dirty.insert(id);
                r.steps.push(groups);
                self.revision += 1;
            }
        }
        if step < r.pruned_below {
            return Err(StateError::StepPruned(format!(
                "step {step} of job {id} was trained more than train.checkpoint_every = {} steps ago; its groups are gone",
                r.retain_steps
            )));
        }
        let Some(sealed) = r.steps.get(step as usize) else { return Ok(BatchOutcome::Pending) };
        let per_rank = sealed.len() / world_size as usize;
        let groups = sealed[rank as usize * per_rank..(rank as usize + 1) * per_rank].to_vec();
        Ok(BatchOutcome::Groups { groups, policy_version })
    }

    /// The sample bytes of a prompt of job `id` (attached to groups handed to learners).
    pub fn sample(&self, id: JobId, prompt_id: u64) -> Option<Bytes> {
        self.jobs.get(&id).and_then(|j| j.samples.get(prompt_id as usize).cloned())
    }

    /// A rank finished `step`. Returns the steps every rank has completed.
    pub fn report_step(
        &mut self,
        id: JobId,
        rank: u32,
        step: u64,
        metrics: BTreeMap<String, f64>,
        policy_version_after: u64,
    ) -> Result<u64, StateError> {
        let job = self.jobs.get_mut(&id).ok_or(StateError::UnknownJob(id))?;
        let world_size = job.world_size;
        Self::check_rank(job, rank, world_size)?;
        if job.state.is_terminal() {
            return Ok(job.steps_completed);
        }
        if job.state != JobState::Running {
            return Err(StateError::JobNotRunning { job: id, state: job.state });
        }
        if step >= job.total_steps {
            return Err(StateError::StepOutOfRange(format!("step {step} is past job {id}'s train.steps = {}", job.total_steps)));
        }
        if let Some(r) = &job.rollouts {
            if step as usize >= r.steps.len() {
                return Err(StateError::StepNotReady(format!("step {step} of job {id} has not been handed out yet")));
            }
        }
        if step < job.steps_completed {
            return Ok(job.steps_completed); // a restarted learner re-reporting
        }
        job.reported.entry(step).or_default().insert(rank);
        self.revision += 1;
        self.dirty.insert(id);
        job.policy_version = job.policy_version.max(policy_version_after);
        if rank == 0 {
            job.latest_metrics = metrics;
        }
        while job.reported.get(&job.steps_completed).is_some_and(|ranks| ranks.len() as u32 == world_size) {
            job.reported.remove(&job.steps_completed);
            if let Some(r) = &job.rollouts {
                job.counters.groups_trained += r.steps[job.steps_completed as usize].len() as u64;
            }
            self.events.push(Event::StepCompleted { job_id: id, step: job.steps_completed, policy_version: job.policy_version });
            job.steps_completed += 1;
        }
        if let Some(r) = job.rollouts.as_mut().filter(|r| r.retain_steps > 0) {
            let floor = job.steps_completed.saturating_sub(r.retain_steps);
            for step in r.pruned_below..floor {
                r.steps[step as usize] = Vec::new();
            }
            if floor > r.pruned_below {
                r.pruned_below = floor;
                self.journal.push(Durable::StepsPruned { job_id: id, below: floor });
            }
        }
        let done = job.steps_completed;
        self.maybe_succeed(id);
        Ok(done)
    }

    /// Rank 0 ends the job: fails it with `failure`, or asks it to succeed once every rank has
    /// reported the last step.
    pub fn finish_job(&mut self, id: JobId, rank: u32, checkpoint_dir: String, failure: String) -> Result<JobState, StateError> {
        let job = self.jobs.get_mut(&id).ok_or(StateError::UnknownJob(id))?;
        if job.state.is_terminal() {
            return Ok(job.state);
        }
        if rank != 0 {
            return Err(StateError::BadRank(format!("only rank 0 finishes a job, not rank {rank}")));
        }
        if !failure.is_empty() {
            self.end_job(id, JobState::Failed, failure);
            return self.job_state(id);
        }
        let last = job.total_steps - 1;
        let rank0_done = job.steps_completed == job.total_steps || job.reported.get(&last).is_some_and(|r| r.contains(&0));
        if !rank0_done {
            return Err(StateError::LastStepNotReported(format!(
                "job {id}: rank 0 has not reported its last step {last} ({} of {} steps completed)",
                job.steps_completed, job.total_steps
            )));
        }
        job.finish_requested = Some(checkpoint_dir);
        self.dirty.insert(id);
        self.maybe_succeed(id);
        self.job_state(id)
    }

    fn maybe_succeed(&mut self, id: JobId) {
        let Some(job) = self.jobs.get(&id) else { return };
        if job.steps_completed == job.total_steps {
            if let Some(checkpoint) = &job.finish_requested {
                let message = format!("final checkpoint: {checkpoint}");
                self.end_job(id, JobState::Succeeded, message);
            }
        }
    }

    /// New weights of `version` are available for job `id`.
    pub fn weights_published(&mut self, id: JobId, version: u64) -> Result<(), StateError> {
        let job = self.running_job_mut(id)?;
        if version > job.policy_version {
            job.policy_version = version;
            self.revision += 1;
            self.dirty.insert(id);
        }
        Ok(())
    }

    // ───────────────────────────── Rendezvous ─────────────────────────────

    /// Records this rank's payload; returns every payload once all ranks arrived.
    pub fn rendezvous(&mut self, id: JobId, key: &str, rank: u32, world_size: u32, payload: Bytes) -> Result<Option<Vec<Bytes>>, StateError> {
        self.running_job_mut(id)?;
        if world_size == 0 || rank >= world_size {
            return Err(StateError::BadRank(format!("rank {rank} is not below world_size {world_size}")));
        }
        let round = self
            .rendezvous
            .entry((id, key.to_string()))
            .or_insert_with(|| RendezvousRound { world_size, payloads: vec![None; world_size as usize] });
        if round.world_size != world_size {
            return Err(StateError::BadRank(format!(
                "rendezvous `{key}` has world_size {} but rank {rank} says {world_size}",
                round.world_size
            )));
        }
        let complete = round.payloads.iter().all(Option::is_some);
        let slot = &mut round.payloads[rank as usize];
        if !complete && slot.as_ref() != Some(&payload) {
            *slot = Some(payload);
            self.revision += 1;
        }
        Ok(round.payloads.iter().cloned().collect())
    }

    // ───────────────────────────── Status ─────────────────────────────

    /// The running GRPO job's pipeline (all 0 when no GRPO job runs).
    pub fn pipeline_gauges(&self) -> PipelineGauges {
        let Some(job) = self.running.and_then(|id| self.jobs.get(&id)) else { return PipelineGauges::default() };
        let Some(r) = job.rollouts.as_ref().filter(|_| job.state == JobState::Running) else {
            return PipelineGauges::default();
        };
        PipelineGauges {
            prompts_waiting: r.leasable(job.total_steps),
            leased_prompts: r.outstanding(),
            queue_depth: r.queued_groups(),
            policy_lag: r.last_step_lag,
        }
    }

    pub fn snapshot(&self, only: Option<JobId>) -> Result<Vec<JobSnapshot>, StateError> {
        if let Some(id) = only {
            if !self.jobs.contains_key(&id) {
                return Err(StateError::UnknownJob(id));
            }
        }
        Ok(self
            .jobs
            .values()
            .filter(|j| only.is_none_or(|id| id == j.id))
            .map(|j| JobSnapshot {
                job_id: j.id,
                name: j.config.run.name.clone(),
                stage: j.stage(),
                state: j.state,
                message: j.message.clone(),
                steps_completed: j.steps_completed,
                total_steps: j.total_steps,
                policy_version: j.policy_version,
                counters: j.counters.clone(),
                queue_depth: j.rollouts.as_ref().map_or(0, Rollouts::queued_groups),
                leased_prompts_outstanding: j.rollouts.as_ref().map_or(0, |r| r.outstanding()),
                latest_metrics: j.latest_metrics.clone(),
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use medtvt_proto::v1::Completion;

    const T0: Duration = Duration::from_secs(0);

    fn config(stage: &str, extra: &str) -> RunConfig {
        let dir = std::env::temp_dir();
        let grpo = if stage == "grpo" {
            "[grpo]\ngroup_size = 2\nprompts_per_step = 2\nmax_new_tokens = 4\nmax_staleness = 1\n"
        } else {
            ""
        };
        let text = format!(
            "[run]\nname = \"t\"\nstage = \"{stage}\"\nout_dir = \"o\"\nseed = 3\n[data]\ndir = \"{}\"\n[model]\n\
             [train]\nsteps = 3\nbatch_size = 4\nlearning_rate = 0.1\n{grpo}[cluster]\nlearners = 2\n\
             lease_timeout_s = 10.0\nheartbeat_timeout_s = 5.0\n{extra}",
            dir.display()
        );
        medtvt_config::parse_run_config(&text, Path::new("t.toml"), &[]).unwrap()
    }

    fn samples(n: usize) -> Vec<Bytes> {
        (0..n).map(|i| Bytes::from(format!("{{\"i\":{i}}}"))).collect()
    }

    fn group(worker: WorkerId, job: JobId, lease: LeaseId, key: PromptKey, version: u64, rewards: [f32; 2]) -> RolloutGroup {
        RolloutGroup {
            job_id: job.0,
            lease_id: lease.0,
            worker_id: worker.0,
            prompt_id: key.prompt_id,
            epoch: key.epoch,
            policy_version: version,
            completions: rewards.iter().map(|r| Completion { reward: *r, ..Default::default() }).collect(),
            ..Default::default()
        }
    }

    fn grpo_state(n: usize) -> (RunState, Instant, WorkerId, JobId) {
        let mut st = RunState::new(StateOptions::default());
        st.enqueue(config("grpo", ""), samples(n)).unwrap();
        let now = Instant::now();
        let w = st.register(now, Role::RolloutWorker, "w".into(), 0, 0);
        (st, now, w, JobId(1))
    }

    fn keys(grant: &LeaseGrant) -> Vec<PromptKey> {
        grant.prompts.iter().map(|(k, _)| *k).collect()
    }

    /// Issue #12: learners that resumed from an earlier job's checkpoint ask a fresh GRPO job
    /// for a step it can never seal; the pull is refused with the reason instead of pending.
    #[test]
    fn a_grpo_step_beyond_the_next_one_to_seal_is_refused_with_the_reason() {
        let (mut st, _, _, job) = grpo_state(8);
        assert!(matches!(st.pull_batch(job, 0, 2, 0).unwrap(), BatchOutcome::Pending));
        let err = st.pull_batch(job, 0, 2, 2).unwrap_err().to_string();
        assert!(err.contains("resumed at GRPO step 2 from a checkpoint in o/checkpoints, but this job has trained 0 steps"), "{err}");
        assert!(err.contains("new run.out_dir"), "{err}");
    }

    #[test]
    fn pt_shards_are_disjoint_cover_the_batch_and_repeat() {
        let mut st = RunState::new(StateOptions::default());
        st.enqueue(config("pt", ""), samples(6)).unwrap();
        let shard = |st: &mut RunState, rank, step| match st.pull_batch(JobId(1), rank, 2, step).unwrap() {
            BatchOutcome::Samples { samples, .. } => samples,
            other => panic!("{other:?}"),
        };
        let a = shard(&mut st, 0, 0);
        let b = shard(&mut st, 1, 0);
        assert_eq!((a.len(), b.len()), (2, 2));
        assert!(a.iter().all(|s| !b.contains(s)));
        assert_eq!(shard(&mut st, 0, 0), a);
        // Step 1 takes the rest of epoch 0 (2 samples) and the start of epoch 1.
        let mut epoch0: Vec<Bytes> = [a, b, shard(&mut st, 0, 1)].concat();
        epoch0.sort();
        epoch0.dedup();
        assert_eq!(epoch0.len(), 6);
        assert_eq!(st.pull_batch(JobId(1), 0, 2, 3).unwrap(), BatchOutcome::Done(JobState::Running));
        assert!(matches!(st.pull_batch(JobId(1), 2, 2, 0), Err(StateError::BadRank(_))));
        assert!(matches!(st.pull_batch(JobId(1), 0, 3, 0), Err(StateError::BadRank(_))));
    }

    #[test]
    fn jobs_run_fifo_and_succeed_after_all_steps_and_finish() {
        let mut st = RunState::new(StateOptions::default());
        st.enqueue(config("pt", ""), samples(4)).unwrap();
        st.enqueue(config("sft", ""), samples(4)).unwrap();
        assert_eq!(st.job_state(JobId(2)).unwrap(), JobState::Queued);
        assert!(matches!(st.assignment(JobId(0)), Assignment::Job { job_id: JobId(1), .. }));
        assert_eq!(st.assignment(JobId(1)), Assignment::Wait);
        for step in 0..3 {
            for rank in 0..2 {
                st.report_step(JobId(1), rank, step, BTreeMap::new(), step + 1).unwrap();
            }
        }
        assert!(matches!(st.finish_job(JobId(1), 1, "c".into(), String::new()), Err(StateError::BadRank(_))));
        assert_eq!(st.finish_job(JobId(1), 0, "ckpt".into(), String::new()).unwrap(), JobState::Succeeded);
        assert_eq!(st.job_state(JobId(2)).unwrap(), JobState::Running);
        assert!(matches!(st.assignment(JobId(1)), Assignment::Job { job_id: JobId(2), .. }));
        st.shutdown(true);
        assert!(!st.finished());
        assert_eq!(st.cancel_job(JobId(2)).unwrap(), JobState::Cancelled);
        assert_eq!(st.assignment(JobId(1)), Assignment::Shutdown);
        assert!(st.finished());
        assert_eq!(st.enqueue(config("pt", ""), samples(1)), Err(StateError::ShuttingDown));
    }

    #[test]
    fn finish_before_the_last_step_is_refused_and_success_waits_for_all_ranks() {
        let mut st = RunState::new(StateOptions::default());
        st.enqueue(config("pt", ""), samples(4)).unwrap();
        assert!(matches!(st.finish_job(JobId(1), 0, "c".into(), String::new()), Err(StateError::LastStepNotReported(_))));
        for step in 0..3 {
            st.report_step(JobId(1), 0, step, BTreeMap::from([("loss".into(), 1.0)]), step + 1).unwrap();
        }
        assert_eq!(st.finish_job(JobId(1), 0, "c".into(), String::new()).unwrap(), JobState::Running);
        for step in 0..3 {
            st.report_step(JobId(1), 1, step, BTreeMap::new(), step + 1).unwrap();
        }
        assert_eq!(st.job_state(JobId(1)).unwrap(), JobState::Succeeded);
        let snap = &st.snapshot(None).unwrap()[0];
        assert_eq!((snap.steps_completed, snap.policy_version), (3, 3));
        assert_eq!(snap.latest_metrics.get("loss"), Some(&1.0));
    }

    #[test]
    fn batch_size_not_divisible_by_learners_names_the_field() {
        let mut st = RunState::new(StateOptions::default());
        let err = st.enqueue(config("grpo", "").tap_grpo(3), samples(4)).unwrap_err();
        assert!(err.to_string().contains("`grpo.prompts_per_step` = 3 is not divisible by cluster.learners = 2"), "{err}");
    }

    trait TapGrpo {
        fn tap_grpo(self, prompts_per_step: u32) -> Self;
    }
    impl TapGrpo for RunConfig {
        fn tap_grpo(mut self, prompts_per_step: u32) -> Self {
            if let Some(g) = &mut self.grpo {
                g.prompts_per_step = prompts_per_step;
            }
            self
        }
    }

    #[test]
    fn grpo_groups_flow_into_steps_and_are_trained_once() {
        let (mut st, now, w, job) = grpo_state(10);
        // 3 steps x 2 prompts; the window is (1 + 2) steps = 6 prompts in flight.
        assert_eq!(st.lease(now, w, job, 100).unwrap().prompts.len(), 6);
        st.cancel_job(job).unwrap();
        let job = st.enqueue(config("grpo", ""), samples(10)).unwrap();
        let (mut leased, mut trained) = (Vec::new(), Vec::new());
        for step in 0..3u64 {
            let grant = st.lease(now, w, job, 2).unwrap();
            assert_eq!(grant.policy_version, step);
            for key in keys(&grant) {
                let outcome = st.submit_group(now, group(w, job, grant.lease_id.unwrap(), key, step, [0.0, 1.0])).unwrap();
                assert_eq!(outcome, GroupOutcome::Accepted);
                leased.push((key.prompt_id, key.epoch));
            }
            for rank in 0..2 {
                let BatchOutcome::Groups { groups, .. } = st.pull_batch(job, rank, 2, step).unwrap() else { panic!() };
                assert_eq!(groups.len(), 1);
                trained.extend(groups.iter().map(|g| (g.prompt_id, g.epoch)));
            }
            // Idempotent re-pull; the next step waits until this one is reported by both ranks.
            let BatchOutcome::Groups { groups, .. } = st.pull_batch(job, 1, 2, step).unwrap() else { panic!() };
            assert_eq!((groups[0].prompt_id, groups[0].epoch), *trained.last().unwrap());
            assert_eq!(st.pull_batch(job, 0, 2, step + 1).unwrap(), if step < 2 { BatchOutcome::Pending } else { BatchOutcome::Done(JobState::Running) });
            for rank in 0..2 {
                st.report_step(job, rank, step, BTreeMap::new(), step + 1).unwrap();
            }
        }
        assert_eq!(trained, leased, "arrival order, each group exactly once");
        let c = &st.snapshot(Some(job)).unwrap()[0].counters;
        assert_eq!((c.groups_accepted, c.groups_trained, c.groups_dropped_stale), (6, 6, 0));
    }

    #[test]
    fn pipeline_gauges_follow_prompts_from_waiting_to_leased_to_queued() {
        let (mut st, now, w, job) = grpo_state(10);
        let gauges = |st: &RunState| {
            let g = st.pipeline_gauges();
            (g.prompts_waiting, g.leased_prompts, g.queue_depth, g.policy_lag)
        };
        // 3 steps x 2 prompts, a window of (1 + 2) steps: 6 prompts may be leased.
        assert_eq!(gauges(&st), (6, 0, 0, 0));
        let first = st.lease(now, w, job, 3).unwrap();
        assert_eq!(gauges(&st), (3, 3, 0, 0));
        let k = keys(&first);
        let lease = first.lease_id.unwrap();
        for key in &k[..2] {
            st.submit_group(now, group(w, job, lease, *key, 0, [0.0, 1.0])).unwrap();
        }
        assert_eq!(gauges(&st), (3, 1, 2, 0));
        // Step 0 is sealed from two version-0 groups at version 0; 2 steps = 4 prompts remain.
        for rank in 0..2 {
            st.pull_batch(job, rank, 2, 0).unwrap();
            st.report_step(job, rank, 0, BTreeMap::new(), 2).unwrap();
        }
        assert_eq!(gauges(&st), (3, 1, 0, 0));
        st.submit_group(now, group(w, job, lease, k[2], 1, [0.0, 1.0])).unwrap();
        assert_eq!(gauges(&st), (3, 0, 1, 0));
        let second = st.lease(now, w, job, 10).unwrap();
        assert_eq!(gauges(&st), (0, 3, 1, 0));
        st.submit_group(now, group(w, job, second.lease_id.unwrap(), keys(&second)[0], 2, [0.0, 1.0])).unwrap();
        // Step 1 is sealed at version 2 from groups sampled at versions 1 and 2: lag 1.
        assert!(matches!(st.pull_batch(job, 0, 2, 1).unwrap(), BatchOutcome::Groups { .. }));
        assert_eq!(gauges(&st), (0, 2, 0, 1));
        st.cancel_job(job).unwrap();
        assert_eq!(st.pipeline_gauges(), PipelineGauges::default());
    }

    #[test]
    fn trained_steps_older_than_the_checkpoint_window_are_freed() {
        let mut st = RunState::new(StateOptions::default());
        let mut cfg = config("grpo", "");
        cfg.train.checkpoint_every = 1;
        let job = st.enqueue(cfg, samples(10)).unwrap();
        let now = Instant::now();
        let w = st.register(now, Role::RolloutWorker, "w".into(), 0, 0);
        for step in 0..2u64 {
            let grant = st.lease(now, w, job, 2).unwrap();
            for key in keys(&grant) {
                st.submit_group(now, group(w, job, grant.lease_id.unwrap(), key, step, [0.0, 1.0])).unwrap();
            }
            for rank in 0..2 {
                assert!(matches!(st.pull_batch(job, rank, 2, step).unwrap(), BatchOutcome::Groups { .. }));
                st.report_step(job, rank, step, BTreeMap::new(), step + 1).unwrap();
            }
        }
        // Step 1 is still within one step of the last completed; step 0 is not.
        assert!(matches!(st.pull_batch(job, 0, 2, 1).unwrap(), BatchOutcome::Groups { .. }));
        assert!(matches!(st.pull_batch(job, 0, 2, 0), Err(StateError::StepPruned(_))));
        let snap = &st.snapshot(None).unwrap()[0];
        assert_eq!(snap.counters.groups_trained, 4);
        // The lease budget still counts the freed step: 1 step left = 2 prompts.
        assert_eq!(st.lease(now, w, job, 100).unwrap().prompts.len(), 2);
    }

    #[test]
    fn expired_lease_goes_back_to_the_front_and_late_submission_is_ignored() {
        let (mut st, now, w1, job) = grpo_state(10);
        let w2 = st.register(now, Role::RolloutWorker, "w2".into(), 0, 0);
        let first = st.lease(now, w1, job, 2).unwrap();
        let later = now + Duration::from_secs(11);
        st.touch(later, w1).unwrap();
        st.touch(later, w2).unwrap();
        assert!(st.expire(later));
        let second = st.lease(later, w2, job, 2).unwrap();
        assert_eq!(keys(&second), keys(&first), "re-leased first, in order");
        let late = group(w1, job, first.lease_id.unwrap(), keys(&first)[0], 0, [0.0, 1.0]);
        assert_eq!(st.submit_group(later, late).unwrap(), GroupOutcome::Stale);
        let on_time = group(w2, job, second.lease_id.unwrap(), keys(&first)[0], 0, [0.0, 1.0]);
        assert_eq!(st.submit_group(later, on_time.clone()).unwrap(), GroupOutcome::Accepted);
        assert_eq!(st.submit_group(later, on_time).unwrap(), GroupOutcome::Duplicate);
        let bogus = group(w2, job, LeaseId(999), keys(&first)[1], 0, [0.0, 1.0]);
        assert_eq!(st.submit_group(later, bogus).unwrap(), GroupOutcome::UnknownLease);
        let c = &st.snapshot(None).unwrap()[0].counters;
        assert_eq!((c.late_groups_ignored, c.duplicates_ignored, c.unknown_lease_groups, c.leases_expired), (1, 1, 1, 1));
    }

    #[test]
    fn silent_worker_dies_and_its_leases_return() {
        let (mut st, now, w, job) = grpo_state(10);
        let grant = st.lease(now, w, job, 3).unwrap();
        assert!(!st.expire(now + Duration::from_secs(4)));
        assert!(st.expire(now + Duration::from_secs(6)));
        assert!(!st.workers().next().unwrap().1.alive);
        assert_eq!(st.snapshot(None).unwrap()[0].leased_prompts_outstanding, 0);
        let w2 = st.register(now, Role::RolloutWorker, "w2".into(), 0, 0);
        assert_eq!(keys(&st.lease(now, w2, job, 3).unwrap()), keys(&grant));
    }

    #[test]
    fn stale_group_is_dropped_and_its_prompt_requeued() {
        let (mut st, now, w, job) = grpo_state(10);
        let grant = st.lease(now, w, job, 6).unwrap();
        let lease = grant.lease_id.unwrap();
        let k = keys(&grant);
        for key in &k[..2] {
            st.submit_group(now, group(w, job, lease, *key, 0, [0.0, 1.0])).unwrap();
        }
        // Step 0 trains and the policy moves to version 2 (e.g. two publishes).
        for rank in 0..2 {
            st.pull_batch(job, rank, 2, 0).unwrap();
            st.report_step(job, rank, 0, BTreeMap::new(), 2).unwrap();
        }
        // A version-0 group is now 2 versions old (> max_staleness 1): dropped on arrival.
        assert_eq!(st.submit_group(now, group(w, job, lease, k[2], 0, [0.0, 1.0])).unwrap(), GroupOutcome::Stale);
        assert_eq!(st.submit_group(now, group(w, job, lease, k[3], 1, [0.0, 1.0])).unwrap(), GroupOutcome::Accepted);
        let snap = &st.snapshot(None).unwrap()[0];
        assert_eq!(snap.counters.groups_dropped_stale, 1);
        // The dropped prompt is the first to be leased again.
        let again = st.lease(now, w, job, 1).unwrap();
        assert_eq!(keys(&again), vec![k[2]]);
        st.submit_group(now, group(w, job, again.lease_id.unwrap(), k[2], 2, [0.0, 1.0])).unwrap();
        let BatchOutcome::Groups { .. } = st.pull_batch(job, 0, 2, 1).unwrap() else { panic!("step 1 should be ready") };
    }

    #[test]
    fn stale_group_in_the_ready_queue_is_dropped_at_step_time() {
        let (mut st, now, w, job) = grpo_state(10);
        let grant = st.lease(now, w, job, 6).unwrap();
        let lease = grant.lease_id.unwrap();
        for key in keys(&grant) {
            st.submit_group(now, group(w, job, lease, key, 0, [0.0, 1.0])).unwrap();
        }
        for rank in 0..2 {
            st.pull_batch(job, rank, 2, 0).unwrap();
            st.report_step(job, rank, 0, BTreeMap::new(), 2).unwrap();
        }
        // All four remaining version-0 groups are too old for step 1.
        assert_eq!(st.pull_batch(job, 0, 2, 1).unwrap(), BatchOutcome::Pending);
        let snap = &st.snapshot(None).unwrap()[0];
        assert_eq!((snap.counters.groups_dropped_stale, snap.queue_depth), (4, 0));
        let again = st.lease(now, w, job, 10).unwrap();
        assert_eq!(keys(&again)[..4], keys(&grant)[2..]);
    }

    #[test]
    fn malformed_groups_are_errors() {
        let (mut st, now, w, job) = grpo_state(10);
        let grant = st.lease(now, w, job, 1).unwrap();
        let mut g = group(w, job, grant.lease_id.unwrap(), keys(&grant)[0], 0, [0.0, 1.0]);
        g.completions.pop();
        assert!(matches!(st.submit_group(now, g), Err(StateError::InvalidGroup(m)) if m.contains("group_size = 2")));
        let g = group(w, job, grant.lease_id.unwrap(), keys(&grant)[0], 5, [0.0, 1.0]);
        assert!(matches!(st.submit_group(now, g), Err(StateError::InvalidGroup(_))));
        let g = group(WorkerId(77), job, grant.lease_id.unwrap(), keys(&grant)[0], 0, [0.0, 1.0]);
        assert_eq!(st.submit_group(now, g), Err(StateError::UnknownWorker(WorkerId(77))));
    }

    #[test]
    fn tied_groups_are_counted_and_filtered_when_asked() {
        let mut st = RunState::new(StateOptions::default());
        let mut cfg = config("grpo", "");
        if let Some(g) = &mut cfg.grpo {
            g.filter_tied_groups = true;
        }
        st.enqueue(cfg, samples(10)).unwrap();
        let now = Instant::now() + T0;
        let w = st.register(now, Role::RolloutWorker, "w".into(), 0, 0);
        let grant = st.lease(now, w, JobId(1), 2).unwrap();
        let k = keys(&grant);
        st.submit_group(now, group(w, JobId(1), grant.lease_id.unwrap(), k[0], 0, [1.0, 1.0])).unwrap();
        st.submit_group(now, group(w, JobId(1), grant.lease_id.unwrap(), k[1], 0, [0.0, 1.0])).unwrap();
        let snap = &st.snapshot(None).unwrap()[0];
        assert_eq!((snap.counters.tied_groups, snap.queue_depth), (1, 1));
    }

    #[test]
    fn lease_stops_at_what_the_remaining_steps_need() {
        let mut st = RunState::new(StateOptions::default());
        let mut cfg = config("grpo", "");
        cfg.train.steps = 1;
        st.enqueue(cfg, samples(100)).unwrap();
        let now = Instant::now();
        let w = st.register(now, Role::RolloutWorker, "w".into(), 0, 0);
        assert_eq!(st.lease(now, w, JobId(1), 100).unwrap().prompts.len(), 2);
        let learner = st.register(now, Role::Learner, "l".into(), 0, 2);
        assert!(matches!(st.lease(now, learner, JobId(1), 1), Err(StateError::WrongRole { .. })));
        st.cancel_job(JobId(1)).unwrap();
        let grant = st.lease(now, w, JobId(1), 1).unwrap();
        assert!(grant.job_done() && grant.prompts.is_empty());
    }

    /// What a store would hold after applying `records`, as [`RunState::resume`] takes it.
    fn stored(records: Vec<Durable>) -> (Vec<ResumedJob>, IdCounters) {
        let mut jobs: BTreeMap<JobId, ResumedJob> = BTreeMap::new();
        let mut ids = IdCounters { next_job: 1, next_worker: 1, next_lease: 1 };
        for record in records {
            match record {
                Durable::JobQueued { job_id, config_toml, samples } => {
                    let record = JobRecord {
                        job_id,
                        state: JobState::Queued,
                        message: String::new(),
                        policy_version: 0,
                        steps_completed: 0,
                        next_fresh: 0,
                        pruned_below: 0,
                        finish_requested: None,
                        progress: JobProgress::default(),
                    };
                    jobs.insert(job_id, ResumedJob { config_toml, samples: samples.to_vec(), record, sealed: Vec::new() });
                }
                Durable::Job(r) => {
                    let id = r.job_id;
                    jobs.get_mut(&id).unwrap().record = r;
                }
                Durable::StepSealed { job_id, step, groups } => {
                    let sealed = &mut jobs.get_mut(&job_id).unwrap().sealed;
                    assert_eq!(sealed.len() as u64, step, "steps are sealed in order");
                    let keys = groups.iter().map(|g| PromptKey { prompt_id: g.prompt_id, epoch: g.epoch }).collect();
                    sealed.push(SealedStep { keys, groups });
                }
                Durable::StepsPruned { job_id, below } => {
                    for step in &mut jobs.get_mut(&job_id).unwrap().sealed[..below as usize] {
                        step.groups.clear();
                    }
                }
                Durable::Ids(i) => ids = i,
            }
        }
        (jobs.into_values().collect(), ids)
    }

    #[test]
    fn a_resumed_state_continues_where_the_journal_ends() {
        let (mut st, now, w, job) = grpo_state(10);
        let grant = st.lease(now, w, job, 5).unwrap();
        let k = keys(&grant);
        for key in &k[..4] {
            st.submit_group(now, group(w, job, grant.lease_id.unwrap(), *key, 0, [0.0, 1.0])).unwrap();
        }
        for rank in 0..2 {
            st.pull_batch(job, rank, 2, 0).unwrap();
            st.report_step(job, rank, 0, BTreeMap::from([("loss".into(), 0.5)]), 1).unwrap();
        }
        let step1 = st.pull_batch(job, 0, 2, 1).unwrap();
        st.report_step(job, 0, 1, BTreeMap::new(), 2).unwrap();
        let (jobs, ids) = stored(st.drain_journal());

        let mut resumed = RunState::resume(StateOptions::default(), jobs, ids).unwrap();
        let (before, after) = (&st.snapshot(None).unwrap()[0], &resumed.snapshot(None).unwrap()[0]);
        assert_eq!((after.state, after.steps_completed, after.policy_version), (JobState::Running, 1, 2));
        assert_eq!((&after.latest_metrics, &after.counters), (&before.latest_metrics, &before.counters));
        let shard = |outcome: BatchOutcome| match outcome {
            BatchOutcome::Groups { groups, .. } => groups,
            other => panic!("{other:?}"),
        };
        assert_eq!(shard(resumed.pull_batch(job, 0, 2, 1).unwrap()), shard(step1), "the sealed step is the same shard");
        assert!(resumed.touch(now, w).is_err(), "workers register again");
        let w2 = resumed.register(now, Role::RolloutWorker, "w2".into(), 0, 0);
        assert!(w2 > w);
        // The unsubmitted fifth prompt is leased again first; then fresh ones.
        let again = resumed.lease(now, w2, job, 2).unwrap();
        assert!(again.lease_id > grant.lease_id);
        assert_eq!(keys(&again)[0], k[4]);
        assert!(!k.contains(&keys(&again)[1]));
        // Rank 0's report of step 1 survived: rank 1's completes it.
        assert_eq!(resumed.report_step(job, 1, 1, BTreeMap::new(), 2).unwrap(), 2);
    }

    #[test]
    fn rendezvous_completes_when_every_rank_arrived() {
        let mut st = RunState::new(StateOptions::default());
        st.enqueue(config("pt", ""), samples(4)).unwrap();
        assert_eq!(st.rendezvous(JobId(1), "k", 1, 2, Bytes::from("b")).unwrap(), None);
        let all = st.rendezvous(JobId(1), "k", 0, 2, Bytes::from("a")).unwrap();
        assert_eq!(all, Some(vec![Bytes::from("a"), Bytes::from("b")]));
        assert!(st.rendezvous(JobId(1), "k", 0, 3, Bytes::new()).is_err());
        assert_eq!(st.rendezvous(JobId(1), "k", 1, 2, Bytes::from("changed")).unwrap(), all, "completed keys are frozen");
    }

    #[test]
    fn skipped_samples_are_counted_and_each_logged_as_an_event() {
        let mut st = RunState::new(StateOptions::default());
        let problem = "ecg/enc-3.dat: WFDB signal data: too short".to_string();
        let skipped = vec![SkippedSample { line: 3, sample: "enc-3-dx".into(), problem: problem.clone() }];
        let id = st.enqueue_loaded(LoadedJob { config: config("pt", ""), samples: samples(4), skipped }).unwrap();
        assert_eq!(st.snapshot(Some(id)).unwrap()[0].counters.samples_skipped, 1);
        let events = st.drain_events();
        assert!(events.contains(&Event::SampleSkipped { job_id: id, line: 3, sample: "enc-3-dx".into(), problem }), "{events:?}");
        // The counter is part of the durable job record, so a resumed coordinator still shows it.
        let records = st.drain_journal();
        assert!(records.iter().any(|r| matches!(r, Durable::Job(rec) if rec.progress.counters.samples_skipped == 1)));
    }
}
