//! Starting and stopping the coordinator: bind the listener (so the real port is known before
//! serving), add the health and Coordinator services, run the reaper that expires leases and
//! silent workers, and stop gracefully on the caller's shutdown signal or once a requested
//! shutdown has drained every job. With a run directory, `bind` resumes the run recorded there
//! (see `store.rs`); with a certificate and key, gRPC is served over TLS. Each reaper tick also
//! records the running GRPO job's pipeline gauges ([`state::PipelineGauges`]) on the
//! `medtvt.coordinator.*` and `medtvt.policy.lag` OTel instruments.

use crate::error::CoordinatorError;
use crate::events::EventLog;
use crate::ids::JobId;
use crate::interceptor::IncomingCall;
use crate::service::{CoordinatorService, ServiceOptions, Shared};
use crate::state::{self, PipelineGauges, RunState, StateOptions};
use crate::store::RunStore;
use crate::tls::TlsFiles;
use medtvt_proto::CoordinatorServer;
use medtvt_telemetry::metrics::RunMetrics;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Server, ServerTlsConfig};
use tonic_health::ServingStatus;

/// Everything configurable about a coordinator process.
#[derive(Clone)]
pub struct ServerOptions {
    /// Require `authorization: Bearer <token>` on every Coordinator call.
    pub auth_token: Option<String>,
    /// Largest gRPC message accepted or sent.
    pub max_message_bytes: usize,
    /// Where `events.jsonl` and the durable run state (`coordinator.sqlite`, `weights/`) go; a
    /// run recorded there before is resumed.
    pub run_dir: Option<PathBuf>,
    /// Serve gRPC over TLS with this certificate and key.
    pub tls: Option<TlsFiles>,
    /// How often leases and heartbeats are checked.
    pub reap_interval: Duration,
    /// After a drained shutdown request, how long processes get to see `shutdown` before the
    /// server stops.
    pub shutdown_grace: Duration,
    /// Once stopping, how long in-flight calls and open connections get before they are cut
    /// (a client that never answers must not keep the coordinator alive).
    pub drain_timeout: Duration,
    pub state: StateOptions,
    pub service: ServiceOptions,
    /// Where the pipeline gauges go. The default, taken when the options are made, is the
    /// global meter provider `medtvt_telemetry::init` installed (a no-op without OTLP).
    pub metrics: RunMetrics,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            auth_token: None,
            max_message_bytes: medtvt_proto::DEFAULT_MAX_MESSAGE_BYTES,
            run_dir: None,
            tls: None,
            reap_interval: Duration::from_millis(100),
            shutdown_grace: Duration::from_secs(3),
            drain_timeout: Duration::from_secs(5),
            state: StateOptions::default(),
            service: ServiceOptions::default(),
            metrics: RunMetrics::global(),
        }
    }
}

impl std::fmt::Debug for ServerOptions {
    // The token is never printed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerOptions")
            .field("auth_token", &self.auth_token.as_ref().map(|_| "<redacted>"))
            .field("max_message_bytes", &self.max_message_bytes)
            .field("run_dir", &self.run_dir)
            .field("tls", &self.tls)
            .finish_non_exhaustive()
    }
}

/// A bound, not yet serving coordinator.
pub struct Coordinator {
    listener: TcpListener,
    local_addr: SocketAddr,
    shared: Arc<Shared>,
    stop_tx: watch::Sender<bool>,
    tls: Option<ServerTlsConfig>,
    resumed: bool,
    options: ServerOptions,
}

impl Coordinator {
    pub async fn bind(addr: SocketAddr, options: ServerOptions) -> Result<Self, CoordinatorError> {
        let listener = TcpListener::bind(addr).await.map_err(|source| CoordinatorError::Bind { addr, source })?;
        let local_addr = listener.local_addr().map_err(|source| CoordinatorError::Bind { addr, source })?;
        let tls = options.tls.as_ref().map(TlsFiles::load).transpose()?;
        let events = EventLog::open(options.run_dir.as_deref())?;
        let (store, resumed) = match &options.run_dir {
            Some(dir) => {
                let (store, resumed) = RunStore::open(dir)?;
                (Some(Arc::new(store)), resumed)
            }
            None => (None, None),
        };
        let (state, weights) = match resumed {
            Some(resumed) => {
                let path = store.as_ref().map(|s| s.path().to_path_buf()).unwrap_or_default();
                let state = RunState::resume(options.state.clone(), resumed.jobs, resumed.ids)
                    .map_err(|source| CoordinatorError::Resume { path, source })?;
                (Some(state), resumed.weights)
            }
            None => (None, None),
        };
        let resumed = state.is_some();
        let state = state.unwrap_or_else(|| RunState::new(options.state.clone()));
        let (stop_tx, stop_rx) = watch::channel(false);
        let service = ServiceOptions { max_message_bytes: options.max_message_bytes, ..options.service.clone() };
        let shared = Arc::new(
            Shared::new(state, events, store, stop_rx, service)
                .map_err(|source| CoordinatorError::Writer { source })?,
        );
        if let Some(version) = weights {
            let (job, number) = (crate::ids::JobId(version.job_id), version.version);
            shared.weights().install(version);
            // The weights may have been saved just before the step that made them was recorded.
            shared.with_state(|st| st.weights_published(job, number)).await.map_err(|source| {
                CoordinatorError::Resume { path: options.run_dir.clone().unwrap_or_default(), source }
            })?;
        }
        if resumed {
            let jobs = shared.with_state(|st| st.snapshot(None).map(|jobs| jobs.len()).unwrap_or(0)).await;
            let running = shared.with_state(|st| st.running_job()).await;
            tracing::info!(jobs, running = ?running.map(|j| j.0), "resumed the run recorded in the run directory");
        }
        Ok(Coordinator { listener, local_addr, shared, stop_tx, tls, resumed, options })
    }

    /// Whether `bind` found a run recorded in the run directory and resumed it.
    pub fn resumed(&self) -> bool {
        self.resumed
    }

    /// The address actually bound (the real port when asked for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Submits a job as the SubmitJob RPC would.
    pub async fn submit_job(&self, config_toml: &str, overrides: &[String]) -> Result<JobId, CoordinatorError> {
        let loaded = state::load_job(config_toml, overrides)?;
        Ok(self.shared.with_state(|st| st.enqueue_loaded(loaded)).await?)
    }

    /// Serves until `shutdown` resolves or a requested shutdown has drained; then stops the
    /// background task and returns once in-flight calls are done.
    pub async fn serve(self, shutdown: impl Future<Output = ()> + Send + 'static) -> Result<(), CoordinatorError> {
        let Coordinator { listener, local_addr, shared, stop_tx, tls, options, .. } = self;
        let stop_tx = Arc::new(stop_tx);

        let (health, health_service) = tonic_health::server::health_reporter();
        health.set_service_status(medtvt_proto::SERVICE_NAME, ServingStatus::Serving).await;

        let coordinator = InterceptedService::new(
            CoordinatorServer::new(CoordinatorService::new(shared.clone()))
                .max_decoding_message_size(options.max_message_bytes)
                .max_encoding_message_size(options.max_message_bytes),
            IncomingCall::new(options.auth_token.as_deref()),
        );

        let external = {
            let stop_tx = stop_tx.clone();
            tokio::spawn(async move {
                shutdown.await;
                stop_tx.send_replace(true);
            })
        };
        let reaper = tokio::spawn(reap(
            shared.clone(),
            stop_tx.clone(),
            options.metrics.clone(),
            options.reap_interval,
            options.shutdown_grace,
        ));

        let mut stop_rx = stop_tx.subscribe();
        let signal = async move {
            let _ = stop_rx.wait_for(|s| *s).await;
            health.set_service_status(medtvt_proto::SERVICE_NAME, ServingStatus::NotServing).await;
        };
        tracing::info!(%local_addr, auth = options.auth_token.is_some(), tls = tls.is_some(), "coordinator serving");
        let mut builder = Server::builder();
        if let Some(tls) = tls {
            builder = builder.tls_config(tls)?;
        }
        let serving = builder
            // Weight streams are large: let HTTP/2 flow-control windows grow with the link.
            .http2_adaptive_window(Some(true))
            // One server span per RPC, child of the caller's span (W3C traceparent); health
            // probes are not traced.
            .trace_fn(|request| {
                if request.uri().path().starts_with("/grpc.health") {
                    tracing::Span::none()
                } else {
                    medtvt_telemetry::propagation::server_span(request)
                }
            })
            .add_service(health_service)
            .add_service(coordinator)
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), signal);
        let mut stopping = stop_tx.subscribe();
        let drain_deadline = async move {
            let _ = stopping.wait_for(|s| *s).await;
            tokio::time::sleep(options.drain_timeout).await;
        };
        let served = tokio::select! {
            served = serving => served,
            _ = drain_deadline => {
                tracing::warn!(timeout = ?options.drain_timeout, "connections still open after the drain timeout: closing them");
                Ok(())
            }
        };

        stop_tx.send_replace(true);
        external.abort();
        let _ = external.await;
        let _ = reaper.await;
        tracing::info!(%local_addr, "coordinator stopped");
        served.map_err(CoordinatorError::from)
    }
}

/// Binds and serves; see [`Coordinator`].
pub async fn serve(
    addr: SocketAddr,
    options: ServerOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), CoordinatorError> {
    Coordinator::bind(addr, options).await?.serve(shutdown).await
}

/// Expires leases and silent workers; frees the weights of ended jobs; records the pipeline
/// gauges; stops the server `grace` after a requested shutdown has nothing left to run.
async fn reap(
    shared: Arc<Shared>,
    stop_tx: Arc<watch::Sender<bool>>,
    metrics: RunMetrics,
    every: Duration,
    grace: Duration,
) {
    let mut stop_rx = stop_tx.subscribe();
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut finished_since: Option<Instant> = None;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop_rx.wait_for(|s| *s) => return,
        }
        let now = Instant::now();
        let (running, finished, gauges) = shared.with_state_unacknowledged(|st| {
            st.expire(now);
            (st.running_job(), st.finished(), st.pipeline_gauges())
        });
        record_gauges(&metrics, gauges);
        shared.weights().retain_job(running);
        if finished {
            let since = *finished_since.get_or_insert(now);
            if now.duration_since(since) >= grace {
                tracing::info!("shutdown requested and every job has ended: stopping");
                stop_tx.send_replace(true);
                return;
            }
        }
    }
}

fn record_gauges(metrics: &RunMetrics, gauges: PipelineGauges) {
    metrics.set_prompts_waiting(gauges.prompts_waiting);
    metrics.set_leased_prompts(gauges.leased_prompts);
    metrics.set_queue_depth(gauges.queue_depth);
    metrics.set_policy_lag(gauges.policy_lag);
}
