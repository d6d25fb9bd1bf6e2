//! Without an OTLP endpoint `init` installs only the console log: no exporter, a disabled
//! `RunMetrics`, no trace context to propagate, and a second `init` is refused. One test per
//! binary: `init` is process-global.

use std::collections::BTreeMap;

use medtvt_telemetry::metrics::RunMetrics;
use medtvt_telemetry::propagation::{inject_current_context, set_parent};
use medtvt_telemetry::{init, TelemetryConfig, TelemetryError, OTLP_ENDPOINT_ENV};
use tonic::metadata::MetadataMap;

#[test]
fn init_without_endpoint_logs_to_the_console_only() -> Result<(), TelemetryError> {
    // The only test in this process, so no other thread reads the environment meanwhile.
    std::env::remove_var(OTLP_ENDPOINT_ENV);
    let guard = init(TelemetryConfig::new("medtvt-no-endpoint-test"))?;
    assert!(!guard.exports_otlp());

    let metrics = RunMetrics::global();
    assert!(!metrics.is_enabled());
    metrics.record_step(&BTreeMap::from([("loss".to_owned(), 1.0)]), &[]);
    metrics.set_queue_depth(1);

    let span = tracing::info_span!("untraced");
    let mut metadata = MetadataMap::new();
    span.in_scope(|| inject_current_context(&mut metadata));
    assert!(metadata.is_empty(), "no OTel layer, so no traceparent: {metadata:?}");
    metadata.insert(
        "traceparent",
        tonic::metadata::MetadataValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
    );
    assert!(!set_parent(&tracing::info_span!("server"), &metadata), "no OTel layer to attach a parent to");

    match init(TelemetryConfig::new("again")) {
        Err(TelemetryError::AlreadyInitialized(_)) => {}
        other => panic!("a second init must be refused, got {:?}", other.map(|g| g.exports_otlp())),
    }
    // No runtime here: dropping a guard that exports nothing must not need one.
    drop(guard);
    Ok(())
}
