//! One job on one learner rank, start to finish, on a blocking thread: parse the job's config,
//! agree on the tokenizer (rank 0 trains it for a from-scratch model), build the policy with the
//! same seed on every rank, set up the collective through Rendezvous, resume from the newest valid
//! checkpoint, then for each step pull this rank's shard, train, and report; rank 0 also publishes
//! the new weights (GRPO), appends metrics.jsonl, writes checkpoints, saves `final/` and finishes
//! the job.
//!
//! With `cluster.on_learner_loss` = `shrink` or `wait`, the learners form a group that re-forms
//! when a rank is lost ([`crate::group`]): a step whose collective fails is not applied, the
//! learner takes a seat in the new group and redoes the step with its new rank and world size;
//! rank 0's duties go with the rank of the current group.
//!
//! Tracing: each step runs in a `train_step` span (its RPCs are children at the coordinator), and
//! each GRPO group in a `train_group` span parented to the worker span that sampled it, carried
//! in the group's `traceparent` (see [`medtvt_telemetry::propagation`]).

use crate::checkpoint;
use crate::collective::{CollectiveError, Disconnected, GradientCollective, SingleRank, TcpCollective};
use crate::group::{self, Seat};
use crate::metrics_log::{self, MetricsRecord};
use crate::nccl_collective::NcclCollective;
use crate::trainer::{StepData, Trainer, TrainerOptions};
use medtvt_config::{LearnerLossPolicy, RunConfig, Stage};
use medtvt_data::Split;
use medtvt_model::policy::Policy;
use medtvt_proto::v1::{
    FinishJobRequest, JobAssignment, PullBatchRequest, RendezvousRequest, RolloutGroup, StepReport, TrainingBatch,
};
use medtvt_role::device::{job_device, ConfigDeviceError};
use medtvt_role::inputs::InputLoader;
use medtvt_role::rpc::{CoordinatorLink, RpcError};
use medtvt_role::weights::weight_chunks;
use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tch::Device;

/// How long the ranks of a group that never re-forms (`on_learner_loss = "fail"`) may take to
/// connect: they may start minutes apart.
const FIRST_CONNECT_WINDOW: Duration = Duration::from_secs(120);

#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error("job {job_id}: config: {source}")]
    Config { job_id: u64, source: medtvt_config::ConfigError },
    #[error(transparent)]
    Rpc(#[from] RpcError),
    #[error(transparent)]
    Train(#[from] crate::trainer::TrainError),
    #[error(transparent)]
    Policy(#[from] medtvt_model::policy::PolicyError),
    #[error(transparent)]
    Batch(#[from] crate::batch::BatchError),
    #[error(transparent)]
    Data(#[from] medtvt_data::DataError),
    #[error(transparent)]
    Collective(#[from] CollectiveError),
    #[error(transparent)]
    Metrics(#[from] metrics_log::MetricsLogError),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("collective set-up: {0}")]
    Rendezvous(String),
    #[error("job {job_id}: {source}")]
    Device { job_id: u64, source: ConfigDeviceError },
}

/// Who this learner is within its job.
#[derive(Debug, Clone)]
pub struct LearnerIdentity {
    pub rank: usize,
    pub world_size: usize,
    /// The `--device` flag's device; `None` lets each job's `model.device` decide
    /// ([`medtvt_role::device::job_device`]).
    pub device: Option<Device>,
    /// Where rank 0's TCP collective listens (port 0 = any free port).
    pub collective_bind: SocketAddr,
    /// The host other ranks dial for rank 0 (default: the bind address's IP).
    pub collective_host: Option<String>,
}

/// How a job ended on this rank.
#[derive(Debug, Clone, PartialEq)]
pub enum JobEnd {
    /// Every step trained; rank 0 wrote `final` there.
    Completed { steps: u64, final_dir: PathBuf },
    /// The coordinator said done before the last step (cancelled or failed elsewhere).
    Stopped { at_step: u64 },
}

/// The directory rank 0 saves the final model to.
pub fn final_dir(cfg: &RunConfig) -> PathBuf {
    cfg.run.out_dir.join("final")
}

/// Where each rank writes its final weights digest (for checking that ranks agree).
pub fn rank_report_path(cfg: &RunConfig, rank: usize) -> PathBuf {
    cfg.run.out_dir.join("ranks").join(format!("rank-{rank}.json"))
}

/// Runs the job; on failure rank 0 also fails the job at the coordinator.
pub fn run_job<P: Policy>(
    link: &CoordinatorLink,
    me: &LearnerIdentity,
    job: &JobAssignment,
) -> Result<JobEnd, JobError> {
    let mut seat = Seat::ungrouped(me);
    let result = run_job_inner::<P>(link, me, job, &mut seat);
    if let Err(err) = &result {
        if seat.rank == 0 && !link.stop_flag().is_stopped() {
            let request = FinishJobRequest {
                job_id: job.job_id,
                rank: 0,
                checkpoint_dir: String::new(),
                failure: err.to_string(),
                group_epoch: seat.epoch,
            };
            if let Err(report) = link.call("FinishJob", |mut c| {
                let request = request.clone();
                async move { c.finish_job(request).await }
            }) {
                tracing::warn!(error = %report, "could not report the job failure to the coordinator");
            }
        }
    }
    result
}

/// What the step loop of one job needs besides the trainer.
struct JobContext<'a> {
    link: &'a CoordinatorLink,
    me: &'a LearnerIdentity,
    job_id: u64,
    cfg: &'a RunConfig,
    loader: InputLoader,
    checkpoints: PathBuf,
    /// The learners form groups that re-form when a rank is lost (`on_learner_loss` != fail).
    grouped: bool,
}

/// `seat` is where this learner sits now (updated when its group re-forms).
fn run_job_inner<P: Policy>(
    link: &CoordinatorLink,
    me: &LearnerIdentity,
    job: &JobAssignment,
    seat: &mut Seat,
) -> Result<JobEnd, JobError> {
    let origin = PathBuf::from(format!("<job {} config>", job.job_id));
    let cfg = medtvt_config::parse_run_config(&job.config_toml, &origin, &[])
        .map_err(|source| JobError::Config { job_id: job.job_id, source })?;
    let device =
        job_device(me.device, cfg.model.device).map_err(|source| JobError::Device { job_id: job.job_id, source })?;
    let rendezvous = Rendezvous { link, job_id: job.job_id, rank: me.rank, world_size: me.world_size };
    let checkpoints = cfg.run.out_dir.join("checkpoints");
    let resume = checkpoint::latest_valid(&checkpoints);
    for skipped in &resume.1 {
        tracing::warn!(error = %skipped, "skipping an unusable checkpoint");
    }
    let resume = resume.0;
    // A resumed attempt uses fresh rendezvous keys (completed keys are frozen).
    let attempt = resume.as_ref().map_or(0, |c| c.state.step);

    let from_scratch = cfg.model.checkpoint.is_none();
    let tokenizer = if from_scratch { Some(shared_tokenizer::<P>(&cfg, &rendezvous, attempt)?) } else { None };
    tch::manual_seed(cfg.run.seed as i64);
    let mut policy = P::load(&cfg, device, tokenizer.as_deref())?;
    let trainable = policy.set_trainable(cfg.run.stage, cfg.model.train_all);
    tracing::info!(job = job.job_id, rank = me.rank, ?device, trainable = trainable.trainable, frozen = trainable.frozen, groups = ?trainable.groups, "policy built");
    let reference = match &cfg.grpo {
        Some(g) if g.beta > 0.0 => {
            let mut reference = P::load(&cfg, device, tokenizer.as_deref())?;
            // Same stage wiring as the policy; its gradients are never taken (scored under no_grad).
            reference.set_trainable(cfg.run.stage, cfg.model.train_all);
            Some(reference)
        }
        _ => None,
    };
    let grouped = cfg.cluster.on_learner_loss != LearnerLossPolicy::Fail;
    let timeout = Duration::from_secs_f64(cfg.cluster.collective_timeout_s);
    let options = TrainerOptions::from_config(&cfg);
    let mut trainer = if grouped {
        Trainer::new(policy, reference, Box::new(Disconnected), options)
    } else {
        let collective = connect_collective(
            me,
            *seat,
            device,
            link,
            job.job_id,
            &attempt.to_string(),
            FIRST_CONNECT_WINDOW,
            timeout,
        )?;
        let mut trainer = Trainer::new(policy, reference, collective, options);
        if from_scratch {
            trainer.broadcast_weights()?;
        }
        trainer
    };
    if let Some(ckpt) = &resume {
        trainer.restore(ckpt)?;
        tracing::info!(path = %ckpt.path.display(), step = ckpt.state.step, "resumed from checkpoint");
    }
    if grouped {
        // The first group waits for every rank; its rank 0 holds the most steps (a newer checkpoint).
        match group::regroup(link, me, job.job_id, device, &mut trainer, 0, timeout)? {
            Some(first) => *seat = first,
            None => return Ok(JobEnd::Stopped { at_step: trainer.step_index() }),
        }
    }
    let loader = InputLoader::from_config(&cfg, trainer.policy().image_size())?;
    let ctx = JobContext { link, me, job_id: job.job_id, cfg: &cfg, loader, checkpoints, grouped };
    loop {
        let attempt = match run_steps(&ctx, *seat, &mut trainer) {
            Ok(true) => finish(&ctx, *seat, &trainer),
            Ok(false) => return Ok(JobEnd::Stopped { at_step: trainer.step_index() }),
            Err(err) => Err(err),
        };
        match attempt {
            Err(err) if grouped && group::is_group_fault(&err) => {
                tracing::warn!(error = %err, epoch = seat.epoch, step = trainer.step_index(), "the learner group broke");
                let Some(next) = group::regroup(link, me, job.job_id, device, &mut trainer, seat.epoch, timeout)?
                else {
                    return Ok(JobEnd::Stopped { at_step: trainer.step_index() });
                };
                *seat = next;
                let version = trainer.step_index();
                if seat.rank == 0 && cfg.run.stage == Stage::Grpo && version > 0 {
                    // The old rank 0 may have been lost before publishing the version the group holds.
                    publish_weights(link, job.job_id, version, &trainer.policy().trainable_tensors())?;
                }
            }
            other => return other,
        }
    }
}

/// Trains steps until the last one: true when every step is done, false when the coordinator
/// said the job is over.
fn run_steps<P: Policy>(ctx: &JobContext<'_>, seat: Seat, trainer: &mut Trainer<P>) -> Result<bool, JobError> {
    let (link, cfg) = (ctx.link, ctx.cfg);
    let stage_name = stage_name(cfg.run.stage);
    // OTLP instruments when telemetry exports (a no-op handle otherwise).
    let run_metrics = medtvt_telemetry::metrics::RunMetrics::global();
    while trainer.step_index() < cfg.train.steps {
        let step = trainer.step_index();
        // Entered for the whole step, so the coordinator's spans of its calls are children.
        let step_span =
            tracing::info_span!("train_step", job_id = ctx.job_id, step, rank = seat.rank, stage = stage_name);
        let _entered = step_span.enter();
        link.set_progress(step, "pull");
        let Some(batch) = pull_batch(link, ctx.job_id, seat, step)? else {
            return Ok(false);
        };
        // Ended when the step is reported (dropped at the end of this iteration).
        let _group_spans = group_spans(&batch.groups, &step_span);
        let data = step_data(&ctx.loader, batch)?;
        link.set_progress(step, "train");
        let outcome = trainer.step(&data)?;
        let version_after = step + 1;
        if seat.rank == 0 {
            link.set_progress(version_after, "publish");
            if cfg.run.stage == Stage::Grpo {
                publish_weights(link, ctx.job_id, version_after, &trainer.policy().trainable_tensors())?;
            }
            run_metrics.record_step(&outcome.metrics, &[]);
            metrics_log::append(
                &cfg.run.out_dir.join("metrics.jsonl"),
                &MetricsRecord { stage: stage_name.into(), step, values: outcome.metrics.clone() },
            )?;
            let every = cfg.train.checkpoint_every;
            if every > 0 && version_after.is_multiple_of(every) && version_after < cfg.train.steps {
                trainer.save_checkpoint(&ctx.checkpoints)?;
            }
        }
        if version_after == cfg.train.steps {
            // Before the last report: the job can succeed as soon as every rank reported it.
            write_rank_report(cfg, ctx.me, trainer)?;
        }
        link.set_progress(version_after, "report");
        let report = StepReport {
            job_id: ctx.job_id,
            rank: seat.rank as u32,
            step,
            metrics: outcome.metrics.into_iter().collect::<HashMap<_, _>>(),
            policy_version_after: version_after,
            group_epoch: seat.epoch,
        };
        link.call("ReportStep", |mut c| {
            let report = report.clone();
            async move { c.report_step(report).await }
        })?;
    }
    Ok(true)
}

/// The end of a completed job: every rank records its weights digest (named by its `--rank`);
/// rank 0 writes the last checkpoint and `final/`, then finishes the job. In a group that can
/// re-form, rank 0 stays until the job succeeded: a rank lost before it reported the last step
/// re-forms the group (STALE_GROUP), and the new group holds every step.
fn finish<P: Policy>(ctx: &JobContext<'_>, seat: Seat, trainer: &Trainer<P>) -> Result<JobEnd, JobError> {
    let (link, cfg, me) = (ctx.link, ctx.cfg, ctx.me);
    link.set_progress(trainer.step_index(), "finish");
    write_rank_report(cfg, me, trainer)?;
    let final_dir = final_dir(cfg);
    if seat.rank == 0 {
        trainer.save_checkpoint(&ctx.checkpoints)?;
        trainer.policy().save(&final_dir)?;
        let request = FinishJobRequest {
            job_id: ctx.job_id,
            rank: 0,
            checkpoint_dir: final_dir.display().to_string(),
            failure: String::new(),
            group_epoch: seat.epoch,
        };
        loop {
            let answer = link.call("FinishJob", |mut c| {
                let request = request.clone();
                async move { c.finish_job(request).await }
            })?;
            if !ctx.grouped || answer.state != medtvt_proto::v1::JobState::Running as i32 {
                break;
            }
            if !link.pause(Duration::from_millis(200)) {
                break;
            }
        }
    }
    Ok(JobEnd::Completed { steps: trainer.step_index(), final_dir })
}

/// This rank's weights digest, named by its `--rank` (tests compare the ranks' files).
fn write_rank_report<P: Policy>(cfg: &RunConfig, me: &LearnerIdentity, trainer: &Trainer<P>) -> Result<(), JobError> {
    let report = serde_json::json!({ "rank": me.rank, "step": trainer.step_index(), "weights_sha256": trainer.weights_digest() });
    write_file(&rank_report_path(cfg, me.rank), report.to_string().as_bytes())
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<(), JobError> {
    let io = |source| JobError::Io { path: path.to_path_buf(), source };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    std::fs::write(path, bytes).map_err(io)
}

fn stage_name(stage: Stage) -> &'static str {
    match stage {
        Stage::Pt => "pt",
        Stage::Sft => "sft",
        Stage::Grpo => "grpo",
    }
}

/// One span per rollout group of a GRPO step, lasting until the step is reported: each is a child
/// of the worker span that sampled the group (its `traceparent`), so that sampling, submission and
/// training read as one trace, and each is linked with `step` (a trace of its own) both ways.
fn group_spans(groups: &[RolloutGroup], step: &tracing::Span) -> Vec<tracing::Span> {
    use medtvt_telemetry::propagation::{add_link_to_span, add_link_to_traceparent, set_parent_from_traceparent};
    groups
        .iter()
        .filter(|g| !g.traceparent.is_empty())
        .map(|g| {
            let span = tracing::info_span!(parent: None, "train_group", job_id = g.job_id, prompt_id = g.prompt_id, epoch = g.epoch, sampled_at = g.policy_version);
            set_parent_from_traceparent(&span, &g.traceparent);
            add_link_to_span(&span, step);
            add_link_to_traceparent(step, &g.traceparent);
            span
        })
        .collect()
}

/// This rank's shard of `step`, waiting while it is pending; `None` when the job is done.
fn pull_batch(link: &CoordinatorLink, job_id: u64, seat: Seat, step: u64) -> Result<Option<TrainingBatch>, JobError> {
    let request = PullBatchRequest {
        job_id,
        rank: seat.rank as u32,
        world_size: seat.world_size as u32,
        step,
        wait_ms: 5_000,
        group_epoch: seat.epoch,
    };
    loop {
        let batch = link.call("PullTrainingBatch", |mut c| async move { c.pull_training_batch(request).await })?;
        if batch.done {
            return Ok(None);
        }
        if !batch.pending {
            return Ok(Some(batch));
        }
        if link.stop_flag().is_stopped() {
            return Err(RpcError::ShuttingDown { call: "PullTrainingBatch" }.into());
        }
    }
}

fn step_data(loader: &InputLoader, batch: TrainingBatch) -> Result<StepData, JobError> {
    if batch.groups.is_empty() && !batch.samples.is_empty() {
        let samples = crate::batch::parse_samples(&batch.samples)?;
        let answers = samples.iter().map(|s| s.answer.clone()).collect();
        return Ok(StepData::Supervised { prompts: loader.prompts(&samples)?, answers });
    }
    if batch.groups.is_empty() {
        // An empty shard (more ranks than items): the rank still joins the all-reduce.
        return Ok(StepData::Supervised { prompts: Vec::new(), answers: Vec::new() });
    }
    let samples: Vec<_> = batch
        .groups
        .iter()
        .map(|g| {
            let raw = g.prompt.as_ref().map(|p| p.sample_json.clone()).unwrap_or_default();
            crate::batch::parse_samples(std::slice::from_ref(&raw)).map(|mut v| v.remove(0))
        })
        .collect::<Result<_, _>>()?;
    Ok(StepData::Grpo { prompts: loader.prompts(&samples)?, groups: batch.groups })
}

/// Streams one policy version (the trainable tensors) to the coordinator. A learner resumed
/// from a checkpoint re-trains steps whose versions the coordinator already holds: that refusal
/// is expected and not an error.
fn publish_weights(
    link: &CoordinatorLink,
    job_id: u64,
    version: u64,
    tensors: &[(String, tch::Tensor)],
) -> Result<(), JobError> {
    let chunks = weight_chunks(job_id, version, tensors);
    let published = link.call("PublishWeights", |mut c| {
        let chunks = chunks.clone();
        async move { c.publish_weights(tokio_stream::iter(chunks)).await }
    });
    match published {
        Ok(_) => Ok(()),
        Err(RpcError::Status { status, .. }) if medtvt_proto::client::is_already_published(&status) => {
            tracing::info!(version, "the coordinator already holds this policy version (re-trained after a resume)");
            Ok(())
        }
        Err(err) => Err(err.into()),
    }
}

/// The job's learner ranks meeting at the coordinator.
struct Rendezvous<'a> {
    link: &'a CoordinatorLink,
    job_id: u64,
    rank: usize,
    world_size: usize,
}

impl Rendezvous<'_> {
    /// All ranks' payloads for `key`, by rank; returns once every rank arrived.
    fn all_gather(&self, key: &str, payload: Vec<u8>) -> Result<Vec<Vec<u8>>, JobError> {
        let request = RendezvousRequest {
            job_id: self.job_id,
            key: key.to_string(),
            rank: self.rank as u32,
            world_size: self.world_size as u32,
            payload: payload.into(),
        };
        let response = self.link.call("Rendezvous", |mut c| {
            let request = request.clone();
            async move { c.rendezvous(request).await }
        })?;
        if response.payloads.len() != self.world_size {
            return Err(JobError::Rendezvous(format!(
                "key {key}: {} payloads for world size {}",
                response.payloads.len(),
                self.world_size
            )));
        }
        Ok(response.payloads.into_iter().map(|p| p.to_vec()).collect())
    }
}

/// The from-scratch tokenizer: rank 0 trains it on the train split's questions and answers and
/// saves it to `run.out_dir/tokenizer.json` (kept across restarts); the other ranks wait for it.
fn shared_tokenizer<P: Policy>(
    cfg: &RunConfig,
    rendezvous: &Rendezvous<'_>,
    attempt: u64,
) -> Result<PathBuf, JobError> {
    let path = cfg.run.out_dir.join("tokenizer.json");
    if rendezvous.rank == 0 && !path.exists() {
        let samples = medtvt_data::read_jsonl(&cfg.data.dir.join("qa.jsonl"))?;
        let texts: Vec<String> =
            samples.into_iter().filter(|s| s.split == Split::Train).flat_map(|s| [s.question, s.answer]).collect();
        std::fs::create_dir_all(&cfg.run.out_dir)
            .map_err(|source| JobError::Io { path: cfg.run.out_dir.clone(), source })?;
        P::train_tokenizer(&texts, cfg.model.tiny.vocab_size, &path)?;
        tracing::info!(path = %path.display(), texts = texts.len(), "trained the tokenizer");
    }
    let payload = if rendezvous.rank == 0 { path.display().to_string().into_bytes() } else { Vec::new() };
    let payloads = rendezvous.all_gather(&format!("tokenizer/{attempt}"), payload)?;
    Ok(PathBuf::from(String::from_utf8_lossy(&payloads[0]).into_owned()))
}

/// SingleRank for one learner; otherwise NCCL (CUDA) or the TCP collective for `seat`, rank 0's
/// address or NCCL id shared through Rendezvous under keys ending in `tag` (one per attempt or
/// group epoch). The ranks have `window` to connect; every later operation `op_timeout`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn connect_collective(
    me: &LearnerIdentity,
    seat: Seat,
    device: Device,
    link: &CoordinatorLink,
    job_id: u64,
    tag: &str,
    window: Duration,
    op_timeout: Duration,
) -> Result<Box<dyn GradientCollective>, JobError> {
    if seat.world_size == 1 {
        return Ok(Box::new(SingleRank));
    }
    let rendezvous = &Rendezvous { link, job_id, rank: seat.rank, world_size: seat.world_size };
    if device.is_cuda() {
        let probe = crate::nccl::NcclProbe::probe(Path::new(""));
        if probe.nccl_loadable {
            let key = format!("collective/nccl/{tag}");
            let payload = if seat.rank == 0 { NcclCollective::new_unique_id()? } else { Vec::new() };
            let payloads = rendezvous.all_gather(&key, payload)?;
            tracing::info!(rank = seat.rank, "joining the NCCL communicator");
            let nccl = NcclCollective::connect(seat.rank, seat.world_size, &payloads[0], device)?;
            return Ok(Box::new(nccl.with_op_timeout(op_timeout)));
        }
        tracing::warn!(reason = %probe.explain(), "CUDA ranks fall back to the CPU TCP collective");
    }
    let key = format!("collective/tcp/{tag}");
    let collective = if seat.rank == 0 {
        let io = |source| CollectiveError::Io { rank: 0, source };
        let listener = TcpListener::bind(me.collective_bind).map_err(io)?;
        let local = listener.local_addr().map_err(io)?;
        let host = me.collective_host.clone().unwrap_or_else(|| local.ip().to_string());
        let advertised = format!("{host}:{}", local.port());
        rendezvous.all_gather(&key, advertised.clone().into_bytes())?;
        TcpCollective::connect(0, seat.world_size, Some(listener), local, window)?
    } else {
        let payloads = rendezvous.all_gather(&key, Vec::new())?;
        let text = String::from_utf8_lossy(&payloads[0]).into_owned();
        let root =
            resolve(&text).ok_or_else(|| JobError::Rendezvous(format!("rank 0 advertised `{text}`, not host:port")))?;
        TcpCollective::connect(seat.rank, seat.world_size, None, root, window)?
    };
    Ok(Box::new(collective.with_op_timeout(op_timeout)?))
}

fn resolve(host_port: &str) -> Option<SocketAddr> {
    use std::net::ToSocketAddrs;
    host_port.to_socket_addrs().ok()?.next()
}
