//! `medtvt rollout-worker`: one rollout worker (see medtvt-rollout-worker). The CLI is
//! synchronous; this command sets up telemetry, builds the process's one tokio runtime and runs
//! the worker.

use anyhow::Context;
use medtvt_model::policy::medtvt::MedTvtPolicy;
use medtvt_rollout_worker::RolloutWorkerArgs;
use medtvt_telemetry::TelemetryConfig;

pub fn run(args: RolloutWorkerArgs) -> anyhow::Result<()> {
    let mut telemetry = TelemetryConfig::new("medtvt-rollout-worker").with_attribute("medtvt.role", "rollout_worker");
    if let Some(name) = &args.name {
        telemetry = telemetry.with_attribute("medtvt.worker", name.clone());
    }
    if let Some(endpoint) = &args.role.otlp_endpoint {
        telemetry = telemetry.with_otlp_endpoint(endpoint.clone());
    }
    let guard = medtvt_telemetry::init(telemetry).context("setting up telemetry")?;
    let runtime =
        tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the tokio runtime")?;
    let result = runtime.block_on(medtvt_rollout_worker::run::<MedTvtPolicy>(args));
    runtime.block_on(guard.shutdown()).context("flushing telemetry")?;
    result.context("rollout worker")
}
