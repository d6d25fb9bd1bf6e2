//! The learner process (`medtvt learner`): one per GPU or CPU rank. It registers, heart-beats,
//! waits for jobs and runs each on a dedicated blocking thread ([`crate::job`]), until the
//! coordinator shuts down or the process is asked to stop.

use crate::job::{self, JobEnd, LearnerIdentity};
use medtvt_model::policy::Policy;
use medtvt_proto::v1::Role;
use medtvt_role::device::{parse_device, DeviceError};
use medtvt_role::membership::{default_name, JoinOptions, Membership, MembershipError};
use medtvt_role::RoleArgs;
use std::net::SocketAddr;

#[derive(Debug, Clone, clap::Args)]
pub struct LearnerArgs {
    #[command(flatten)]
    pub role: RoleArgs,
    /// This learner's rank, 0..world-size.
    #[arg(long, env = "MEDTVT_RANK", default_value_t = 0)]
    pub rank: u32,
    /// Number of learner ranks (the jobs' cluster.learners).
    #[arg(long, env = "MEDTVT_WORLD_SIZE", default_value_t = 1)]
    pub world_size: u32,
    /// Shown in the coordinator's status (default: learner-<rank>@host:pid).
    #[arg(long, env = "MEDTVT_LEARNER_NAME")]
    pub name: Option<String>,
    /// Where rank 0's CPU collective listens (port 0: any free port).
    #[arg(long, env = "MEDTVT_COLLECTIVE_BIND", default_value = "127.0.0.1:0")]
    pub collective_bind: SocketAddr,
    /// The host name or IP other ranks dial to reach rank 0's collective (default: the bind IP).
    #[arg(long, env = "MEDTVT_COLLECTIVE_HOST")]
    pub collective_host: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error(transparent)]
    Device(#[from] DeviceError),
    #[error("--rank {rank} is not below --world-size {world_size}")]
    Rank { rank: u32, world_size: u32 },
    #[error(transparent)]
    Membership(#[from] MembershipError),
    #[error("the job thread panicked: {0}")]
    JobThread(String),
}

/// Runs the learner until shutdown. Call inside the process's one tokio runtime.
pub async fn run<P: Policy + 'static>(args: LearnerArgs) -> Result<(), ProcessError> {
    if args.rank >= args.world_size {
        return Err(ProcessError::Rank { rank: args.rank, world_size: args.world_size });
    }
    // A bad flag fails at start-up, not at the first job.
    let device = args.role.device.as_deref().map(parse_device).transpose()?;
    let name = args.name.clone().unwrap_or_else(|| default_name(&format!("learner-{}", args.rank)));
    let options = JoinOptions {
        coordinator: args.role.coordinator.clone(),
        auth_token_file: args.role.auth_token_file.clone(),
        role: Role::Learner,
        name,
        rank: args.rank,
        world_size: args.world_size,
        max_message_bytes: args.role.max_message_bytes(),
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
            Ok(Ok(JobEnd::Completed { steps, final_dir })) => {
                tracing::info!(job = after, steps, final_dir = %final_dir.display(), "job completed")
            }
            Ok(Ok(JobEnd::Stopped { at_step })) => tracing::info!(job = after, at_step, "job ended by the coordinator"),
            Ok(Err(err)) => tracing::error!(job = after, error = %err, "job failed on this rank"),
            Err(join) => break Err(ProcessError::JobThread(join.to_string())),
        }
    };
    membership.leave().await;
    result
}
