//! The flags every worker-side process takes (`medtvt learner`, `medtvt rollout-worker`), declared
//! once and flattened into each role's arguments with `#[command(flatten)]`.

use std::path::PathBuf;

/// Where the coordinator is, how to authenticate, which device, where telemetry goes.
#[derive(Debug, Clone, clap::Args)]
pub struct RoleArgs {
    /// The coordinator's URL, e.g. http://127.0.0.1:50051.
    #[arg(long, env = "MEDTVT_COORDINATOR")]
    pub coordinator: String,
    /// cpu, cuda or cuda:N; wins over the job config's model.device, which decides when this is
    /// not given (auto: CUDA device 0 when libtorch sees one, else the CPU).
    #[arg(long, env = "MEDTVT_DEVICE")]
    pub device: Option<String>,
    /// A file holding the coordinator's bearer token.
    #[arg(long, env = "MEDTVT_AUTH_TOKEN_FILE")]
    pub auth_token_file: Option<PathBuf>,
    /// OTLP/gRPC endpoint for traces and metrics (read by the command that sets up telemetry).
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// Largest gRPC message sent or accepted, in MiB (a GRPO training batch is one message); the
    /// coordinator takes the same flag.
    #[arg(long, env = "MEDTVT_MAX_MESSAGE_MIB", default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=2047))]
    pub max_message_mib: u32,
}

impl RoleArgs {
    /// The gRPC message limit in bytes.
    pub fn max_message_bytes(&self) -> usize {
        (self.max_message_mib as usize) << 20
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Role {
        #[command(flatten)]
        role: RoleArgs,
        #[arg(long)]
        rank: Option<u32>,
    }

    #[test]
    fn the_role_flags_flatten_beside_a_role_s_own_flags() {
        let parsed = Role::try_parse_from([
            "role",
            "--coordinator",
            "http://c:1",
            "--device",
            "cpu",
            "--auth-token-file",
            "/t",
            "--rank",
            "3",
        ])
        .unwrap();
        assert_eq!(parsed.role.coordinator, "http://c:1");
        assert_eq!(parsed.role.device.as_deref(), Some("cpu"));
        assert_eq!(parsed.role.auth_token_file, Some(PathBuf::from("/t")));
        assert_eq!(parsed.rank, Some(3));
    }
}
