//! `medtvt learner`: one learner rank (see medtvt-learner's `process`). The CLI is synchronous;
//! this command sets up telemetry, builds the process's one tokio runtime and runs the learner.

use anyhow::Context;
use medtvt_learner::process::LearnerArgs;
use medtvt_model::policy::medtvt::MedTvtPolicy;
use medtvt_telemetry::TelemetryConfig;

pub fn run(args: LearnerArgs) -> anyhow::Result<()> {
    let mut telemetry = TelemetryConfig::new("medtvt-learner")
        .with_attribute("medtvt.role", "learner")
        .with_attribute("medtvt.rank", args.rank.to_string());
    if let Some(endpoint) = &args.role.otlp_endpoint {
        telemetry = telemetry.with_otlp_endpoint(endpoint.clone());
    }
    let guard = medtvt_telemetry::init(telemetry).context("setting up telemetry")?;
    let runtime =
        tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the tokio runtime")?;
    let result = runtime.block_on(medtvt_learner::process::run::<MedTvtPolicy>(args));
    runtime.block_on(guard.shutdown()).context("flushing telemetry")?;
    result.context("learner")
}
