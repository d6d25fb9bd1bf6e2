//! `medtvt coordinator`: runs the control plane of a run (see the medtvt-coordinator crate).
//! The flags live with the crate (`CoordinatorArgs`); this file gives it its runtime
//! and its logging / OpenTelemetry export.

use anyhow::Context;

pub fn run(args: medtvt_coordinator::CoordinatorArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async {
        let mut telemetry = medtvt_telemetry::TelemetryConfig::new("medtvt-coordinator").with_attribute("medtvt.role", "coordinator");
        telemetry.otlp_endpoint = args.otlp_endpoint.clone();
        let guard = medtvt_telemetry::init(telemetry).context("setting up logging and OpenTelemetry")?;
        let result = medtvt_coordinator::run(args).await;
        guard.shutdown().await.context("flushing telemetry")?;
        result
    })
}
