//! Logs, traces and metrics for every MedTVT process, in one call.
//!
//! [`init`] installs the process's global `tracing` subscriber:
//! - always, a console log on stderr filtered by `RUST_LOG` (default `info`);
//! - when an OTLP endpoint is configured ([`TelemetryConfig::otlp_endpoint`], else the
//!   `OTEL_EXPORTER_OTLP_ENDPOINT` variable), every `tracing` span is also exported as an
//!   OpenTelemetry span over OTLP/gRPC (batch exporter), and the [`metrics::RunMetrics`]
//!   instruments are pushed over OTLP/gRPC every [`TelemetryConfig::metrics_export_interval`]
//!   (5 s by default). Both carry the resource attributes `service.name` = the config's service
//!   name plus [`TelemetryConfig::resource_attributes`] (role, rank, worker, run id).
//!
//! [`init`] may run inside or outside a tokio runtime of either flavour: the OTLP channels get a
//! private one-thread runtime owned by the returned [`TelemetryGuard`], which flushes and shuts
//! everything down when dropped or on `guard.shutdown().await`.
//!
//! The W3C TraceContext propagator is installed globally, and [`propagation`] carries the current
//! span across gRPC calls (client interceptor, server `trace_fn`) and inside messages. How one
//! GRPO step hangs together as traces:
//! - a rollout worker rolls out each lease in a `rollout` span (the root of a trace); the
//!   coordinator's spans for its `FetchWeights` and `SubmitGroups` calls are children of it;
//! - each `RolloutGroup` carries the `rollout` span's `traceparent`
//!   ([`propagation::current_traceparent`]); the coordinator stores it untouched;
//! - the learner trains each group of a step in a `train_group` span whose parent is that
//!   `traceparent` ([`propagation::set_parent_from_traceparent`]), so sampling, submission and
//!   training of a group are one trace across the worker, the coordinator and the learner;
//! - the learner's `train_step` span (parent of the coordinator's `PullTrainingBatch`,
//!   `PublishWeights` and `ReportStep` spans) is a trace of its own, since a step trains groups of
//!   many leases; it and its `train_group` spans are linked both ways (span links).
//!
//! Exported metric names are `medtvt.*` (table in [`metrics`]): `medtvt.reward.mean`,
//! `medtvt.reward.std`, `medtvt.train.loss`, `medtvt.train.kl`, `medtvt.train.clip_fraction`,
//! `medtvt.train.tokens_per_second`, `medtvt.train.step.duration`, `medtvt.train.metric` (learner
//! rank 0, per step); `medtvt.coordinator.prompts_waiting`, `medtvt.coordinator.leased_prompts`,
//! `medtvt.coordinator.queue_depth`, `medtvt.policy.lag` (the coordinator, every reaper tick).
//! Spans and metrics use the instrumentation scope `medtvt`.
//!
//! To look at them, run any OTLP collector with a gRPC receiver on port 4317 (the OpenTelemetry
//! Collector, Jaeger, Grafana's otel-lgtm image) and start the processes with
//! `OTEL_EXPORTER_OTLP_ENDPOINT=http://localhost:4317`. Only plain-text `http://` endpoints are
//! supported (no TLS feature is compiled in).
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use medtvt_telemetry::{init, metrics::RunMetrics, TelemetryConfig};
//! let guard = init(TelemetryConfig::new("medtvt-learner").with_attribute("medtvt.rank", "0"))?;
//! let metrics = RunMetrics::global(); // after init
//! // ... work ...
//! guard.shutdown().await?; // flushes buffered spans and metrics
//! # Ok(()) }
//! ```

mod config;
mod error;
mod init;
pub mod metrics;
pub mod propagation;

pub use config::{TelemetryConfig, DEFAULT_METRICS_EXPORT_INTERVAL, OTLP_ENDPOINT_ENV};
pub use error::TelemetryError;
pub use init::{init, TelemetryGuard};
/// Attribute type of [`metrics::RunMetrics::record_step`], re-exported so callers need no
/// direct `opentelemetry` dependency.
pub use opentelemetry::KeyValue;
