//! `medtvt coordinator`: the command-line entry point. Parses flags (each readable from an
//! environment variable), refuses to listen beyond loopback without a token (unless
//! `--insecure`), confines the paths of jobs submitted over the network to the `--job-root`
//! folders (the working directory by default), submits the configs given on the command line as
//! jobs in order, prints `coordinator listening on <addr>` once bound, and stops gracefully on
//! SIGTERM/ctrl-c.

use crate::job_roots::JobRoots;
use crate::server::{Coordinator, ServerOptions};
use anyhow::Context;
use std::future::Future;
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Debug, Clone, clap::Args)]
pub struct CoordinatorArgs {
    /// Run configs to submit as jobs at start, in order (e.g. the PT, SFT and GRPO stages).
    /// Several may be given, as repeated flags or comma-separated in MEDTVT_CONFIG.
    #[arg(long = "config", value_name = "FILE", env = "MEDTVT_CONFIG", value_delimiter = ',')]
    pub configs: Vec<PathBuf>,
    /// Dotted overrides applied to every config given with --config (e.g. train.steps=5).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
    /// Address to serve gRPC on; port 0 picks a free port (the line printed says which). An
    /// address other than loopback needs --auth-token-file (or --insecure).
    #[arg(long, env = "MEDTVT_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,
    /// Listen beyond loopback without --auth-token-file: anyone who reaches the port can then
    /// submit and cancel jobs. Logged as a warning.
    #[arg(long, env = "MEDTVT_INSECURE")]
    pub insecure: bool,
    /// A folder the paths of jobs submitted over the network (run.out_dir, data.dir,
    /// model.checkpoint, encoder weights) must lie under; repeat it or separate folders with
    /// commas. Default: the working directory. --config files are not confined.
    #[arg(long = "job-root", value_name = "DIR", env = "MEDTVT_JOB_ROOTS", value_delimiter = ',')]
    pub job_roots: Vec<PathBuf>,
    /// Directory for the event log (events.jsonl) and the durable run state
    /// (coordinator.sqlite, weights/). A run recorded there is resumed after a crash; the
    /// --config files are then not submitted again.
    #[arg(long, env = "MEDTVT_RUN_DIR", value_name = "DIR")]
    pub run_dir: Option<PathBuf>,
    /// PEM certificate chain: serve gRPC over TLS (with --tls-key).
    #[arg(long, env = "MEDTVT_TLS_CERT", value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "MEDTVT_TLS_KEY", value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    /// File holding a shared secret; every call must then carry `authorization: Bearer <it>`.
    #[arg(long, env = "MEDTVT_AUTH_TOKEN_FILE", value_name = "FILE")]
    pub auth_token_file: Option<PathBuf>,
    /// Largest gRPC message sent or accepted, in MiB: a GRPO training batch is one message, and a
    /// batch over it is refused with an error naming both (raise it here and on every role).
    #[arg(long, env = "MEDTVT_MAX_MESSAGE_MIB", default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=2047))]
    pub max_message_mib: u32,
    /// OTLP/gRPC endpoint for traces and metrics (e.g. http://127.0.0.1:4317).
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT", value_name = "URL")]
    pub otlp_endpoint: Option<String>,
}

/// Runs the coordinator as a whole process: its tokio runtime, logging and OpenTelemetry export
/// (service `medtvt-coordinator`), then [`run`]. Both the `medtvt-coordinator` binary and
/// `medtvt coordinator` are this call.
pub fn run_process(args: CoordinatorArgs) -> anyhow::Result<()> {
    use anyhow::Context;
    let runtime =
        tokio::runtime::Builder::new_multi_thread().enable_all().build().context("cannot start the async runtime")?;
    runtime.block_on(async {
        let mut telemetry =
            medtvt_telemetry::TelemetryConfig::new("medtvt-coordinator").with_attribute("medtvt.role", "coordinator");
        telemetry.otlp_endpoint = args.otlp_endpoint.clone();
        let guard = medtvt_telemetry::init(telemetry).context("setting up logging and OpenTelemetry")?;
        let result = run(args).await;
        guard.shutdown().await.context("flushing telemetry")?;
        result
    })
}

/// Runs the coordinator (logging/telemetry are the caller's to set up, see
/// `medtvt_telemetry::init`) until SIGTERM/ctrl-c or a drained Shutdown request, announcing the
/// bound address on stdout.
pub async fn run(args: CoordinatorArgs) -> anyhow::Result<()> {
    run_until(args, termination(), |addr| {
        let mut stdout = std::io::stdout();
        writeln!(stdout, "coordinator listening on {addr}")?;
        stdout.flush()
    })
    .await
}

/// [`run`] with the stop signal and the announcement supplied by the caller (tests).
pub async fn run_until(
    args: CoordinatorArgs,
    shutdown: impl Future<Output = ()> + Send + 'static,
    announce: impl FnOnce(SocketAddr) -> std::io::Result<()>,
) -> anyhow::Result<()> {
    let auth_token = match &args.auth_token_file {
        Some(path) => Some(medtvt_proto::client::read_token_file(path)?),
        None => None,
    };
    check_exposure(args.listen, auth_token.is_some(), args.insecure)?;
    let tls = crate::tls::TlsFiles::from_flags(args.tls_cert.clone(), args.tls_key.clone())?;
    let job_roots = job_roots(&args.job_roots)?;
    tracing::info!(roots = ?job_roots, "paths of submitted jobs are confined");
    let mut options = ServerOptions {
        auth_token,
        run_dir: args.run_dir.clone(),
        tls,
        max_message_bytes: (args.max_message_mib as usize) << 20,
        ..ServerOptions::default()
    };
    options.service.job_roots = job_roots;
    let coordinator = Coordinator::bind(args.listen, options).await?;
    let configs = if coordinator.resumed() {
        if !args.configs.is_empty() {
            tracing::info!(
                configs = args.configs.len(),
                "resuming a recorded run: --config files are not submitted again"
            );
        }
        &[][..]
    } else {
        &args.configs[..]
    };
    for path in configs {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read config {}", path.display()))?;
        let job = coordinator
            .submit_job(&text, &args.overrides)
            .await
            .with_context(|| format!("config {} is not a valid job", path.display()))?;
        tracing::info!(job_id = job.0, config = %path.display(), "job submitted");
    }
    announce(coordinator.local_addr()).context("cannot announce the listening address")?;
    coordinator.serve(shutdown).await?;
    Ok(())
}

/// Refuses an address other than loopback without a token: the port would let anyone submit
/// jobs. `insecure` allows it, with a warning.
pub fn check_exposure(listen: SocketAddr, has_token: bool, insecure: bool) -> anyhow::Result<()> {
    if listen.ip().is_loopback() || has_token {
        return Ok(());
    }
    if insecure {
        tracing::warn!(%listen, "--insecure: listening beyond loopback without an auth token; anyone who reaches this port can submit and cancel jobs");
        return Ok(());
    }
    anyhow::bail!(
        "refusing to listen on {listen} without --auth-token-file: anyone who reaches the port could submit jobs that \
         write where they like; give a token file, listen on 127.0.0.1, or pass --insecure to accept the risk"
    )
}

/// The `--job-root` folders, or the working directory when none is given.
fn job_roots(flags: &[PathBuf]) -> anyhow::Result<JobRoots> {
    let cwd = std::env::current_dir().context("cannot read the working directory")?;
    let roots = if flags.is_empty() { vec![cwd.clone()] } else { flags.to_vec() };
    Ok(JobRoots::confined(&roots, &cwd)?)
}

/// Resolves on ctrl-c or SIGTERM.
async fn termination() {
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(term) => term,
            Err(err) => {
                tracing::warn!(error = %err, "cannot listen for SIGTERM; ctrl-c only");
                let _ = tokio::signal::ctrl_c().await;
                return;
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
    tracing::info!("termination signal: shutting down");
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: CoordinatorArgs,
    }

    #[test]
    fn flags_parse_with_defaults() {
        let cli = Cli::try_parse_from(["medtvt", "--config", "a.toml", "--config", "b.toml", "--set", "train.steps=2"])
            .unwrap();
        assert_eq!(cli.args.configs, vec![PathBuf::from("a.toml"), PathBuf::from("b.toml")]);
        assert_eq!(cli.args.overrides, vec!["train.steps=2".to_string()]);
        assert_eq!(cli.args.listen, "127.0.0.1:50051".parse::<SocketAddr>().unwrap());
        assert!(!cli.args.insecure && cli.args.job_roots.is_empty());
        assert!(Cli::try_parse_from(["medtvt", "--listen", "not-an-address"]).is_err());
        let cli = Cli::try_parse_from(["medtvt", "--job-root", "/data,/models", "--job-root", "runs"]).unwrap();
        assert_eq!(cli.args.job_roots, ["/data", "/models", "runs"].map(PathBuf::from).to_vec());
    }

    #[test]
    fn beyond_loopback_a_token_or_insecure_is_required() {
        let any: SocketAddr = "0.0.0.0:50051".parse().unwrap();
        let e = check_exposure(any, false, false).unwrap_err().to_string();
        assert!(e.contains("0.0.0.0:50051") && e.contains("--auth-token-file") && e.contains("--insecure"), "{e}");
        check_exposure(any, true, false).unwrap();
        check_exposure(any, false, true).unwrap();
        check_exposure("127.0.0.1:0".parse().unwrap(), false, false).unwrap();
        check_exposure("[::1]:0".parse().unwrap(), false, false).unwrap();
        assert!(check_exposure("10.0.0.5:50051".parse().unwrap(), false, false).is_err());
    }
}
