//! The crate's single error type: every way setting up, running or shutting down telemetry can
//! fail, with the value or signal a user needs to fix it.

use opentelemetry_otlp::ExporterBuildError;
use opentelemetry_sdk::error::OTelSdkError;

/// Errors from [`crate::init`] and [`crate::TelemetryGuard`].
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// A [`crate::TelemetryConfig`] field holds a value that cannot work.
    #[error("telemetry config field `{field}` {problem}")]
    InvalidConfig { field: &'static str, problem: String },

    /// `RUST_LOG` is set but is not a valid `tracing_subscriber::EnvFilter` directive list.
    #[error("RUST_LOG={value:?} is not a valid log filter (e.g. `info,medtvt_coordinator=debug`): {source}")]
    InvalidFilter {
        value: String,
        #[source]
        source: tracing_subscriber::filter::ParseError,
    },

    /// The private tokio runtime that hosts the OTLP channels could not be started.
    #[error("starting the OTLP export runtime (thread medtvt-otlp): {0}")]
    ExportRuntime(#[source] std::io::Error),

    /// The OTLP exporter for one signal could not be built (bad endpoint, bad OTEL_* variable).
    #[error("building the OTLP {signal} exporter for {endpoint}: {source}")]
    Exporter {
        signal: &'static str,
        endpoint: String,
        #[source]
        source: ExporterBuildError,
    },

    /// A global tracing subscriber (or `log` logger) is already installed in this process.
    #[error("a global tracing subscriber is already installed; call medtvt_telemetry::init once per process: {0}")]
    AlreadyInitialized(#[source] tracing_subscriber::util::TryInitError),

    /// Flushing or shutting down a provider failed; buffered spans or metrics may be lost.
    #[error("flushing/shutting down the OpenTelemetry {signal} provider: {source}")]
    Shutdown {
        signal: &'static str,
        #[source]
        source: OTelSdkError,
    },

    /// The blocking task that ran the shutdown panicked or was cancelled.
    #[error("the telemetry shutdown task did not complete: {0}")]
    ShutdownTask(#[from] tokio::task::JoinError),
}
