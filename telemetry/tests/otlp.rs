//! End to end against a real OTLP/gRPC receiver: a span made in a gRPC client travels through
//! real request metadata (TraceContextInterceptor -> tonic -> Server::trace_fn(server_span)) to a
//! server span and a handler span, and all three — plus RunMetrics gauges — reach the receiver
//! after `TelemetryGuard::shutdown`, in one trace, parent/child linked, with our resource.
//!
//! `init` installs a process-global subscriber, so this file holds a single test; the Drop path
//! and the no-endpoint path live in their own test binaries for the same reason. The spans are
//! info-level: run with RUST_LOG unset or at info or finer.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{gauge_values, string_attribute, Collector};
use medtvt_telemetry::metrics::RunMetrics;
use medtvt_telemetry::propagation::{server_span, TraceContextInterceptor};
use medtvt_telemetry::{init, KeyValue, TelemetryConfig};
use opentelemetry_proto::tonic::collector::logs::v1::logs_service_client::LogsServiceClient;
use opentelemetry_proto::tonic::collector::logs::v1::logs_service_server::{LogsService, LogsServiceServer};
use opentelemetry_proto::tonic::collector::logs::v1::{ExportLogsServiceRequest, ExportLogsServiceResponse};
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status};
use tracing::Instrument as _;

type TestResult = Result<(), Box<dyn std::error::Error>>;

/// Any gRPC service will do as "the application"; this one only opens a span of its own.
struct App;

#[tonic::async_trait]
impl LogsService for App {
    async fn export(
        &self,
        _: Request<ExportLogsServiceRequest>,
    ) -> Result<Response<ExportLogsServiceResponse>, Status> {
        tracing::info_span!("handle_export").in_scope(|| tracing::info!("handled"));
        Ok(Response::new(ExportLogsServiceResponse { partial_success: None }))
    }
}

/// One traced gRPC round trip from a `client_call` span to the app server, then the server
/// stopped so its request span has surely ended.
async fn traced_round_trip() -> TestResult {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .trace_fn(server_span)
            .add_service(LogsServiceServer::new(App))
            .serve_with_incoming_shutdown(TcpIncoming::from(listener), async {
                let _ = stopped.await;
            }),
    );
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?.connect().await?;
    let mut client = LogsServiceClient::with_interceptor(channel, TraceContextInterceptor);
    client.export(ExportLogsServiceRequest::default()).instrument(tracing::info_span!("client_call")).await?;
    drop(client);
    let _ = stop.send(());
    server.await??;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_and_metrics_reach_a_real_otlp_receiver_linked_across_grpc() -> TestResult {
    let collector = Collector::start().await;
    let config = TelemetryConfig::new("medtvt-otlp-test")
        .with_otlp_endpoint(collector.endpoint())
        .with_attribute("medtvt.role", "test")
        .with_attribute("medtvt.run_id", "run-42")
        // Longer than the test: the only metric export is the one shutdown forces.
        .with_metrics_export_interval(Duration::from_secs(3600));
    let guard = init(config)?;
    assert!(guard.exports_otlp());

    traced_round_trip().await?;
    let metrics = RunMetrics::global();
    assert!(metrics.is_enabled(), "init installed a meter provider, so the global handle must record");
    let step = BTreeMap::from([("loss".to_owned(), 0.5), ("reward_mean".to_owned(), 0.25)]);
    metrics.record_step(&step, &[KeyValue::new("medtvt.stage", "grpo")]);
    metrics.set_queue_depth(3);

    guard.shutdown().await?;
    let received = collector.stop().await;

    let client = received.span_named("client_call");
    let server = received.span_named("opentelemetry.proto.collector.logs.v1.LogsService/Export");
    let handler = received.span_named("handle_export");
    assert_eq!(client.span.trace_id.len(), 16);
    assert!(client.span.parent_span_id.is_empty(), "client_call is the root");
    assert_eq!(server.span.trace_id, client.span.trace_id, "the trace id crossed the gRPC hop");
    assert_eq!(server.span.parent_span_id, client.span.span_id, "the server span is the client span's child");
    assert_eq!(server.span.kind, SpanKind::Server as i32);
    assert_eq!(string_attribute(&server.span.attributes, "rpc.method"), Some("Export"));
    assert_eq!(handler.span.trace_id, client.span.trace_id);
    assert_eq!(handler.span.parent_span_id, server.span.span_id, "the handler span nests in the request span");
    for span in [&client, &server, &handler] {
        let attributes = span.resource.map(|r| r.attributes.as_slice()).unwrap_or_default();
        assert_eq!(string_attribute(attributes, "service.name"), Some("medtvt-otlp-test"));
        assert_eq!(string_attribute(attributes, "medtvt.role"), Some("test"));
        assert_eq!(string_attribute(attributes, "medtvt.run_id"), Some("run-42"));
    }

    let (resource, loss) = received.metric_named("medtvt.train.loss");
    assert_eq!(gauge_values(loss), vec![0.5]);
    let attributes = resource.map(|r| r.attributes.as_slice()).unwrap_or_default();
    assert_eq!(string_attribute(attributes, "service.name"), Some("medtvt-otlp-test"));
    assert_eq!(gauge_values(received.metric_named("medtvt.reward.mean").1), vec![0.25]);
    assert_eq!(gauge_values(received.metric_named("medtvt.coordinator.queue_depth").1), vec![3.0]);
    Ok(())
}
