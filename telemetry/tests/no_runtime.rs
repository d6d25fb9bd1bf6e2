//! `init` called outside any tokio runtime (a plain `fn main` that starts its runtime later, or
//! never) still exports: the spans reach the receiver when the guard is dropped, also outside any
//! runtime. One test per binary: `init` is process-global.

mod common;

use common::{string_attribute, Collector};
use medtvt_telemetry::{init, TelemetryConfig};

#[test]
fn init_and_drop_outside_any_runtime_export_spans() -> Result<(), Box<dyn std::error::Error>> {
    // The receiver needs a runtime of its own; the code under test gets none.
    let receiver_runtime = tokio::runtime::Runtime::new()?;
    let collector = receiver_runtime.block_on(Collector::start());
    assert!(tokio::runtime::Handle::try_current().is_err());

    let guard = init(
        TelemetryConfig::new("medtvt-no-runtime-test")
            .with_otlp_endpoint(collector.endpoint())
            .with_attribute("medtvt.rank", "3"),
    )?;
    tracing::info_span!("outside_runtime").in_scope(|| tracing::info!("inside"));
    drop(guard);
    let received = receiver_runtime.block_on(collector.stop());

    let span = received.span_named("outside_runtime");
    let attributes = span.resource.map(|r| r.attributes.as_slice()).unwrap_or_default();
    assert_eq!(string_attribute(attributes, "service.name"), Some("medtvt-no-runtime-test"));
    assert_eq!(string_attribute(attributes, "medtvt.rank"), Some("3"));
    Ok(())
}
