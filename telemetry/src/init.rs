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
//! dedicated OS thread (the SDK 0.33 default; the tokio-task variants are still experimental),
//! while the tonic channel they export through lives on the tokio runtime that was current when
//! [`init`] ran. That runtime must therefore outlive the guard, and flushing must never block
//! the thread the runtime needs to make progress — hence the care in [`TelemetryGuard`].

use opentelemetry::trace::TracerProvider as _;
use opentelemetry::{global, KeyValue};
use opentelemetry_otlp::{MetricExporter, SpanExporter, WithExportConfig};
use opentelemetry_sdk::metrics::{PeriodicReader, SdkMeterProvider};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use tokio::runtime::{Handle, RuntimeFlavor};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::{TelemetryConfig, TelemetryError};

/// Console filter when `RUST_LOG` is unset or blank.
const DEFAULT_FILTER: &str = "info";

/// Appended to the OTLP layer's filter: spans of the export path itself (the gRPC stack and the
/// SDK) would otherwise be exported, creating more export traffic, in an endless loop.
const EXPORT_PATH_OFF: &str =
    "h2=off,hyper=off,hyper_util=off,tower=off,tonic=off,opentelemetry=off,opentelemetry_sdk=off,opentelemetry_otlp=off";

/// The OTel instrumentation scope our spans and metrics are reported under.
pub(crate) const INSTRUMENTATION_SCOPE: &str = "medtvt";

/// Installs the global tracing subscriber, and OTLP span and metric export when an endpoint is
/// configured (in [`TelemetryConfig::otlp_endpoint`] or `OTEL_EXPORTER_OTLP_ENDPOINT`).
///
/// Call it once per process, early, from inside the tokio runtime when exporting (the OTLP
/// channel is spawned on the current runtime). Keep the returned guard alive until the end of
/// `main`; dropping it (or [`TelemetryGuard::shutdown`]) flushes what is buffered.
pub fn init(config: TelemetryConfig) -> Result<TelemetryGuard, TelemetryError> {
    config.validate()?;
    let endpoint = config.resolved_otlp_endpoint()?;
    let filter_directives = filter_directives_from_env();
    let console_layer = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_filter(parse_filter(&filter_directives, &filter_directives)?);

    global::set_text_map_propagator(TraceContextPropagator::new());
    let Some(endpoint) = endpoint else {
        tracing_subscriber::registry()
            .with(console_layer)
            .try_init()
            .map_err(TelemetryError::AlreadyInitialized)?;
        return Ok(TelemetryGuard { providers: None });
    };

    if Handle::try_current().is_err() {
        return Err(TelemetryError::NoRuntime { endpoint });
    }
    let otel_filter = parse_filter(
        &filter_directives,
        &format!("{filter_directives},{EXPORT_PATH_OFF}"),
    )?;
    let resource = resource(&config);
    let tracer_provider = tracer_provider(&endpoint, resource.clone())?;
    let meter_provider = meter_provider(&endpoint, resource, &config)?;
    let otel_layer = tracing_opentelemetry::layer()
        .with_tracer(tracer_provider.tracer(INSTRUMENTATION_SCOPE))
        .with_filter(otel_filter);
    // The guard owns the providers before the fallible install, so a failure still shuts them down.
    let guard = TelemetryGuard {
        providers: Some(Providers {
            tracer: tracer_provider.clone(),
            meter: meter_provider.clone(),
        }),
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

/// `RUST_LOG`, or `info` when unset or blank.
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
        .map_err(|source| TelemetryError::InvalidFilter {
            value: rust_log.to_owned(),
            source,
        })
}

/// `service.name` plus the configured attributes (and the SDK's own `telemetry.sdk.*`).
fn resource(config: &TelemetryConfig) -> Resource {
    Resource::builder()
        .with_service_name(config.service_name.clone())
        .with_attributes(
            config
                .resource_attributes
                .iter()
                .map(|(k, v)| KeyValue::new(k.clone(), v.clone())),
        )
        .build()
}

fn tracer_provider(
    endpoint: &str,
    resource: Resource,
) -> Result<SdkTracerProvider, TelemetryError> {
    let exporter = SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .build()
        .map_err(|source| TelemetryError::Exporter {
            signal: "trace",
            endpoint: endpoint.to_owned(),
            source,
        })?;
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build())
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
        .map_err(|source| TelemetryError::Exporter {
            signal: "metrics",
            endpoint: endpoint.to_owned(),
            source,
        })?;
    let reader = PeriodicReader::builder(exporter)
        .with_interval(config.metrics_export_interval)
        .build();
    Ok(SdkMeterProvider::builder()
        .with_reader(reader)
        .with_resource(resource)
        .build())
}

/// The SDK providers [`init`] installed.
struct Providers {
    tracer: SdkTracerProvider,
    meter: SdkMeterProvider,
}

impl Providers {
    /// Blocks until both providers have exported what they hold; runs both even if one fails.
    fn flush(&self) -> Result<(), TelemetryError> {
        let traces = self
            .tracer
            .force_flush()
            .map_err(|source| TelemetryError::Shutdown {
                signal: "trace",
                source,
            });
        let metrics = self
            .meter
            .force_flush()
            .map_err(|source| TelemetryError::Shutdown {
                signal: "metrics",
                source,
            });
        traces.and(metrics)
    }

    /// Blocks until both providers have flushed and stopped their export threads.
    fn shutdown(&self) -> Result<(), TelemetryError> {
        let traces = self
            .tracer
            .shutdown()
            .map_err(|source| TelemetryError::Shutdown {
                signal: "trace",
                source,
            });
        let metrics = self
            .meter
            .shutdown()
            .map_err(|source| TelemetryError::Shutdown {
                signal: "metrics",
                source,
            });
        traces.and(metrics)
    }
}

/// Keeps OTLP export running; flushes and shuts the providers down when dropped.
///
/// Prefer `guard.shutdown().await` at the end of an async `main`: it runs the blocking shutdown
/// on tokio's blocking pool and reports errors. Dropping the guard does the same best effort and
/// prints errors to stderr:
/// - on a multi-thread runtime's thread it shuts down inside `tokio::task::block_in_place`, so
///   the runtime keeps driving the export channel meanwhile (this is what `#[tokio::main]` gets);
/// - outside any runtime it shuts down on the current thread (the runtime that ran [`init`] must
///   still be alive, e.g. not yet dropped after `Runtime::block_on` returned);
/// - on a current-thread runtime, blocking would starve the export channel, so the shutdown is
///   handed to the blocking pool and not waited for: use [`TelemetryGuard::shutdown`] there.
///
/// Without an OTLP endpoint the guard holds nothing and dropping it does nothing.
#[must_use = "dropping the guard immediately shuts OTLP export down"]
pub struct TelemetryGuard {
    providers: Option<Providers>,
}

impl TelemetryGuard {
    /// Whether spans and metrics are being exported over OTLP.
    pub fn exports_otlp(&self) -> bool {
        self.providers.is_some()
    }

    /// Exports everything buffered so far without shutting down (e.g. before a long pause).
    /// Runs on tokio's blocking pool, so it is safe on any runtime flavour.
    pub async fn flush(&self) -> Result<(), TelemetryError> {
        let Some(providers) = &self.providers else {
            return Ok(());
        };
        let tracer = providers.tracer.clone();
        let meter = providers.meter.clone();
        tokio::task::spawn_blocking(move || Providers { tracer, meter }.flush()).await?
    }

    /// Flushes and shuts both providers down, waiting for the export to finish.
    /// Runs on tokio's blocking pool, so it is safe on any runtime flavour.
    pub async fn shutdown(mut self) -> Result<(), TelemetryError> {
        let Some(providers) = self.providers.take() else {
            return Ok(());
        };
        tokio::task::spawn_blocking(move || providers.shutdown()).await?
    }
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        let Some(providers) = self.providers.take() else {
            return;
        };
        let report = |result: Result<(), TelemetryError>| {
            if let Err(error) = result {
                eprintln!("medtvt-telemetry: {error}");
            }
        };
        match Handle::try_current() {
            Err(_) => report(providers.shutdown()),
            Ok(handle) if handle.runtime_flavor() == RuntimeFlavor::CurrentThread => {
                drop(handle.spawn_blocking(move || report(providers.shutdown())));
            }
            Ok(_) => report(tokio::task::block_in_place(|| providers.shutdown())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn otlp_filter_silences_the_export_path_but_keeps_our_spans() {
        let filter =
            parse_filter("info", &format!("info,{EXPORT_PATH_OFF}")).map(|f| f.to_string());
        let Ok(filter) = filter else {
            panic!("the built-in filter must parse: {filter:?}")
        };
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
