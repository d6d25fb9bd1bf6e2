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
//! Durability (with a run directory) stays out of this module's I/O: every transition that a
//! resumed run needs is also pushed as a [`Durable`] record, which the service drains after
//! each call (under the same lock, so in order) and `store.rs` writes to SQLite.
//! [`RunState::resume`] rebuilds the state from what was stored. Only what a restarted run
//! needs is recorded: jobs and their datasets, each job's scalar progress (policy version,
//! steps completed, ranks that reported, the lease cursor), sealed steps with their groups, and
//! the id counters. Leases, accepted groups not yet in a step, workers and rendezvous rounds are
//! not: on resume every prompt handed out but not in a sealed step goes back to the queue.
//!
//! One part per file, each with its tests: [`jobs`] (the FIFO), [`membership`] (processes and
//! heartbeats), [`leases`] (prompts out to workers, groups back), [`steps`] (batches, reports,
//! rendezvous), [`journal`] (records to store, resume) and [`status`] (snapshots, gauges). This
//! file holds the types they share: the error, the run and its jobs.

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

mod groups;
mod jobs;
mod journal;
mod leases;
mod membership;
mod status;
mod steps;

pub use groups::GroupSeat;
pub use jobs::{load_job, Assignment, LoadedJob};
pub use journal::{Durable, IdCounters, JobProgress, JobRecord, ResumedJob, SealedStep, WakeKey};
pub use leases::{GroupOutcome, LeaseGrant};
pub use membership::Worker;
pub use status::{JobSnapshot, PipelineGauges};
pub use steps::BatchOutcome;

/// What went wrong with a request, as the domain sees it; [`StateError::reason`] gives its code
/// on the wire (`service.rs` turns it into a status).
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
    #[error("{0}")]
    StaleGroup(String),
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
            StateError::StaleGroup(_) => ErrorReason::StaleGroup,
            StateError::ShuttingDown => ErrorReason::ShuttingDown,
        }
    }
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
    JobQueued {
        job_id: JobId,
        name: String,
        stage: Stage,
    },
    JobStarted {
        job_id: JobId,
    },
    JobEnded {
        job_id: JobId,
        state: JobState,
        message: String,
    },
    StepCompleted {
        job_id: JobId,
        step: u64,
        policy_version: u64,
    },
    WorkerRegistered {
        worker_id: WorkerId,
        role: Role,
        name: String,
    },
    WorkerDead {
        worker_id: WorkerId,
    },
    WorkerLeft {
        worker_id: WorkerId,
    },
    LeaseExpired {
        job_id: JobId,
        lease_id: LeaseId,
        prompts_returned: usize,
    },
    /// A sample left out at submission: `problem` names the broken file and what is wrong.
    SampleSkipped {
        job_id: JobId,
        line: usize,
        sample: String,
        problem: String,
    },
    GroupDroppedStale {
        job_id: JobId,
        prompt_id: u64,
        epoch: u64,
        sampled_at: u64,
        policy_version: u64,
    },
    ShutdownRequested {
        drain: bool,
    },
    /// A learner group formed (`on_learner_loss` = shrink or wait): its size, the optimizer
    /// steps it resumes from, and the slots (learner `--rank`s) of the old group left out.
    LearnerGroupFormed {
        job_id: JobId,
        epoch: u64,
        learners: u32,
        resume_step: u64,
        lost_slots: Vec<u32>,
    },
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
    /// The learners training the job now (`on_learner_loss` = shrink or wait).
    group: groups::LearnerGroup,
}

impl Job {}

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
    /// Records not yet drained by [`RunState::drain_journal`], in order.
    journal: Vec<Durable>,
    /// The last record of each job handed out by [`RunState::drain_journal`]: a job's record is
    /// journaled when it differs from this (computed, never flagged by hand).
    written: HashMap<JobId, JobRecord>,
    /// The id counters as last journaled.
    written_ids: IdCounters,
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
            journal: Vec::new(),
            written: HashMap::new(),
            written_ids: IdCounters { next_job: 1, next_worker: 1, next_lease: 1 },
        }
    }

    /// Events since the last call, oldest first.
    pub fn drain_events(&mut self) -> Vec<Event> {
        std::mem::take(&mut self.events)
    }
}

#[cfg(test)]
pub(crate) mod test_support {
    //! Builders shared by the state machine's tests.
    pub use super::*;
    use medtvt_proto::v1::Completion;

    pub const T0: Duration = Duration::from_secs(0);

    pub fn config(stage: &str, extra: &str) -> RunConfig {
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

    pub fn samples(n: usize) -> Vec<Bytes> {
        (0..n).map(|i| Bytes::from(format!("{{\"i\":{i}}}"))).collect()
    }

    pub fn group(
        worker: WorkerId,
        job: JobId,
        lease: LeaseId,
        key: PromptKey,
        version: u64,
        rewards: [f32; 2],
    ) -> RolloutGroup {
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

    pub fn grpo_state(n: usize) -> (RunState, Instant, WorkerId, JobId) {
        let mut st = RunState::new(StateOptions::default());
        st.enqueue(config("grpo", ""), samples(n)).unwrap();
        let now = Instant::now();
        let w = st.register(now, Role::RolloutWorker, "w".into(), 0, 0);
        (st, now, w, JobId(1))
    }

    pub fn keys(grant: &LeaseGrant) -> Vec<PromptKey> {
        grant.prompts.iter().map(|(k, _)| *k).collect()
    }

    pub trait TapGrpo {
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
}
