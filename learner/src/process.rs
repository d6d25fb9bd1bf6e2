//! The learner process (`medtvt learner`): one per GPU or CPU rank. It registers, heart-beats,
//! waits for jobs and runs each on a dedicated blocking thread ([`crate::job`]), until the
//! coordinator shuts down or the process is asked to stop.

use crate::job::{self, JobEnd, LearnerIdentity};
use crate::membership::{default_name, JoinOptions, Membership, MembershipError};
use crate::policy::Policy;
use medtvt_config::DeviceChoice;
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
    /// cpu, cuda or cuda:N; wins over the job config's model.device, which decides when this is
    /// not given (auto: CUDA device 0 when libtorch sees one, else the CPU).
    #[arg(long, env = "MEDTVT_DEVICE")]
    pub device: Option<String>,
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

/// A job config asks for `model.device = "cuda"` on a machine where libtorch sees no CUDA.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("model.device = \"cuda\" but CUDA is not available to this libtorch (run with --device cpu to override the config)")]
pub struct ConfigDeviceError;

/// The device one job runs on. The rule, the same for learners and rollout workers: the
/// `--device` flag (or `MEDTVT_DEVICE`), parsed at start-up into `flag`, wins; without it the
/// job config's `model.device` decides: `cpu`, `cuda` (device 0; an error without CUDA) or `auto`
/// (CUDA device 0 when libtorch sees one, else the CPU).
pub fn job_device(flag: Option<Device>, config: DeviceChoice) -> Result<Device, ConfigDeviceError> {
    if let Some(device) = flag {
        return Ok(device);
    }
    match config {
        DeviceChoice::Cpu => Ok(Device::Cpu),
        DeviceChoice::Cuda if tch::Cuda::is_available() => Ok(Device::Cuda(0)),
        DeviceChoice::Cuda => Err(ConfigDeviceError),
        DeviceChoice::Auto => Ok(Device::cuda_if_available()),
    }
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
    // A bad flag fails at start-up, not at the first job.
    let device = args.device.as_deref().map(parse_device).transpose()?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_device_flag_wins_over_the_config() {
        for config in [DeviceChoice::Auto, DeviceChoice::Cpu, DeviceChoice::Cuda] {
            assert_eq!(job_device(Some(Device::Cpu), config), Ok(Device::Cpu), "{config:?}");
            assert_eq!(job_device(Some(Device::Cuda(1)), config), Ok(Device::Cuda(1)), "{config:?}");
        }
    }

    #[test]
    fn without_the_flag_the_config_decides() {
        let cuda = tch::Cuda::is_available();
        assert_eq!(job_device(None, DeviceChoice::Cpu), Ok(Device::Cpu));
        assert_eq!(job_device(None, DeviceChoice::Auto), Ok(if cuda { Device::Cuda(0) } else { Device::Cpu }));
        assert_eq!(job_device(None, DeviceChoice::Cuda), if cuda { Ok(Device::Cuda(0)) } else { Err(ConfigDeviceError) });
    }

    #[test]
    fn device_flags_parse_and_bad_ones_are_named() {
        assert_eq!(parse_device("cpu").ok(), Some(Device::Cpu));
        let bad = parse_device("tpu").map(|_| ()).map_err(|e| e.to_string());
        assert_eq!(bad, Err("--device tpu: expected cpu, cuda or cuda:N".to_string()));
        let cuda = parse_device("cuda:0").map(|_| ()).map_err(|e| e.to_string());
        if !tch::Cuda::is_available() {
            assert_eq!(cuda, Err("--device cuda:0: CUDA is not available to this libtorch".to_string()));
        }
    }
}
