//! The rollout-worker role (`medtvt rollout-worker`): register with the coordinator, keep a
//! heartbeat, wait for jobs, and for each GRPO job lease prompts, sample G completions per prompt
//! with the newest policy version, reward them and submit the groups ([`job`], [`rollout`]).
//! Workers may join or leave mid-run: the coordinator re-leases what a departed worker held.

pub mod job;
pub mod rollout;

use medtvt_model::policy::Policy;
use medtvt_proto::v1::{Role, Stage};
use medtvt_role::device::{parse_device, DeviceError};
use medtvt_role::membership::{default_name, JoinOptions, Membership, MembershipError};
use medtvt_role::RoleArgs;

#[derive(Debug, Clone, clap::Args)]
pub struct RolloutWorkerArgs {
    #[command(flatten)]
    pub role: RoleArgs,
    /// Shown in the coordinator's status (default: rollout-worker@host:pid).
    #[arg(long, env = "MEDTVT_WORKER_NAME")]
    pub name: Option<String>,
    /// Prompts asked for per lease.
    #[arg(long, default_value_t = 2)]
    pub max_prompts: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Device(#[from] DeviceError),
    #[error(transparent)]
    Membership(#[from] MembershipError),
    #[error("--max-prompts must be at least 1")]
    MaxPrompts,
    #[error("the rollout thread panicked: {0}")]
    JobThread(String),
}

/// Runs the worker until the coordinator shuts down or the process is asked to stop. Call inside
/// the process's one tokio runtime.
pub async fn run<P: Policy + 'static>(args: RolloutWorkerArgs) -> Result<(), WorkerError> {
    if args.max_prompts == 0 {
        return Err(WorkerError::MaxPrompts);
    }
    // A bad flag fails at start-up; without one each job's model.device decides.
    let device = args.role.device.as_deref().map(parse_device).transpose()?;
    let options = JoinOptions {
        coordinator: args.role.coordinator.clone(),
        auth_token_file: args.role.auth_token_file.clone(),
        role: Role::RolloutWorker,
        name: args.name.clone().unwrap_or_else(|| default_name("rollout-worker")),
        rank: 0,
        world_size: 0,
        max_message_bytes: args.role.max_message_bytes(),
    };
    let mut membership = Membership::join(&options).await?;
    let mut after = 0;
    let result = loop {
        let job = match membership.next_job(after).await {
            Ok(Some(job)) => job,
            Ok(None) => break Ok(()),
            Err(e) => break Err(e.into()),
        };
        after = job.job_id;
        if job.stage != Stage::Grpo as i32 {
            tracing::info!(job = job.job_id, "not a GRPO job; waiting for the next one");
            continue;
        }
        tracing::info!(job = job.job_id, name = %job.name, "rollouts started");
        let link = membership.link();
        let max_prompts = args.max_prompts;
        let outcome =
            tokio::task::spawn_blocking(move || job::run_rollout_job::<P>(&link, &job, device, max_prompts)).await;
        match outcome {
            Ok(Ok(tally)) => tracing::info!(
                job = after,
                leases = tally.leases,
                groups = tally.groups_submitted,
                accepted = tally.groups_accepted,
                version = tally.policy_version,
                "rollouts finished"
            ),
            Ok(Err(err)) => tracing::error!(job = after, error = %err, "rollouts failed"),
            Err(join) => break Err(WorkerError::JobThread(join.to_string())),
        }
    };
    membership.leave().await;
    result
}

#[cfg(test)]
mod tests {
    /// The worker's whole dependency tree (dev-dependencies included) has neither the learner's
    /// crate nor NCCL: what the roles share lives in medtvt-role and beside the model.
    #[test]
    fn the_worker_depends_on_neither_the_learner_nor_nccl() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let out = std::process::Command::new(cargo)
            .args(["tree", "--offline", "-p", "medtvt-rollout-worker", "--prefix", "none", "-e", "normal,build,dev"])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .expect("running cargo tree");
        assert!(out.status.success(), "cargo tree failed: {}", String::from_utf8_lossy(&out.stderr));
        let tree = String::from_utf8_lossy(&out.stdout);
        assert!(tree.contains("medtvt-role"), "{tree}");
        for banned in ["medtvt-learner ", "cudarc "] {
            assert!(!tree.lines().any(|l| l.starts_with(banned)), "{banned}in the worker's tree:\n{tree}");
        }
    }
}
