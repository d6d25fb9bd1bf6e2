//! Dropping the guard (no explicit shutdown) on a multi-thread runtime's only worker thread still
//! delivers the buffered spans: the drop shuts down inside `block_in_place`, so the runtime keeps
//! driving the OTLP channel while the worker blocks. One test per binary: `init` is global.

mod common;

use common::{string_attribute, Collector};
use medtvt_telemetry::{init, TelemetryConfig};

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn dropping_the_guard_inside_the_runtime_flushes_spans(
) -> Result<(), Box<dyn std::error::Error>> {
    let collector = Collector::start().await;
    let guard =
        init(TelemetryConfig::new("medtvt-drop-test").with_otlp_endpoint(collector.endpoint()))?;
    tracing::info_span!("before_drop").in_scope(|| tracing::info!("inside"));
    drop(guard);
    let received = collector.stop().await;

    let span = received.span_named("before_drop");
    let attributes = span
        .resource
        .map(|r| r.attributes.as_slice())
        .unwrap_or_default();
    assert_eq!(
        string_attribute(attributes, "service.name"),
        Some("medtvt-drop-test")
    );
    Ok(())
}
