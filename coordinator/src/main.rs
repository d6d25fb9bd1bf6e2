//! `medtvt-coordinator`: the control plane as a binary of its own, for a coordinator image
//! without torch. It links no libtorch (`tests/no_libtorch.rs` checks its dynamic libraries) and
//! takes exactly the flags of `medtvt coordinator`, which stays as a convenience.

use anyhow::Context;
use clap::Parser;

#[derive(Parser)]
#[command(name = "medtvt-coordinator", version, about = "The MedTVT coordinator: schedules jobs, leases prompts, assembles training batches and relays weights")]
struct Cli {
    #[command(flatten)]
    args: medtvt_coordinator::CoordinatorArgs,
}

fn main() -> anyhow::Result<()> {
    let args = Cli::parse().args;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("cannot start the async runtime")?;
    runtime.block_on(async {
        let mut telemetry = medtvt_telemetry::TelemetryConfig::new("medtvt-coordinator").with_attribute("medtvt.role", "coordinator");
        telemetry.otlp_endpoint = args.otlp_endpoint.clone();
        let guard = medtvt_telemetry::init(telemetry).context("setting up logging and OpenTelemetry")?;
        let result = medtvt_coordinator::run(args).await;
        guard.shutdown().await.context("flushing telemetry")?;
        result
    })
}
