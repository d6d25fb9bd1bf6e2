//! A real OTLP/gRPC receiver for the integration tests: the generated TraceService and
//! MetricsService servers from `opentelemetry-proto`, storing every request they receive, on an
//! ephemeral 127.0.0.1 port. It stands in for an OpenTelemetry Collector.

#![allow(dead_code)] // each test binary uses a different part

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
    MetricsService, MetricsServiceServer,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{ExportMetricsServiceRequest, ExportMetricsServiceResponse};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, KeyValue};
use opentelemetry_proto::tonic::metrics::v1::{metric, number_data_point, Metric};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::Span;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status};

/// Everything the receiver got, in arrival order.
#[derive(Default)]
pub struct Received {
    pub traces: Vec<ExportTraceServiceRequest>,
    pub metrics: Vec<ExportMetricsServiceRequest>,
}

#[derive(Clone, Default)]
struct Store(Arc<Mutex<Received>>);

impl Store {
    fn with<T>(&self, f: impl FnOnce(&mut Received) -> T) -> T {
        match self.0.lock() {
            Ok(mut received) => f(&mut received),
            Err(poisoned) => f(&mut poisoned.into_inner()),
        }
    }
}

#[tonic::async_trait]
impl TraceService for Store {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        self.with(|r| r.traces.push(request.into_inner()));
        Ok(Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

#[tonic::async_trait]
impl MetricsService for Store {
    async fn export(
        &self,
        request: Request<ExportMetricsServiceRequest>,
    ) -> Result<Response<ExportMetricsServiceResponse>, Status> {
        self.with(|r| r.metrics.push(request.into_inner()));
        Ok(Response::new(ExportMetricsServiceResponse { partial_success: None }))
    }
}

/// A running receiver; [`Collector::stop`] shuts the server down and hands back what it got.
pub struct Collector {
    pub addr: SocketAddr,
    store: Store,
    stop: oneshot::Sender<()>,
    server: JoinHandle<Result<(), tonic::transport::Error>>,
}

impl Collector {
    pub async fn start() -> Collector {
        let listener = match TcpListener::bind("127.0.0.1:0").await {
            Ok(listener) => listener,
            Err(error) => panic!("binding the test collector: {error}"),
        };
        let addr = match listener.local_addr() {
            Ok(addr) => addr,
            Err(error) => panic!("reading the test collector's address: {error}"),
        };
        let store = Store::default();
        let (stop, stopped) = oneshot::channel::<()>();
        let server = tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(TraceServiceServer::new(store.clone()))
                .add_service(MetricsServiceServer::new(store.clone()))
                .serve_with_incoming_shutdown(TcpIncoming::from(listener), async {
                    let _ = stopped.await;
                }),
        );
        Collector { addr, store, stop, server }
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub async fn stop(self) -> Received {
        let _ = self.stop.send(());
        match self.server.await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => panic!("the test collector failed: {error}"),
            Err(error) => panic!("the test collector task failed: {error}"),
        }
        self.store.with(std::mem::take)
    }
}

/// A received span with the resource it came with.
pub struct ReceivedSpan<'a> {
    pub resource: Option<&'a Resource>,
    pub span: &'a Span,
}

impl Received {
    pub fn spans(&self) -> Vec<ReceivedSpan<'_>> {
        self.traces
            .iter()
            .flat_map(|request| &request.resource_spans)
            .flat_map(|rs| {
                rs.scope_spans
                    .iter()
                    .flat_map(|ss| &ss.spans)
                    .map(|span| ReceivedSpan { resource: rs.resource.as_ref(), span })
            })
            .collect()
    }

    pub fn span_named(&self, name: &str) -> ReceivedSpan<'_> {
        let spans = self.spans();
        let names: Vec<String> = spans.iter().map(|s| s.span.name.clone()).collect();
        match spans.into_iter().find(|s| s.span.name == name) {
            Some(span) => span,
            None => panic!("the collector got no span named {name:?}; it got {names:?}"),
        }
    }

    /// The metric named `name` with the resource it came with (the last one received).
    pub fn metric_named(&self, name: &str) -> (Option<&Resource>, &Metric) {
        let found = self
            .metrics
            .iter()
            .flat_map(|request| &request.resource_metrics)
            .flat_map(|rm| rm.scope_metrics.iter().flat_map(|sm| &sm.metrics).map(move |m| (rm.resource.as_ref(), m)))
            .rev()
            .find(|(_, m)| m.name == name);
        match found {
            Some(found) => found,
            None => panic!("the collector got no metric named {name:?}"),
        }
    }
}

/// The value of a string attribute.
pub fn string_attribute<'a>(attributes: &'a [KeyValue], key: &str) -> Option<&'a str> {
    attributes.iter().find(|kv| kv.key == key).and_then(|kv| match &kv.value {
        Some(AnyValue { value: Some(any_value::Value::StringValue(s)) }) => Some(s.as_str()),
        _ => None,
    })
}

/// The value of each data point of a gauge, as f64 (int points converted).
pub fn gauge_values(metric: &Metric) -> Vec<f64> {
    let Some(metric::Data::Gauge(gauge)) = &metric.data else {
        panic!("{} is not a gauge: {:?}", metric.name, metric.data)
    };
    gauge
        .data_points
        .iter()
        .filter_map(|point| match point.value {
            Some(number_data_point::Value::AsDouble(v)) => Some(v),
            Some(number_data_point::Value::AsInt(v)) => Some(v as f64),
            None => None,
        })
        .collect()
}
