//! Carrying a trace across gRPC calls with W3C Trace Context (`traceparent`/`tracestate`).
//!
//! Client side: wrap a tonic client with [`TraceContextInterceptor`] (or call
//! [`inject_current_context`] on a request's metadata); the current `tracing` span's trace id and
//! span id travel in the request headers.
//!
//! Server side: pass [`server_span`] to `tonic::transport::Server::builder().trace_fn(..)` so
//! every request runs in a span parented to the caller's, or call [`set_parent`] on a span of your
//! own with the request's metadata before entering it.
//!
//! Inside messages: a trace can also outlive the call that carried it. A rollout group is sampled
//! under a worker's span, stored by the coordinator and trained by a learner later, in another
//! call. [`current_traceparent`] gives the current span's W3C `traceparent` string to put in such
//! a message, and [`set_parent_from_traceparent`] / [`add_link_to_traceparent`] turn it back into
//! a parent or a span link on the receiving side; [`add_link_to_span`] links two local spans of
//! different traces (a learner's step span and its per-group spans).
//!
//! All of this uses the global propagator [`crate::init`] installs and the OTel context that
//! `tracing-opentelemetry` keeps per span; in a process without an OTLP endpoint there is no such
//! context, so nothing is injected and no parent is set (calls still work, untraced).

use std::collections::HashMap;

use opentelemetry::propagation::{Extractor, Injector};
use opentelemetry::trace::TraceContextExt as _;
use opentelemetry::{global, Context};
use tonic::codegen::http;
use tonic::metadata::{MetadataKey, MetadataMap, MetadataValue};
use tonic::service::Interceptor;
use tonic::{Request, Status};
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

/// The W3C Trace Context field naming the parent span.
const TRACEPARENT: &str = "traceparent";

/// Writes the current `tracing` span's OTel context into outgoing gRPC metadata.
pub fn inject_current_context(metadata: &mut MetadataMap) {
    inject_context(&Span::current().context(), metadata);
}

/// Writes `context` into outgoing gRPC metadata (nothing when it holds no valid span).
pub fn inject_context(context: &Context, metadata: &mut MetadataMap) {
    global::get_text_map_propagator(|propagator| propagator.inject_context(context, &mut MetadataInjector(metadata)));
}

/// The remote parent context carried by incoming gRPC metadata (empty when there is none).
pub fn extract_parent(metadata: &MetadataMap) -> Context {
    extract_from_headers(metadata.as_ref())
}

/// Makes the caller's span (from `metadata`) the parent of `span`. Call it before `span` is first
/// entered: a span's OTel parent is fixed when it starts. Returns whether a parent was attached;
/// `false` when the metadata held no valid trace context, when no OTel layer is installed, or
/// when the span had already started (the last is logged as a warning, being a bug).
pub fn set_parent(span: &Span, metadata: &MetadataMap) -> bool {
    set_parent_context(span, extract_parent(metadata))
}

/// The current `tracing` span's W3C `traceparent` value (`00-<trace id>-<span id>-<flags>`), to
/// carry the trace inside a message; `None` when there is no valid span context (no OTLP export).
pub fn current_traceparent() -> Option<String> {
    let mut fields = HashMap::new();
    global::get_text_map_propagator(|propagator| propagator.inject_context(&Span::current().context(), &mut fields));
    fields.remove(TRACEPARENT)
}

/// Adds to `span` a link to the span a `traceparent` value names (for work that depends on an
/// item of another trace without being its child). Returns whether a link was added.
pub fn add_link_to_traceparent(span: &Span, traceparent: &str) -> bool {
    add_link_to_context(span, &context_from_traceparent(traceparent))
}

/// Adds to `span` a link to the local span `to` (which starts if it had not). Returns whether a
/// link was added (`false` without an OTel layer).
pub fn add_link_to_span(span: &Span, to: &Span) -> bool {
    add_link_to_context(span, &to.context())
}

fn add_link_to_context(span: &Span, context: &Context) -> bool {
    let target = context.span();
    let span_context = target.span_context();
    if !span_context.is_valid() {
        return false;
    }
    span.add_link(span_context.clone());
    true
}

/// Makes the span named by a `traceparent` value (see [`current_traceparent`]) the parent of
/// `span`; like [`set_parent`], before `span` is first entered. Returns whether a parent was
/// attached (`false` for an empty or malformed value, or without an OTel layer).
pub fn set_parent_from_traceparent(span: &Span, traceparent: &str) -> bool {
    set_parent_context(span, context_from_traceparent(traceparent))
}

fn context_from_traceparent(traceparent: &str) -> Context {
    let fields = HashMap::from([(TRACEPARENT.to_owned(), traceparent.to_owned())]);
    global::get_text_map_propagator(|propagator| propagator.extract(&fields))
}

/// A span for one incoming gRPC request, parented to the caller's span; for
/// `Server::builder().trace_fn(server_span)`. Its OTel name is the gRPC path without the leading
/// slash (`medtvt.Coordinator/LeaseBatch`), its kind `server`.
pub fn server_span(request: &http::Request<()>) -> Span {
    let path = request.uri().path();
    let (service, method) = path.trim_start_matches('/').split_once('/').unwrap_or((path, ""));
    let span = tracing::info_span!(
        "grpc.request",
        otel.name = %path.trim_start_matches('/'),
        otel.kind = "server",
        rpc.system = "grpc",
        rpc.service = %service,
        rpc.method = %method,
    );
    set_parent_context(&span, extract_from_headers(request.headers()));
    span
}

/// A tonic [`Interceptor`] that injects the current span's trace context into every request:
/// `MyClient::with_interceptor(channel, TraceContextInterceptor)`.
#[derive(Debug, Clone, Copy, Default)]
pub struct TraceContextInterceptor;

impl Interceptor for TraceContextInterceptor {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        inject_current_context(request.metadata_mut());
        Ok(request)
    }
}

fn extract_from_headers(headers: &http::HeaderMap) -> Context {
    global::get_text_map_propagator(|propagator| propagator.extract(&HeaderExtractor(headers)))
}

fn set_parent_context(span: &Span, parent: Context) -> bool {
    if !parent.span().span_context().is_valid() {
        return false;
    }
    match span.set_parent(parent) {
        Ok(()) => true,
        Err(tracing_opentelemetry::SetParentError::AlreadyStarted) => {
            tracing::warn!("set_parent called on a span that already started; the remote parent was ignored");
            false
        }
        Err(_) => false,
    }
}

/// Writes propagation fields as ASCII metadata; a value that is not valid metadata is dropped
/// (the propagator only produces ASCII, so this happens only for a corrupt incoming tracestate).
struct MetadataInjector<'a>(&'a mut MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        let (Ok(key), Ok(value)) = (MetadataKey::from_bytes(key.as_bytes()), MetadataValue::try_from(value.as_str()))
        else {
            tracing::debug!(key, "dropping a trace-context field that is not valid gRPC metadata");
            return;
        };
        self.0.insert(key, value);
    }
}

/// Reads propagation fields from request headers (gRPC metadata is HTTP/2 headers).
struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|value| value.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

#[cfg(test)]
mod tests {
    use opentelemetry::trace::{SpanId, SpanKind, TraceId, TracerProvider as _};
    use opentelemetry_sdk::propagation::TraceContextPropagator;
    use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
    use tracing_subscriber::layer::SubscriberExt as _;

    use super::*;

    /// Runs `f` under a thread-local subscriber whose OTel layer exports synchronously into
    /// memory, and returns the spans that ended. No global subscriber, so tests can run in
    /// parallel; the global propagator is set to what `init` sets.
    fn with_recorded_spans(f: impl FnOnce()) -> Vec<SpanData> {
        global::set_text_map_propagator(TraceContextPropagator::new());
        let exporter = InMemorySpanExporter::default();
        let provider = SdkTracerProvider::builder().with_simple_exporter(exporter.clone()).build();
        let subscriber =
            tracing_subscriber::registry().with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        tracing::subscriber::with_default(subscriber, f);
        match exporter.get_finished_spans() {
            Ok(spans) => spans,
            Err(error) => panic!("reading the in-memory exporter: {error}"),
        }
    }

    fn ids(context: &Context) -> (TraceId, SpanId) {
        let span = context.span();
        (span.span_context().trace_id(), span.span_context().span_id())
    }

    #[test]
    fn inject_then_extract_round_trips_the_current_span() {
        let mut seen = None;
        with_recorded_spans(|| {
            let client = tracing::info_span!("client");
            let _entered = client.enter();
            let mut metadata = MetadataMap::new();
            inject_current_context(&mut metadata);
            let traceparent = metadata.get("traceparent").and_then(|v| v.to_str().ok()).map(str::to_owned);
            seen = Some((ids(&client.context()), traceparent, ids(&extract_parent(&metadata))));
        });
        let Some(((trace_id, span_id), traceparent, extracted)) = seen else { panic!("closure did not run") };
        assert_ne!(trace_id, TraceId::INVALID);
        assert_eq!(traceparent, Some(format!("00-{trace_id}-{span_id}-01")));
        assert_eq!(extracted, (trace_id, span_id));
    }

    #[test]
    fn set_parent_links_the_server_span_to_the_client_span() {
        let mut attached = (false, false);
        let spans = with_recorded_spans(|| {
            let mut metadata = MetadataMap::new();
            {
                let client = tracing::info_span!("client");
                let _entered = client.enter();
                TraceContextInterceptor.call(Request::new(())).map(|req| metadata = req.metadata().clone()).ok();
            }
            let server = tracing::info_span!("server");
            attached.0 = set_parent(&server, &metadata);
            server.in_scope(|| {});
            // A second attempt after the span started must report failure.
            attached.1 = set_parent(&server, &metadata);
        });
        assert_eq!(attached, (true, false));
        let [client, server] = ["client", "server"].map(|name| match spans.iter().find(|s| s.name == name) {
            Some(span) => span,
            None => panic!("no {name} span among {:?}", spans.iter().map(|s| &s.name).collect::<Vec<_>>()),
        });
        assert_eq!(server.span_context.trace_id(), client.span_context.trace_id());
        assert_eq!(server.parent_span_id, client.span_context.span_id());
    }

    #[test]
    fn server_span_is_named_after_the_grpc_method_and_parented_from_headers() {
        let remote_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
        let remote_span = "00f067aa0ba902b7";
        let spans = with_recorded_spans(|| {
            let request = http::Request::builder()
                .uri("http://coordinator/medtvt.Coordinator/LeaseBatch")
                .header("traceparent", format!("00-{remote_trace}-{remote_span}-01"))
                .body(());
            let Ok(request) = request else { panic!("building the test request failed") };
            server_span(&request).in_scope(|| {});
        });
        let [span] = spans.as_slice() else { panic!("expected one span, got {spans:?}") };
        assert_eq!(span.name, "medtvt.Coordinator/LeaseBatch");
        assert_eq!(span.span_kind, SpanKind::Server);
        assert_eq!(span.span_context.trace_id().to_string(), remote_trace);
        assert_eq!(span.parent_span_id.to_string(), remote_span);
        assert!(span.parent_span_is_remote);
    }

    #[test]
    fn a_traceparent_carried_in_a_message_parents_and_links_later_spans() {
        let mut carried = None;
        let mut attached = (false, false, false);
        let spans = with_recorded_spans(|| {
            let worker = tracing::info_span!("worker");
            carried = worker.in_scope(current_traceparent);
            drop(worker);
            let Some(traceparent) = carried.as_deref() else {
                return;
            };
            let step = tracing::info_span!("step");
            let group = tracing::info_span!(parent: None, "group");
            attached = (
                set_parent_from_traceparent(&group, traceparent),
                add_link_to_traceparent(&step, traceparent),
                add_link_to_span(&group, &step),
            );
            group.in_scope(|| {});
            step.in_scope(|| {});
        });
        assert_eq!(attached, (true, true, true));
        let [worker, step, group] = ["worker", "step", "group"]
            .map(|name| spans.iter().find(|s| s.name == name).unwrap_or_else(|| panic!("no {name} span")));
        let worker_id = worker.span_context.span_id();
        assert_eq!(carried, Some(format!("00-{}-{worker_id}-01", worker.span_context.trace_id())));
        // The group span is the worker span's child, in its trace ...
        assert_eq!(group.span_context.trace_id(), worker.span_context.trace_id());
        assert_eq!(group.parent_span_id, worker_id);
        // ... and linked to the step span, a trace of its own that links back to the worker.
        assert_ne!(step.span_context.trace_id(), worker.span_context.trace_id());
        let linked =
            |span: &SpanData| -> Vec<SpanId> { span.links.iter().map(|link| link.span_context.span_id()).collect() };
        assert_eq!(linked(group), vec![step.span_context.span_id()]);
        assert_eq!(linked(step), vec![worker_id]);
    }

    #[test]
    fn an_empty_or_malformed_traceparent_attaches_nothing() {
        let mut outcome = None;
        with_recorded_spans(|| {
            let span = tracing::info_span!("learner");
            outcome = Some((
                current_traceparent(),
                set_parent_from_traceparent(&span, ""),
                set_parent_from_traceparent(&span, "00-zz-yy-01"),
                add_link_to_traceparent(&span, "not a traceparent"),
            ));
        });
        assert_eq!(outcome, Some((None, false, false, false)));
    }

    #[test]
    fn nothing_is_injected_or_attached_without_trace_context() {
        let mut outcome = None;
        with_recorded_spans(|| {
            let mut metadata = MetadataMap::new();
            // No span is current: nothing to propagate.
            inject_current_context(&mut metadata);
            let server = tracing::info_span!("server");
            outcome = Some((metadata.is_empty(), set_parent(&server, &metadata)));
        });
        assert_eq!(outcome, Some((true, false)));
    }
}
