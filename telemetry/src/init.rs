//! Installing the process-wide telemetry pipeline ([`init`]) and taking it down again
//! ([`TelemetryGuard`]).
//!
//! The pipeline is one global `tracing` subscriber with two layers: a human-readable console log
//! on stderr, and (only when an OTLP endpoint is configured) a `tracing-opentelemetry` layer that
//! turns spans into OTel spans for a batch OTLP/gRPC exporter. Next to it an OTel
//! `SdkMeterProvider` with a periodic reader pushes [`crate::metrics::RunMetrics`] instruments to
//! the same endpoint, and the W3C TraceContext propagator is installed globally for
//! [`crate::propagation`].
//!
//! Threads and runtimes: the SDK's batch span processor and periodic metric reader each run on a
//! dedicated OS thread (the SDK 0.33 default; its tokio-task variants are still experimental) and
//! block on the tonic export calls. The tonic channels those calls go through need a tokio
//! runtime to run their connection tasks; they get a private one-worker runtime (thread
//! `medtvt-otlp`) owned by the guard, not the application's. So exporting never competes with or
//! waits on the application's executor, [`init`] works inside or outside any runtime (multi- or
//! current-thread), and the final flush works wherever the guard is dropped — even after the
//! application's runtime is gone.

use std::io::IsTerminal as _;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry::{global, KeyValue};
use opentelemetry_otlp::{MetricExporter, SpanExporter, WithExportConfig};
use opentelemetry_sdk::metrics::{PeriodicReader, SdkMeterProvider};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use tokio::runtime::Runtime;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::{TelemetryConfig, TelemetryError};

/// Console filter when `RUST_LOG` is unset or blank: `info`, but the OTel SDK's own start-up
/// chatter only from `warn` (export failures are still shown).
const DEFAULT_FILTER: &str = "info,opentelemetry=warn,opentelemetry_sdk=warn,opentelemetry_otlp=warn";

/// Appended to the OTLP layer's filter: spans of the export path itself (the gRPC stack and the
/// SDK) would otherwise be exported, creating more export traffic, in an endless loop.
const EXPORT_PATH_OFF: &str =
    "h2=off,hyper=off,hyper_util=off,tower=off,tonic=off,opentelemetry=off,opentelemetry_sdk=off,opentelemetry_otlp=off";

/// The OTel instrumentation scope our spans and metrics are reported under.
pub(crate) const INSTRUMENTATION_SCOPE: &str = "medtvt";

/// Installs the global tracing subscriber, and OTLP span and metric export when an endpoint is
/// configured (in [`TelemetryConfig::otlp_endpoint`] or `OTEL_EXPORTER_OTLP_ENDPOINT`).
///
/// Call it once per process, early; inside or outside a tokio runtime (the OTLP channels run on a
/// private runtime the guard owns). Keep the returned guard alive until the end of `main`;
/// dropping it (or `guard.shutdown().await`) flushes what is buffered.
pub fn init(config: TelemetryConfig) -> Result<TelemetryGuard, TelemetryError> {
    config.validate()?;
    let endpoint = config.resolved_otlp_endpoint()?;
    let filter_directives = filter_directives_from_env();
    let console_layer = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_filter(parse_filter(&filter_directives, &filter_directives)?);

    global::set_text_map_propagator(TraceContextPropagator::new());
    let Some(endpoint) = endpoint else {
        tracing_subscriber::registry().with(console_layer).try_init().map_err(TelemetryError::AlreadyInitialized)?;
        return Ok(TelemetryGuard { exporting: None });
    };

    let otel_filter = parse_filter(&filter_directives, &format!("{filter_directives},{EXPORT_PATH_OFF}"))?;
    let resource = resource(&config);
    let runtime = export_runtime()?;
    let built = {
        // The tonic channels spawn their connection tasks on the runtime entered here.
        let _entered = runtime.enter();
        tracer_provider(&endpoint, resource.clone())
            .and_then(|tracer| Ok((tracer, meter_provider(&endpoint, resource, &config)?)))
    };
    let (tracer_provider, meter_provider) = match built {
        Ok(providers) => providers,
        Err(error) => {
            // Not a plain drop: dropping a runtime inside an async context panics.
            runtime.shutdown_background();
            return Err(error);
        }
    };
    let otel_layer = tracing_opentelemetry::layer()
        .with_tracer(tracer_provider.tracer(INSTRUMENTATION_SCOPE))
        .with_filter(otel_filter);
    // The guard owns the providers before the fallible install, so a failure still shuts them down.
    let guard = TelemetryGuard {
        exporting: Some(Exporting { tracer: tracer_provider.clone(), meter: meter_provider.clone(), runtime }),
    };
    tracing_subscriber::registry()
        .with(console_layer)
        .with(otel_layer)
        .try_init()
        .map_err(TelemetryError::AlreadyInitialized)?;
    global::set_tracer_provider(tracer_provider);
    global::set_meter_provider(meter_provider);
    crate::metrics::mark_meter_provider_installed();
    tracing::info!(%endpoint, service = %config.service_name, "exporting traces and metrics over OTLP/gRPC");
    Ok(guard)
}

/// The private runtime that hosts the OTLP channels.
fn export_runtime() -> Result<Runtime, TelemetryError> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("medtvt-otlp")
        .enable_all()
        .build()
        .map_err(TelemetryError::ExportRuntime)
}

/// `RUST_LOG`, or [`DEFAULT_FILTER`] when unset or blank.
fn filter_directives_from_env() -> String {
    match std::env::var("RUST_LOG") {
        Ok(value) if !value.trim().is_empty() => value,
        _ => DEFAULT_FILTER.to_owned(),
    }
}

/// Parses `directives`, reporting `rust_log` (what the user wrote) on error.
fn parse_filter(rust_log: &str, directives: &str) -> Result<EnvFilter, TelemetryError> {
    EnvFilter::builder()
        .parse(directives)
        .map_err(|source| TelemetryError::InvalidFilter { value: rust_log.to_owned(), source })
}

/// `service.name` plus the configured attributes (and the SDK's own `telemetry.sdk.*`).
fn resource(config: &TelemetryConfig) -> Resource {
    Resource::builder()
        .with_service_name(config.service_name.clone())
        .with_attributes(config.resource_attributes.iter().map(|(k, v)| KeyValue::new(k.clone(), v.clone())))
        .build()
}

fn tracer_provider(endpoint: &str, resource: Resource) -> Result<SdkTracerProvider, TelemetryError> {
    let exporter = SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .build()
        .map_err(|source| TelemetryError::Exporter { signal: "trace", endpoint: endpoint.to_owned(), source })?;
    Ok(SdkTracerProvider::builder().with_batch_exporter(exporter).with_resource(resource).build())
}

fn meter_provider(
    endpoint: &str,
    resource: Resource,
    config: &TelemetryConfig,
) -> Result<SdkMeterProvider, TelemetryError> {
    let exporter = MetricExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .build()
        .map_err(|source| TelemetryError::Exporter { signal: "metrics", endpoint: endpoint.to_owned(), source })?;
    let reader = PeriodicReader::builder(exporter).with_interval(config.metrics_export_interval).build();
    Ok(SdkMeterProvider::builder().with_reader(reader).with_resource(resource).build())
}

/// The SDK providers [`init`] installed and the runtime their exporters' channels live on.
struct Exporting {
    tracer: SdkTracerProvider,
    meter: SdkMeterProvider,
    runtime: Runtime,
}

/// Blocks until both providers have exported what they hold; runs both even if one fails.
fn flush(tracer: &SdkTracerProvider, meter: &SdkMeterProvider) -> Result<(), TelemetryError> {
    let traces = tracer.force_flush().map_err(|source| TelemetryError::Shutdown { signal: "trace", source });
    let metrics = meter.force_flush().map_err(|source| TelemetryError::Shutdown { signal: "metrics", source });
    traces.and(metrics)
}

/// Blocks until both providers have flushed and stopped their export threads.
fn shutdown(tracer: &SdkTracerProvider, meter: &SdkMeterProvider) -> Result<(), TelemetryError> {
    let traces = tracer.shutdown().map_err(|source| TelemetryError::Shutdown { signal: "trace", source });
    let metrics = meter.shutdown().map_err(|source| TelemetryError::Shutdown { signal: "metrics", source });
    traces.and(metrics)
}

/// Keeps OTLP export running; flushes and shuts the providers down when dropped.
///
/// Prefer `guard.shutdown().await` at the end of an async `main`: it waits on the blocking
/// shutdown from the export runtime's blocking pool (never blocking the caller's executor thread)
/// and returns errors. Dropping the guard does the same shutdown synchronously on the dropping
/// thread — fine at the end of `main` on any runtime flavour or none, since the export does not
/// need the application's runtime — and prints errors to stderr. Either way the flush takes a few
/// milliseconds against a healthy collector and at most the exporter timeout (10 s) against a dead
/// one.
///
/// Without an OTLP endpoint the guard holds nothing and dropping it does nothing.
#[must_use = "dropping the guard immediately shuts OTLP export down"]
pub struct TelemetryGuard {
    exporting: Option<Exporting>,
}

impl TelemetryGuard {
    /// Whether spans and metrics are being exported over OTLP.
    pub fn exports_otlp(&self) -> bool {
        self.exporting.is_some()
    }

    /// Exports everything buffered so far without shutting down (e.g. before a long pause).
    pub async fn flush(&self) -> Result<(), TelemetryError> {
        let Some(exporting) = &self.exporting else {
            return Ok(());
        };
        let (tracer, meter) = (exporting.tracer.clone(), exporting.meter.clone());
        exporting.runtime.spawn_blocking(move || flush(&tracer, &meter)).await?
    }

    /// Flushes and shuts both providers down, waiting for the export to finish.
    pub async fn shutdown(mut self) -> Result<(), TelemetryError> {
        let Some(Exporting { tracer, meter, runtime }) = self.exporting.take() else {
            return Ok(());
        };
        let result = runtime.spawn_blocking(move || shutdown(&tracer, &meter)).await;
        // Not a plain drop: dropping a runtime inside an async context panics.
        runtime.shutdown_background();
        result?
    }
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        let Some(Exporting { tracer, meter, runtime }) = self.exporting.take() else {
            return;
        };
        if let Err(error) = shutdown(&tracer, &meter) {
            eprintln!("medtvt-telemetry: {error}");
        }
        runtime.shutdown_background();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn otlp_filter_silences_the_export_path_but_keeps_our_spans() {
        let filter = parse_filter("info", &format!("info,{EXPORT_PATH_OFF}")).map(|f| f.to_string());
        let Ok(filter) = filter else { panic!("the built-in filter must parse: {filter:?}") };
        for target in ["h2=off", "tonic=off", "opentelemetry_sdk=off"] {
            assert!(filter.contains(target), "{target} missing from {filter}");
        }
    }

    #[test]
    fn a_bad_rust_log_is_reported_with_its_value() {
        match parse_filter("medtvt=lots", "medtvt=lots") {
            Err(TelemetryError::InvalidFilter { value, .. }) => assert_eq!(value, "medtvt=lots"),
            other => panic!("expected InvalidFilter, got {other:?}"),
        }
    }
}
