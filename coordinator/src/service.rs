//! The tonic implementation of `medtvt.v1.Coordinator`: thin. Each handler converts the request,
//! calls the state machine (`state/`) or the weight store (`weights.rs`) under its lock, and
//! converts back. Long-polls wait on a revision counter, bumped whenever a call changed the
//! state's `wake_key` (a summary of what any long-poll may wait for), so a waiting call wakes
//! when something it may need happened.

use crate::events::EventLog;
use crate::ids::{JobId, JobState, Role, WorkerId};
use crate::job_roots::JobRoots;
use crate::journal_writer::{CommitMode, JournalWriter};
use crate::state::{self, Assignment, BatchOutcome, GroupOutcome, GroupSeat, RunState, StateError};
use crate::store::RunStore;
use crate::weights::{VersionAssembler, WeightStore, WeightVersion, WeightsError};
use medtvt_config::Stage;
use medtvt_proto::errors::{reject, ErrorReason};
use medtvt_proto::v1 as pb;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::watch;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};

/// Timings and sizes of the service.
#[derive(Debug, Clone)]
pub struct ServiceOptions {
    /// Long-poll wait when the request asks for none.
    pub default_wait: Duration,
    /// The longest a long-poll (or a rendezvous) waits before answering.
    pub max_wait: Duration,
    /// Size of the chunks FetchWeights sends.
    pub weight_chunk_bytes: usize,
    /// What LeasePrompts suggests when it has nothing right now.
    pub lease_retry: Duration,
    /// Where the paths of a job submitted with SubmitJob may lie.
    pub job_roots: JobRoots,
    /// The gRPC message limit (the server's): a reply over it is refused with MESSAGE_TOO_LARGE.
    pub max_message_bytes: usize,
    /// How the durable run state is written (with a run directory).
    pub commit_mode: CommitMode,
}

impl Default for ServiceOptions {
    fn default() -> Self {
        ServiceOptions {
            default_wait: Duration::from_secs(20),
            max_wait: Duration::from_secs(300),
            weight_chunk_bytes: medtvt_proto::MAX_WEIGHT_CHUNK_BYTES,
            lease_retry: Duration::from_millis(200),
            job_roots: JobRoots::default(),
            max_message_bytes: medtvt_proto::DEFAULT_MAX_MESSAGE_BYTES,
            commit_mode: CommitMode::Writer,
        }
    }
}

/// Everything the handlers and the background tasks share.
pub struct Shared {
    state: Mutex<RunState>,
    weights: Mutex<WeightStore>,
    revision: watch::Sender<u64>,
    events: EventLog,
    /// With a run directory: the weights' files.
    store: Option<Arc<RunStore>>,
    /// With a run directory: the thread that commits each call's durable records (a call
    /// answers only once they are committed).
    writer: Option<JournalWriter>,
    /// Set when the process is stopping: long-polls answer at once.
    stopping: watch::Receiver<bool>,
    pub options: ServiceOptions,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock is a bug already reported; keep serving.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Shared {
    pub fn new(
        state: RunState,
        events: EventLog,
        store: Option<Arc<RunStore>>,
        stopping: watch::Receiver<bool>,
        options: ServiceOptions,
    ) -> std::io::Result<Self> {
        let writer = store.clone().map(|s| JournalWriter::start(s, options.commit_mode)).transpose()?;
        Ok(Shared {
            state: Mutex::new(state),
            weights: Mutex::new(WeightStore::default()),
            revision: watch::channel(0).0,
            events,
            store,
            writer,
            stopping,
            options,
        })
    }

    /// Runs `f` on the state; wakes long-polls if it changed anything; logs its events; and,
    /// with a run directory, returns only once what it changed (and every change before it) is
    /// committed: what a call answers survives a killed coordinator.
    pub async fn with_state<T>(&self, f: impl FnOnce(&mut RunState) -> T) -> T {
        let (out, ticket) = self.locked(None, f);
        self.durable(ticket).await;
        out
    }

    /// Like [`Shared::with_state`], for the background tasks that answer no one: the records
    /// are handed to the writer in order all the same, but nothing waits for their commit.
    pub fn with_state_unacknowledged<T>(&self, f: impl FnOnce(&mut RunState) -> T) -> T {
        self.locked(None, f).0
    }

    /// Runs `f` under the state lock and hands its durable records to the writer (in the order
    /// of the transitions, since this happens under the lock); returns the writer's number to
    /// wait for. With `seen`, marks the current revision as seen before `f` runs, under the
    /// lock, so that no change made after `f` can be missed.
    fn locked<T>(&self, seen: Option<&mut watch::Receiver<u64>>, f: impl FnOnce(&mut RunState) -> T) -> (T, u64) {
        let mut st = lock(&self.state);
        if let Some(rx) = seen {
            rx.borrow_and_update();
        }
        let before = st.wake_key();
        let out = f(&mut st);
        let after = st.wake_key();
        let events = st.drain_events();
        let journal = st.drain_journal();
        let ticket = self.writer.as_ref().map_or(0, |w| w.submit(journal));
        if after != before {
            self.revision.send_modify(|r| *r += 1);
        }
        drop(st);
        self.events.record(events);
        (out, ticket)
    }

    /// Waits until the writer committed everything up to `ticket` (at once without a run
    /// directory).
    async fn durable(&self, ticket: u64) {
        if let Some(writer) = &self.writer {
            writer.committed(ticket).await;
        }
    }

    pub fn weights(&self) -> MutexGuard<'_, WeightStore> {
        lock(&self.weights)
    }

    fn stopping(&self) -> bool {
        *self.stopping.borrow()
    }

    /// Retries `attempt` each time the state changes until it yields a value, `wait` passes or
    /// the process stops (then `None`).
    async fn long_poll<T>(
        &self,
        wait: Duration,
        mut attempt: impl FnMut(&mut RunState) -> Result<Option<T>, StateError>,
    ) -> Result<Option<T>, Status> {
        let deadline = tokio::time::Instant::now() + wait;
        let mut changes = self.revision.subscribe();
        let mut stopping = self.stopping.clone();
        loop {
            let (value, ticket) = self.locked(Some(&mut changes), &mut attempt);
            self.durable(ticket).await;
            if let Some(value) = value.map_err(to_status)? {
                return Ok(Some(value));
            }
            tokio::select! {
                changed = changes.changed() => if changed.is_err() { return Ok(None) },
                _ = tokio::time::sleep_until(deadline) => return Ok(None),
                _ = stopping.wait_for(|s| *s) => return Ok(None),
            }
        }
    }

    fn wait_for(&self, requested_ms: u64) -> Duration {
        match requested_ms {
            0 => self.options.default_wait,
            ms => Duration::from_millis(ms).min(self.options.max_wait),
        }
    }
}

/// The gRPC service.
#[derive(Clone)]
pub struct CoordinatorService {
    shared: Arc<Shared>,
}

impl CoordinatorService {
    pub fn new(shared: Arc<Shared>) -> Self {
        CoordinatorService { shared }
    }

    /// Makes a complete published version the one FetchWeights serves.
    async fn install_weights(
        &self,
        version: WeightVersion,
        tensors: u32,
        bytes: u64,
    ) -> Result<Response<pb::PublishWeightsResponse>, Status> {
        let (job, number) = (JobId(version.job_id), version.version);
        {
            let mut store = self.shared.weights();
            if !store.accepts(job, number) {
                return Err(reject(
                    ErrorReason::AlreadyPublished,
                    format!("job {job} already has weights of version {number} or newer"),
                ));
            }
            store.install(version);
        }
        self.shared.with_state(|st| st.weights_published(job, number)).await.map_err(to_status)?;
        let span = tracing::Span::current();
        span.record("tensors", tensors);
        span.record("bytes", bytes);
        Ok(Response::new(pb::PublishWeightsResponse { policy_version: number, tensors, bytes }))
    }
}

/// The running GRPO job's pipeline gauges, as the reaper records them on the OTel instruments.
fn pipeline_pb(st: &RunState) -> pb::PipelineGauges {
    let grpo = st
        .running_job()
        .filter(|id| st.snapshot(Some(*id)).ok().and_then(|jobs| jobs.first().map(|j| j.stage)) == Some(Stage::Grpo));
    let Some(job) = grpo else { return pb::PipelineGauges::default() };
    let g = st.pipeline_gauges();
    pb::PipelineGauges {
        job_id: job.0,
        prompts_waiting: g.prompts_waiting,
        leased_prompts: g.leased_prompts,
        queue_depth: g.queue_depth,
        policy_lag: g.policy_lag,
    }
}

/// A state-machine error as a gRPC status: its reason code in the details, the code that goes
/// with the reason, and the error's text for people.
pub fn to_status(err: StateError) -> Status {
    reject(err.reason(), err.to_string())
}

fn weights_status(err: WeightsError) -> Status {
    reject(ErrorReason::InvalidWeights, err.to_string())
}

pub fn job_state_pb(state: JobState) -> pb::JobState {
    match state {
        JobState::Queued => pb::JobState::Queued,
        JobState::Running => pb::JobState::Running,
        JobState::Succeeded => pb::JobState::Succeeded,
        JobState::Failed => pb::JobState::Failed,
        JobState::Cancelled => pb::JobState::Cancelled,
    }
}

pub fn stage_pb(stage: Stage) -> pb::Stage {
    match stage {
        Stage::Pt => pb::Stage::Pt,
        Stage::Sft => pb::Stage::Sft,
        Stage::Grpo => pb::Stage::Grpo,
    }
}

fn role_pb(role: Role) -> pb::Role {
    match role {
        Role::RolloutWorker => pb::Role::RolloutWorker,
        Role::Learner => pb::Role::Learner,
    }
}

fn unix_ms_after(delay: Duration) -> u64 {
    (SystemTime::now() + delay).duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

fn running_job_fields(st: &RunState) -> (u64, u64, pb::JobState) {
    match st.running_job() {
        Some(id) => {
            (id.0, st.policy_version(id).unwrap_or(0), st.job_state(id).map_or(pb::JobState::Unspecified, job_state_pb))
        }
        None => (0, 0, pb::JobState::Unspecified),
    }
}

#[tonic::async_trait]
impl pb::coordinator_server::Coordinator for CoordinatorService {
    #[tracing::instrument(skip_all, fields(role = request.get_ref().role, name = %request.get_ref().name, worker_id))]
    async fn register(&self, request: Request<pb::RegisterRequest>) -> Result<Response<pb::RegisterResponse>, Status> {
        let req = request.into_inner();
        let role = match pb::Role::try_from(req.role) {
            Ok(pb::Role::RolloutWorker) => Role::RolloutWorker,
            Ok(pb::Role::Learner) => Role::Learner,
            _ => return Err(reject(ErrorReason::InvalidRequest, "role must be ROLE_ROLLOUT_WORKER or ROLE_LEARNER")),
        };
        let (id, interval) = self
            .shared
            .with_state(|st| {
                let id = st.register(Instant::now(), role, req.name, req.rank, req.world_size);
                (id, st.heartbeat_interval())
            })
            .await;
        tracing::Span::current().record("worker_id", id.0);
        Ok(Response::new(pb::RegisterResponse { worker_id: id.0, heartbeat_interval_ms: interval.as_millis() as u64 }))
    }

    #[tracing::instrument(level = "debug", skip_all, fields(worker_id = request.get_ref().worker_id))]
    async fn heartbeat(
        &self,
        request: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        let req = request.into_inner();
        let worker = WorkerId(req.worker_id);
        let stopping = self.shared.stopping();
        self.shared
            .with_state(|st| {
                let now = Instant::now();
                st.touch(now, worker).map_err(to_status)?;
                st.record_progress(now, worker, req.step, &req.phase);
                let (job_id, policy_version, job_state) = running_job_fields(st);
                Ok(Response::new(pb::HeartbeatResponse {
                    job_id,
                    policy_version,
                    job_state: job_state as i32,
                    shutdown: stopping || st.finished(),
                    heartbeat_interval_ms: st.heartbeat_interval().as_millis() as u64,
                }))
            })
            .await
    }

    #[tracing::instrument(skip_all, fields(worker_id = request.get_ref().worker_id))]
    async fn deregister(
        &self,
        request: Request<pb::DeregisterRequest>,
    ) -> Result<Response<pb::DeregisterResponse>, Status> {
        let worker = WorkerId(request.into_inner().worker_id);
        let returned = self.shared.with_state(|st| st.deregister(worker)).await.map_err(to_status)?;
        Ok(Response::new(pb::DeregisterResponse { prompts_returned: returned as u32 }))
    }

    #[tracing::instrument(skip_all, fields(job_id))]
    async fn submit_job(
        &self,
        request: Request<pb::SubmitJobRequest>,
    ) -> Result<Response<pb::SubmitJobResponse>, Status> {
        let req = request.into_inner();
        let roots = self.shared.options.job_roots.clone();
        // Reading the dataset is file I/O: off the executor and outside the lock. The paths are
        // checked against the job roots before any of them is touched.
        let loaded = tokio::task::spawn_blocking(move || {
            let config = medtvt_config::parse_run_config_unvalidated(
                &req.config_toml,
                Path::new("submitted config"),
                &req.overrides,
            )
            .map_err(|e| to_status(StateError::InvalidJob(e.to_string())))?;
            roots.check(&config).map_err(|e| {
                tracing::warn!(error = %e, "refused a submitted job");
                reject(ErrorReason::PathNotAllowed, e.to_string())
            })?;
            state::load_job(&req.config_toml, &req.overrides).map_err(to_status)
        })
        .await
        .map_err(|e| reject(ErrorReason::Internal, format!("loading the job panicked: {e}")))?;
        let loaded = loaded?;
        let id = self.shared.with_state(|st| st.enqueue_loaded(loaded)).await.map_err(to_status)?;
        tracing::Span::current().record("job_id", id.0);
        Ok(Response::new(pb::SubmitJobResponse { job_id: id.0 }))
    }

    #[tracing::instrument(level = "debug", skip_all, fields(worker_id = request.get_ref().worker_id, after = request.get_ref().after_job_id))]
    async fn wait_for_job(
        &self,
        request: Request<pb::WaitForJobRequest>,
    ) -> Result<Response<pb::JobAssignment>, Status> {
        let req = request.into_inner();
        let worker = WorkerId(req.worker_id);
        self.shared.with_state(|st| st.touch(Instant::now(), worker).map(drop)).await.map_err(to_status)?;
        let wait = self.shared.wait_for(req.wait_ms);
        let found = self
            .shared
            .long_poll(wait, |st| {
                Ok(match st.assignment(JobId(req.after_job_id)) {
                    Assignment::Wait => None,
                    other => Some(other),
                })
            })
            .await?;
        let reply = match found {
            Some(Assignment::Job { job_id, name, stage, config_toml }) => pb::JobAssignment {
                job_id: job_id.0,
                config_toml,
                stage: stage_pb(stage) as i32,
                shutdown: false,
                name,
            },
            Some(Assignment::Shutdown) => pb::JobAssignment { shutdown: true, ..Default::default() },
            Some(Assignment::Wait) | None => {
                pb::JobAssignment { shutdown: self.shared.stopping(), ..Default::default() }
            }
        };
        Ok(Response::new(reply))
    }

    #[tracing::instrument(level = "debug", skip_all, fields(job_id = request.get_ref().job_id))]
    async fn get_status(&self, request: Request<pb::StatusRequest>) -> Result<Response<pb::RunStatus>, Status> {
        let only = match request.into_inner().job_id {
            0 => None,
            id => Some(JobId(id)),
        };
        let now = Instant::now();
        self.shared
            .with_state(|st| {
                let jobs = st.snapshot(only).map_err(to_status)?;
                let jobs = jobs
                    .into_iter()
                    .map(|j| pb::JobStatus {
                        job_id: j.job_id.0,
                        name: j.name,
                        stage: stage_pb(j.stage) as i32,
                        state: job_state_pb(j.state) as i32,
                        step: j.steps_completed,
                        total_steps: j.total_steps,
                        policy_version: j.policy_version,
                        prompts_leased: j.counters.prompts_leased,
                        groups_accepted: j.counters.groups_accepted,
                        groups_trained: j.counters.groups_trained,
                        groups_dropped_stale: j.counters.groups_dropped_stale,
                        duplicates_ignored: j.counters.duplicates_ignored,
                        tied_groups: j.counters.tied_groups,
                        queue_depth: j.queue_depth,
                        leased_prompts_outstanding: j.leased_prompts_outstanding,
                        latest_metrics: j.latest_metrics.into_iter().collect(),
                        message: j.message,
                        late_groups_ignored: j.counters.late_groups_ignored,
                        unknown_lease_groups: j.counters.unknown_lease_groups,
                        leases_expired: j.counters.leases_expired,
                        samples_skipped: j.counters.samples_skipped,
                        group_epoch: j.group_epoch,
                        learners: j.learners,
                        learners_lost: j.learners_lost,
                    })
                    .collect();
                let workers = st
                    .workers()
                    .map(|(id, w)| pb::WorkerInfo {
                        worker_id: id.0,
                        name: w.name.clone(),
                        role: role_pb(w.role) as i32,
                        rank: w.rank,
                        last_heartbeat_ms_ago: now.saturating_duration_since(w.last_seen).as_millis() as u64,
                        alive: w.alive,
                        step: w.step,
                        phase: w.phase.clone(),
                        phase_ms_ago: now.saturating_duration_since(w.phase_since).as_millis() as u64,
                    })
                    .collect();
                let pipeline = pipeline_pb(st);
                Ok(Response::new(pb::RunStatus {
                    jobs,
                    workers,
                    shutting_down: st.shutting_down(),
                    pipeline: Some(pipeline),
                }))
            })
            .await
    }

    #[tracing::instrument(skip_all, fields(job_id = request.get_ref().job_id))]
    async fn cancel_job(
        &self,
        request: Request<pb::CancelJobRequest>,
    ) -> Result<Response<pb::CancelJobResponse>, Status> {
        let id = JobId(request.into_inner().job_id);
        let state = self.shared.with_state(|st| st.cancel_job(id)).await.map_err(to_status)?;
        Ok(Response::new(pb::CancelJobResponse { state: job_state_pb(state) as i32 }))
    }

    #[tracing::instrument(skip_all, fields(drain = request.get_ref().drain))]
    async fn shutdown(&self, request: Request<pb::ShutdownRequest>) -> Result<Response<pb::ShutdownResponse>, Status> {
        let drain = request.into_inner().drain;
        self.shared.with_state(|st| st.shutdown(drain)).await;
        Ok(Response::new(pb::ShutdownResponse {}))
    }

    #[tracing::instrument(skip_all, fields(job_id = request.get_ref().job_id, worker_id = request.get_ref().worker_id, policy_version, leased))]
    async fn lease_prompts(&self, request: Request<pb::LeaseRequest>) -> Result<Response<pb::Lease>, Status> {
        let req = request.into_inner();
        let grant = self
            .shared
            .with_state(|st| st.lease(Instant::now(), WorkerId(req.worker_id), JobId(req.job_id), req.max_prompts))
            .await
            .map_err(to_status)?;
        let span = tracing::Span::current();
        span.record("policy_version", grant.policy_version);
        span.record("leased", grant.prompts.len());
        let retry = if grant.prompts.is_empty() && !grant.job_done() {
            self.shared.options.lease_retry
        } else {
            Duration::ZERO
        };
        Ok(Response::new(pb::Lease {
            lease_id: grant.lease_id.map_or(0, |l| l.0),
            job_id: grant.job_id.0,
            policy_version: grant.policy_version,
            group_size: grant.group_size,
            deadline_unix_ms: if grant.prompts.is_empty() { 0 } else { unix_ms_after(grant.timeout) },
            job_done: grant.job_done(),
            job_state: job_state_pb(grant.job_state) as i32,
            retry_after_ms: retry.as_millis() as u64,
            prompts: grant
                .prompts
                .into_iter()
                .map(|(key, sample_json)| pb::Prompt { prompt_id: key.prompt_id, epoch: key.epoch, sample_json })
                .collect(),
        }))
    }

    #[tracing::instrument(skip_all, fields(job_id, worker_id, accepted, duplicates, stale, unknown_lease))]
    async fn submit_groups(
        &self,
        request: Request<Streaming<pb::RolloutGroup>>,
    ) -> Result<Response<pb::SubmitGroupsResponse>, Status> {
        let mut stream = request.into_inner();
        let mut reply = pb::SubmitGroupsResponse::default();
        let span = tracing::Span::current();
        while let Some(group) = stream.next().await {
            let group = group?;
            span.record("job_id", group.job_id);
            span.record("worker_id", group.worker_id);
            let outcome =
                self.shared.with_state(|st| st.submit_group(Instant::now(), group)).await.map_err(to_status)?;
            match outcome {
                GroupOutcome::Accepted => reply.accepted += 1,
                GroupOutcome::Duplicate => reply.duplicates += 1,
                GroupOutcome::Stale => reply.stale += 1,
                GroupOutcome::UnknownLease => reply.unknown_lease += 1,
            }
        }
        span.record("accepted", reply.accepted);
        span.record("duplicates", reply.duplicates);
        span.record("stale", reply.stale);
        span.record("unknown_lease", reply.unknown_lease);
        Ok(Response::new(reply))
    }

    #[tracing::instrument(skip_all, fields(job_id = request.get_ref().job_id, rank = request.get_ref().rank, step = request.get_ref().step, policy_version))]
    async fn pull_training_batch(
        &self,
        request: Request<pb::PullBatchRequest>,
    ) -> Result<Response<pb::TrainingBatch>, Status> {
        let req = request.into_inner();
        let job = JobId(req.job_id);
        let wait = self.shared.wait_for(req.wait_ms);
        let found = self
            .shared
            .long_poll(wait, |st| {
                st.check_group(job, req.group_epoch)?;
                let outcome = st.pull_batch(job, req.rank, req.world_size, req.step)?;
                Ok(match outcome {
                    BatchOutcome::Pending => None,
                    BatchOutcome::Groups { groups, policy_version } => {
                        // Under the lock only reference counts move: each group (shared) and its
                        // prompt's sample line (shared bytes); the copies are made after it.
                        let shared = groups
                            .into_iter()
                            .map(|g| {
                                let sample = st.sample(job, g.prompt_id).unwrap_or_default();
                                (g, sample)
                            })
                            .collect::<Vec<_>>();
                        Some((BatchOutcome::Groups { groups: Vec::new(), policy_version }, shared))
                    }
                    other => Some((other, Vec::new())),
                })
            })
            .await?;
        // Attach each group's prompt for the learner.
        let found = found.map(|(outcome, shared)| {
            let groups = shared
                .into_iter()
                .map(|(g, sample_json)| {
                    let mut g = pb::RolloutGroup::clone(&g);
                    g.prompt = Some(pb::Prompt { prompt_id: g.prompt_id, epoch: g.epoch, sample_json });
                    g
                })
                .collect::<Vec<_>>();
            (outcome, groups)
        });
        let mut batch = pb::TrainingBatch { job_id: job.0, step: req.step, ..Default::default() };
        match found {
            None => {
                batch.pending = true;
                batch.job_state = pb::JobState::Running as i32;
            }
            Some((BatchOutcome::Done(state), _)) => {
                batch.done = true;
                batch.job_state = job_state_pb(state) as i32;
            }
            Some((BatchOutcome::Samples { samples, policy_version }, _)) => {
                batch.samples = samples;
                batch.policy_version = policy_version;
                batch.job_state = pb::JobState::Running as i32;
            }
            Some((BatchOutcome::Groups { policy_version, .. }, groups)) => {
                batch.groups = groups;
                batch.policy_version = policy_version;
                batch.job_state = pb::JobState::Running as i32;
            }
            Some((BatchOutcome::Pending, _)) => batch.pending = true,
        }
        tracing::Span::current().record("policy_version", batch.policy_version);
        let (size, limit) = (prost::Message::encoded_len(&batch), self.shared.options.max_message_bytes);
        if size > limit {
            return Err(reject(
                ErrorReason::MessageTooLarge,
                format!(
                    "the training batch of job {} step {} is {size} bytes, over the gRPC message limit of {limit} \
                     bytes: raise {} on the coordinator and every learner, or make the batch smaller \
                     (grpo.prompts_per_step, grpo.group_size, grpo.max_new_tokens, train.batch_size)",
                    job.0,
                    req.step,
                    medtvt_proto::MAX_MESSAGE_FLAG
                ),
            ));
        }
        Ok(Response::new(batch))
    }

    #[tracing::instrument(skip_all, fields(job_id = request.get_ref().job_id, rank = request.get_ref().rank, step = request.get_ref().step, policy_version = request.get_ref().policy_version_after))]
    async fn report_step(&self, request: Request<pb::StepReport>) -> Result<Response<pb::StepReportResponse>, Status> {
        let req = request.into_inner();
        let job = JobId(req.job_id);
        let metrics: BTreeMap<String, f64> = req.metrics.into_iter().collect();
        let (completed, state) = self
            .shared
            .with_state(|st| {
                st.check_group(job, req.group_epoch)?;
                let completed = st.report_step(job, req.rank, req.step, metrics, req.policy_version_after)?;
                Ok((completed, st.job_state(job)?))
            })
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::StepReportResponse { steps_completed: completed, job_state: job_state_pb(state) as i32 }))
    }

    #[tracing::instrument(skip_all, fields(job_id = request.get_ref().job_id, rank = request.get_ref().rank))]
    async fn finish_job(
        &self,
        request: Request<pb::FinishJobRequest>,
    ) -> Result<Response<pb::FinishJobResponse>, Status> {
        let req = request.into_inner();
        let state = self
            .shared
            .with_state(|st| {
                st.check_group(JobId(req.job_id), req.group_epoch)?;
                st.finish_job(JobId(req.job_id), req.rank, req.checkpoint_dir, req.failure)
            })
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::FinishJobResponse { state: job_state_pb(state) as i32 }))
    }

    #[tracing::instrument(skip_all, fields(job_id, policy_version, tensors, bytes))]
    async fn publish_weights(
        &self,
        request: Request<Streaming<pb::WeightChunk>>,
    ) -> Result<Response<pb::PublishWeightsResponse>, Status> {
        let mut stream = request.into_inner();
        let mut assembler = VersionAssembler::default();
        let mut complete = None;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk?;
            let first = assembler.target().is_none();
            if let Some(version) = assembler.push(chunk).map_err(weights_status)? {
                complete = Some(version);
            }
            if first {
                let Some((job, version)) = assembler.target() else { continue };
                let job = JobId(job);
                let span = tracing::Span::current();
                span.record("job_id", job.0);
                span.record("policy_version", version);
                let state = self.shared.with_state(|st| st.job_state(job)).await.map_err(to_status)?;
                if state != JobState::Running {
                    return Err(to_status(StateError::JobNotRunning { job, state }));
                }
                if !self.shared.weights().accepts(job, version) {
                    return Err(reject(
                        ErrorReason::AlreadyPublished,
                        format!("job {job} already has weights of version {version} or newer"),
                    ));
                }
            }
        }
        assembler.finish().map_err(weights_status)?;
        let version = complete.ok_or_else(|| weights_status(WeightsError::Incomplete))?;
        let (job, number, tensors, bytes) =
            (JobId(version.job_id), version.version, version.tensors.len() as u32, version.total_bytes());
        if let Some(store) = self.shared.store.clone() {
            // Large, blocking writes: off the executor, and done before the version is served,
            // so a version a worker fetched is one a resumed coordinator still has.
            let version = Arc::new(version);
            let saving = version.clone();
            tokio::task::spawn_blocking(move || store.save_weights(&saving))
                .await
                .map_err(|e| reject(ErrorReason::Internal, format!("saving weights panicked: {e}")))?
                .map_err(|e| {
                    reject(ErrorReason::Internal, format!("cannot save weights of job {job} version {number}: {e}"))
                })?;
            return self.install_weights(Arc::unwrap_or_clone(version), tensors, bytes).await;
        }
        self.install_weights(version, tensors, bytes).await
    }

    type FetchWeightsStream = tokio_stream::Iter<std::vec::IntoIter<Result<pb::WeightChunk, Status>>>;

    #[tracing::instrument(skip_all, fields(job_id = request.get_ref().job_id, worker_id = request.get_ref().worker_id, have = request.get_ref().have_version, policy_version))]
    async fn fetch_weights(
        &self,
        request: Request<pb::FetchWeightsRequest>,
    ) -> Result<Response<Self::FetchWeightsStream>, Status> {
        let req = request.into_inner();
        let job = JobId(req.job_id);
        self.shared
            .with_state(|st| {
                if req.worker_id != 0 {
                    st.touch(Instant::now(), WorkerId(req.worker_id))?;
                }
                st.job_state(job)
            })
            .await
            .map_err(to_status)?;
        let latest = self.shared.weights().newer_than(job, req.have_version);
        let chunks = match latest {
            Some(version) => {
                tracing::Span::current().record("policy_version", version.version);
                version.chunks(self.shared.options.weight_chunk_bytes)
            }
            None => Vec::new(),
        };
        Ok(Response::new(tokio_stream::iter(chunks.into_iter().map(Ok).collect::<Vec<_>>())))
    }

    #[tracing::instrument(skip_all, fields(job_id = request.get_ref().job_id, slot = request.get_ref().slot, after_epoch = request.get_ref().after_epoch))]
    async fn join_learner_group(
        &self,
        request: Request<pb::JoinGroupRequest>,
    ) -> Result<Response<pb::LearnerGroupSeat>, Status> {
        self.join_group(request.into_inner()).await.map(Response::new)
    }

    #[tracing::instrument(skip_all, fields(job_id = request.get_ref().job_id, key = %request.get_ref().key, rank = request.get_ref().rank))]
    async fn rendezvous(
        &self,
        request: Request<pb::RendezvousRequest>,
    ) -> Result<Response<pb::RendezvousResponse>, Status> {
        let req = request.into_inner();
        let job = JobId(req.job_id);
        let wait = self.shared.options.max_wait;
        let payloads = self
            .shared
            .long_poll(wait, |st| {
                let all = st.rendezvous(job, &req.key, req.rank, req.world_size, req.payload.clone())?;
                Ok(all.map(|all| all.into_iter().collect::<Vec<_>>()))
            })
            .await?;
        match payloads {
            Some(payloads) => Ok(Response::new(pb::RendezvousResponse { payloads })),
            None => Err(reject(
                ErrorReason::RendezvousTimeout,
                format!("rendezvous `{}` of job {job}: not every one of {} ranks arrived", req.key, req.world_size),
            )),
        }
    }
}

impl CoordinatorService {
    /// JoinLearnerGroup's long-poll (see the proto).
    pub(crate) async fn join_group(&self, req: pb::JoinGroupRequest) -> Result<pb::LearnerGroupSeat, Status> {
        let job = JobId(req.job_id);
        let worker = WorkerId(req.worker_id);
        let wait = self.shared.wait_for(req.wait_ms);
        let seat = self
            .shared
            .long_poll(wait, |st| {
                let now = Instant::now();
                st.touch(now, worker)?;
                match st.join_group(now, job, worker, req.slot, req.step, req.after_epoch)? {
                    GroupSeat::Pending => Ok(None),
                    seat => Ok(Some(seat)),
                }
            })
            .await?;
        let mut answer = pb::LearnerGroupSeat::default();
        match seat {
            None | Some(GroupSeat::Pending) => answer.pending = true,
            Some(GroupSeat::Done(state)) => {
                answer.done = true;
                answer.job_state = job_state_pb(state) as i32;
            }
            Some(GroupSeat::Seat { epoch, rank, world_size, resume_step }) => {
                answer.job_state = pb::JobState::Running as i32;
                (answer.epoch, answer.rank, answer.world_size, answer.resume_step) =
                    (epoch, rank, world_size, resume_step);
            }
        }
        Ok(answer)
    }
}

#[cfg(test)]
mod status_tests {
    use super::*;
    use medtvt_proto::errors::reason_of;
    use tonic::Code;

    #[test]
    fn state_errors_keep_their_grpc_codes_and_carry_their_reason() {
        let cases = [
            (StateError::UnknownWorker(WorkerId(3)), Code::NotFound, ErrorReason::UnknownWorker),
            (StateError::UnknownJob(JobId(3)), Code::NotFound, ErrorReason::UnknownJob),
            (StateError::InvalidJob("x".into()), Code::InvalidArgument, ErrorReason::InvalidJob),
            (StateError::InvalidGroup("x".into()), Code::InvalidArgument, ErrorReason::InvalidGroup),
            (StateError::BadRank("x".into()), Code::InvalidArgument, ErrorReason::BadRank),
            (StateError::StepOutOfRange("x".into()), Code::InvalidArgument, ErrorReason::StepOutOfRange),
            (StateError::StepNotReady("x".into()), Code::FailedPrecondition, ErrorReason::StepNotReady),
            (StateError::StepPruned("x".into()), Code::FailedPrecondition, ErrorReason::StepPruned),
            (StateError::ForeignCheckpoint("x".into()), Code::FailedPrecondition, ErrorReason::ForeignCheckpoint),
            (StateError::LastStepNotReported("x".into()), Code::FailedPrecondition, ErrorReason::LastStepNotReported),
            (StateError::StaleGroup("x".into()), Code::FailedPrecondition, ErrorReason::StaleGroup),
            (StateError::ShuttingDown, Code::Unavailable, ErrorReason::ShuttingDown),
        ];
        for (err, code, reason) in cases {
            let text = err.to_string();
            let status = to_status(err);
            assert_eq!((status.code(), reason_of(&status)), (code, Some(reason)), "{text}");
            assert_eq!(status.message(), text);
        }
    }
}
