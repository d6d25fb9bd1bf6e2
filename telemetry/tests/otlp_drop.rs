//! Dropping the guard (no explicit shutdown) inside a current-thread runtime — the flavour where a
//! blocking flush would starve an export channel living on the application's runtime — still
//! delivers the buffered spans, because the channel lives on the guard's own export runtime.
//! One test per binary: `init` is process-global.

mod common;

use common::{string_attribute, Collector};
use medtvt_telemetry::{init, TelemetryConfig, TelemetryError};

#[test]
fn dropping_the_guard_inside_a_current_thread_runtime_flushes_spans() -> Result<(), Box<dyn std::error::Error>> {
    // The receiver stands for a collector process, so it must not share the runtime under test.
    let receiver_runtime = tokio::runtime::Runtime::new()?;
    let collector = receiver_runtime.block_on(Collector::start());
    let endpoint = collector.endpoint();

    let app_runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    app_runtime.block_on(async move {
        let guard = init(TelemetryConfig::new("medtvt-drop-test").with_otlp_endpoint(endpoint))?;
        tracing::info_span!("before_drop").in_scope(|| tracing::info!("inside"));
        drop(guard);
        Ok::<_, TelemetryError>(())
    })?;
    let received = receiver_runtime.block_on(collector.stop());

    let span = received.span_named("before_drop");
    let attributes = span.resource.map(|r| r.attributes.as_slice()).unwrap_or_default();
    assert_eq!(string_attribute(attributes, "service.name"), Some("medtvt-drop-test"));
    Ok(())
}
