//! The learner process (`medtvt learner`): one per GPU or CPU rank. It registers, heart-beats,
//! waits for jobs and runs each on a dedicated blocking thread ([`crate::job`]), until the
//! coordinator shuts down or the process is asked to stop.

use crate::job::{self, JobEnd, LearnerIdentity};
use crate::membership::{default_name, JoinOptions, Membership, MembershipError};
use crate::policy::Policy;
use medtvt_proto::v1::Role;
use std::net::SocketAddr;
use std::path::PathBuf;
use tch::Device;

#[derive(Debug, Clone, clap::Args)]
pub struct LearnerArgs {
    /// The coordinator's URL, e.g. http://127.0.0.1:50051.
    #[arg(long, env = "MEDTVT_COORDINATOR")]
    pub coordinator: String,
    /// This learner's rank, 0..world-size.
    #[arg(long, env = "MEDTVT_RANK", default_value_t = 0)]
    pub rank: u32,
    /// Number of learner ranks (the jobs' cluster.learners).
    #[arg(long, env = "MEDTVT_WORLD_SIZE", default_value_t = 1)]
    pub world_size: u32,
    /// cpu, cuda or cuda:N.
    #[arg(long, env = "MEDTVT_DEVICE", default_value = "cpu")]
    pub device: String,
    /// Shown in the coordinator's status (default: learner-<rank>@host:pid).
    #[arg(long, env = "MEDTVT_LEARNER_NAME")]
    pub name: Option<String>,
    /// A file holding the coordinator's bearer token.
    #[arg(long, env = "MEDTVT_AUTH_TOKEN_FILE")]
    pub auth_token_file: Option<PathBuf>,
    /// OTLP/gRPC endpoint for traces and metrics (read by the command that sets up telemetry).
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// Where rank 0's CPU collective listens (port 0: any free port).
    #[arg(long, env = "MEDTVT_COLLECTIVE_BIND", default_value = "127.0.0.1:0")]
    pub collective_bind: SocketAddr,
    /// The host name or IP other ranks dial to reach rank 0's collective (default: the bind IP).
    #[arg(long, env = "MEDTVT_COLLECTIVE_HOST")]
    pub collective_host: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("--device {0}: expected cpu, cuda or cuda:N")]
    Device(String),
    #[error("--device {0}: CUDA is not available to this libtorch")]
    NoCuda(String),
    #[error("--rank {rank} is not below --world-size {world_size}")]
    Rank { rank: u32, world_size: u32 },
    #[error(transparent)]
    Membership(#[from] MembershipError),
    #[error("the job thread panicked: {0}")]
    JobThread(String),
}

/// Parses `cpu`, `cuda` or `cuda:N`.
pub fn parse_device(text: &str) -> Result<Device, ProcessError> {
    let device = match text {
        "cpu" => Device::Cpu,
        "cuda" => Device::Cuda(0),
        other => match other.strip_prefix("cuda:").and_then(|n| n.parse::<usize>().ok()) {
            Some(n) => Device::Cuda(n),
            None => return Err(ProcessError::Device(text.to_string())),
        },
    };
    if device.is_cuda() && !tch::Cuda::is_available() {
        return Err(ProcessError::NoCuda(text.to_string()));
    }
    Ok(device)
}

/// Runs the learner until shutdown. Call inside the process's one tokio runtime.
pub async fn run<P: Policy + 'static>(args: LearnerArgs) -> Result<(), ProcessError> {
    if args.rank >= args.world_size {
        return Err(ProcessError::Rank { rank: args.rank, world_size: args.world_size });
    }
    let device = parse_device(&args.device)?;
    let name = args.name.clone().unwrap_or_else(|| default_name(&format!("learner-{}", args.rank)));
    let options = JoinOptions {
        coordinator: args.coordinator.clone(),
        auth_token_file: args.auth_token_file.clone(),
        role: Role::Learner,
        name,
        rank: args.rank,
        world_size: args.world_size,
    };
    let mut membership = Membership::join(&options).await?;
    let me = LearnerIdentity {
        rank: args.rank as usize,
        world_size: args.world_size as usize,
        device,
        collective_bind: args.collective_bind,
        collective_host: args.collective_host.clone(),
    };
    let mut after = 0;
    let result = loop {
        let job = match membership.next_job(after).await {
            Ok(Some(job)) => job,
            Ok(None) => break Ok(()),
            Err(e) => break Err(e.into()),
        };
        after = job.job_id;
        tracing::info!(job = job.job_id, name = %job.name, stage = job.stage, rank = me.rank, "job started");
        let link = membership.link();
        let me = me.clone();
        let outcome = tokio::task::spawn_blocking(move || job::run_job::<P>(&link, &me, &job)).await;
        match outcome {
            Ok(Ok(JobEnd::Completed { steps, final_dir })) => tracing::info!(job = after, steps, final_dir = %final_dir.display(), "job completed"),
            Ok(Ok(JobEnd::Stopped { at_step })) => tracing::info!(job = after, at_step, "job ended by the coordinator"),
            Ok(Err(err)) => tracing::error!(job = after, error = %err, "job failed on this rank"),
            Err(join) => break Err(ProcessError::JobThread(join.to_string())),
        }
    };
    membership.leave().await;
    result
}
