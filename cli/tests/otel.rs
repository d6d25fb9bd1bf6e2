//! OpenTelemetry export of a real run, end to end: a real OTLP receiver (opentelemetry-proto's
//! TraceService and MetricsService servers) on 127.0.0.1, and the `medtvt` binary as coordinator,
//! one learner and one rollout worker, all given `--otlp-endpoint`. A 1-step PT job makes the
//! checkpoint a 1-step GRPO job starts from; after a drained shutdown every process has exited
//! (flushing what it buffered) and the test reads what arrived:
//! - spans from all three services (told apart by the `service.name` resource attribute);
//! - one trace rooted at the worker's `rollout` span that holds the coordinator's `SubmitGroups`
//!   span and the learner's `train_group` span as its children, every span's parent inside it;
//! - the learner's `train_step` span (the parent of the coordinator's `PullTrainingBatch` span)
//!   linked both ways with that trace;
//! - the coordinator's pipeline gauges and the learner's step metrics.

use medtvt_proto::v1::{JobState, ShutdownRequest, StatusRequest, SubmitJobRequest};
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
    MetricsService, MetricsServiceServer,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{ExportMetricsServiceRequest, ExportMetricsServiceResponse};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::resource::v1::Resource;
use std::collections::{BTreeSet, HashSet};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const COORDINATOR: &str = "medtvt-coordinator";
const WORKER: &str = "medtvt-rollout-worker";
const LEARNER: &str = "medtvt-learner";

/// What the OTLP receiver was sent.
#[derive(Clone, Default)]
struct Received {
    traces: Arc<Mutex<Vec<ExportTraceServiceRequest>>>,
    metrics: Arc<Mutex<Vec<ExportMetricsServiceRequest>>>,
}

#[tonic::async_trait]
impl TraceService for Received {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.traces.lock().unwrap().push(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

#[tonic::async_trait]
impl MetricsService for Received {
    async fn export(
        &self,
        request: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        self.metrics.lock().unwrap().push(request.into_inner());
        Ok(tonic::Response::new(ExportMetricsServiceResponse::default()))
    }
}

/// Serves the receiver on 127.0.0.1 (a free port) on `rt`; returns its `http://` endpoint.
fn start_receiver(rt: &tokio::runtime::Runtime, received: &Received) -> String {
    let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tonic::transport::Server::builder()
        .add_service(TraceServiceServer::new(received.clone()))
        .add_service(MetricsServiceServer::new(received.clone()))
        .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener));
    rt.spawn(server);
    format!("http://{addr}")
}

/// One span as received, with the service that sent it.
#[derive(Debug)]
struct ReceivedSpan {
    service: String,
    name: String,
    trace_id: Vec<u8>,
    span_id: Vec<u8>,
    parent_span_id: Vec<u8>,
    links: Vec<Vec<u8>>,
}

fn service_name(resource: Option<&Resource>) -> String {
    let attributes = resource.map(|r| r.attributes.as_slice()).unwrap_or_default();
    let value = attributes.iter().find(|kv| kv.key == "service.name").and_then(|kv| kv.value.as_ref()?.value.as_ref());
    match value {
        Some(Value::StringValue(name)) => name.clone(),
        _ => String::new(),
    }
}

fn spans(received: &Received) -> Vec<ReceivedSpan> {
    let requests = received.traces.lock().unwrap();
    let mut out = Vec::new();
    for resource_spans in requests.iter().flat_map(|r| &r.resource_spans) {
        let service = service_name(resource_spans.resource.as_ref());
        for span in resource_spans.scope_spans.iter().flat_map(|s| &s.spans) {
            out.push(ReceivedSpan {
                service: service.clone(),
                name: span.name.clone(),
                trace_id: span.trace_id.clone(),
                span_id: span.span_id.clone(),
                parent_span_id: span.parent_span_id.clone(),
                links: span.links.iter().map(|l| l.span_id.clone()).collect(),
            });
        }
    }
    out
}

/// (service, metric name) of every metric received.
fn metric_names(received: &Received) -> BTreeSet<(String, String)> {
    let requests = received.metrics.lock().unwrap();
    let mut out = BTreeSet::new();
    for resource_metrics in requests.iter().flat_map(|r| &r.resource_metrics) {
        let service = service_name(resource_metrics.resource.as_ref());
        for metric in resource_metrics.scope_metrics.iter().flat_map(|s| &s.metrics) {
            out.insert((service.clone(), metric.name.clone()));
        }
    }
    out
}

/// One line per span, for failure messages.
fn summary<'a>(spans: impl IntoIterator<Item = &'a ReceivedSpan>) -> String {
    let hex = |bytes: &[u8]| bytes.iter().take(4).map(|b| format!("{b:02x}")).collect::<String>();
    spans
        .into_iter()
        .map(|s| {
            format!(
                "{} {} trace {} span {} parent {}\n",
                s.service,
                s.name,
                hex(&s.trace_id),
                hex(&s.span_id),
                hex(&s.parent_span_id)
            )
        })
        .collect()
}

/// A `medtvt` child process, killed on drop unless it has exited.
struct Role {
    name: &'static str,
    child: Child,
}

impl Drop for Role {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn medtvt(args: &[&str], log: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_medtvt"));
    // Spans are exported at the console filter's level: pin it to what the spans use.
    cmd.args(args).env("RUST_LOG", "info").stderr(std::fs::File::create(log).unwrap());
    cmd
}

/// Starts the coordinator on a free port; returns it with its URL (from its stdout line).
fn coordinator(dir: &Path, config: &Path, otlp: &str) -> (Role, String) {
    let (config, run_dir) = (config.display().to_string(), dir.join("coordinator").display().to_string());
    let root = dir.display().to_string();
    let args = [
        "coordinator",
        "--config",
        &config,
        "--listen",
        "127.0.0.1:0",
        "--run-dir",
        &run_dir,
        "--job-root",
        &root,
        "--otlp-endpoint",
        otlp,
    ];
    let mut child = medtvt(&args, &dir.join("coordinator.log")).stdout(Stdio::piped()).spawn().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let role = Role { name: "coordinator", child };
    let addr = loop {
        let line = lines.next().expect("the coordinator exited before listening").unwrap();
        if let Some(addr) = line.strip_prefix("coordinator listening on ") {
            break addr.trim().to_string();
        }
    };
    std::thread::spawn(move || lines.for_each(drop));
    (role, format!("http://{addr}"))
}

fn learner(dir: &Path, url: &str, otlp: &str) -> Role {
    let args = [
        "learner",
        "--coordinator",
        url,
        "--rank",
        "0",
        "--world-size",
        "1",
        "--device",
        "cpu",
        "--otlp-endpoint",
        otlp,
    ];
    Role { name: "learner", child: medtvt(&args, &dir.join("learner.log")).stdout(Stdio::null()).spawn().unwrap() }
}

fn worker(dir: &Path, url: &str, otlp: &str) -> Role {
    let args = [
        "rollout-worker",
        "--coordinator",
        url,
        "--device",
        "cpu",
        "--name",
        "otel-worker",
        "--max-prompts",
        "2",
        "--otlp-endpoint",
        otlp,
    ];
    Role {
        name: "rollout-worker",
        child: medtvt(&args, &dir.join("worker.log")).stdout(Stdio::null()).spawn().unwrap(),
    }
}

fn logs(dir: &Path) -> String {
    ["coordinator", "learner", "worker"]
        .iter()
        .map(|name| {
            let text = std::fs::read_to_string(dir.join(format!("{name}.log"))).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(20).collect::<Vec<_>>().into_iter().rev().collect();
            format!("--- {name}.log\n{}\n", tail.join("\n"))
        })
        .collect()
}

/// A tiny-model config for one learner and one worker; `stage_keys` goes after `[train]`.
fn config(dir: &Path, stage: &str, data: &Path, checkpoint: Option<&Path>, stage_keys: &str) -> PathBuf {
    let checkpoint = checkpoint.map(|c| format!("checkpoint = \"{}\"\n", c.display())).unwrap_or_default();
    let text = format!(
        "[run]\nname = \"otel-{stage}\"\nstage = \"{stage}\"\nout_dir = \"{out}\"\nseed = 5\n\n\
         [data]\ndir = \"{data}\"\nmax_prompt_tokens = 64\n\n\
         [model]\n{checkpoint}train_all = true\n\n\
         [model.tiny]\nvocab_size = 384\nhidden_size = 32\nintermediate_size = 64\nnum_layers = 1\nnum_heads = 2\n\
         num_kv_heads = 1\nimage_size = 32\nvit_patch_size = 16\nvit_depth = 1\necg_resnet_blocks = 1\n\n\
         [train]\nsteps = 1\n{stage_keys}\n\
         [cluster]\nlearners = 1\nrollout_workers = 1\n",
        out = dir.join(stage).display(),
        data = data.display(),
    );
    let path = dir.join(format!("{stage}.toml"));
    std::fs::write(&path, text).unwrap();
    path
}

/// Waits until job `job_id` succeeded; fails on another end state or after `limit`.
fn wait_succeeded(rt: &tokio::runtime::Runtime, url: &str, job_id: u64, dir: &Path, limit: Duration) {
    let started = Instant::now();
    loop {
        let job = rt.block_on(async {
            let mut client = medtvt_proto::client::connect(url, None).await.unwrap();
            let status = client.get_status(StatusRequest { job_id }).await.unwrap().into_inner();
            status.jobs.into_iter().find(|j| j.job_id == job_id).expect("the job is listed")
        });
        if job.state == JobState::Succeeded as i32 {
            return;
        }
        let ended = job.state == JobState::Failed as i32 || job.state == JobState::Cancelled as i32;
        if ended || started.elapsed() > limit {
            panic!("job {job_id} did not succeed after {:?}: {job:#?}\n{}", started.elapsed(), logs(dir));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Asks for a drained shutdown and waits for every role to exit successfully.
fn shut_down(rt: &tokio::runtime::Runtime, url: &str, roles: &mut [Role], dir: &Path) {
    rt.block_on(async {
        let mut client = medtvt_proto::client::connect(url, None).await.unwrap();
        client.shutdown(ShutdownRequest { drain: true }).await.unwrap();
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    for role in roles.iter_mut() {
        let status = loop {
            if let Some(status) = role.child.try_wait().unwrap() {
                break status;
            }
            assert!(Instant::now() < deadline, "{} did not exit after the shutdown\n{}", role.name, logs(dir));
            std::thread::sleep(Duration::from_millis(50));
        };
        assert!(status.success(), "{} exited with {status}\n{}", role.name, logs(dir));
    }
}

#[test]
fn one_grpo_step_is_one_trace_across_worker_coordinator_and_learner() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let data = dir.join("data");
    let mut synth = medtvt_data::synth::SynthConfig::new(12, 3);
    synth.image_size = 32;
    medtvt_data::synth::synthesize(&data, &synth).unwrap();
    let pt = config(dir, "pt", &data, None, "batch_size = 2\nlearning_rate = 0.003\nwarmup_steps = 0\n");

    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let received = Received::default();
    let otlp = start_receiver(&rt, &received);
    let (coordinator, url) = coordinator(dir, &pt, &otlp);
    let mut roles = vec![coordinator, learner(dir, &url, &otlp), worker(dir, &url, &otlp)];
    wait_succeeded(&rt, &url, 1, dir, Duration::from_secs(60));

    // The GRPO job starts from the PT output, which exists only now: 1 step of 2 groups of 2.
    let grpo_keys =
        "learning_rate = 0.001\n\n[grpo]\ngroup_size = 2\nprompts_per_step = 2\nmax_new_tokens = 6\nbeta = 0.0\n";
    let grpo = config(dir, "grpo", &data, Some(&dir.join("pt").join("final")), grpo_keys);
    let config_toml = std::fs::read_to_string(grpo).unwrap();
    let job_id = rt.block_on(async {
        let mut client = medtvt_proto::client::connect(&url, None).await.unwrap();
        client.submit_job(SubmitJobRequest { config_toml, overrides: vec![] }).await.unwrap().into_inner().job_id
    });
    wait_succeeded(&rt, &url, job_id, dir, Duration::from_secs(60));
    // Every process flushes its spans and metrics on the way out.
    shut_down(&rt, &url, &mut roles, dir);

    let spans = spans(&received);
    let services: BTreeSet<&str> = spans.iter().map(|s| s.service.as_str()).collect();
    for service in [COORDINATOR, WORKER, LEARNER] {
        assert!(services.contains(service), "no span from {service}:\n{}", summary(&spans));
    }
    // The trace of a lease: sampled by the worker, submitted to the coordinator, trained.
    let in_trace = |trace_id: &[u8]| spans.iter().filter(|s| s.trace_id == trace_id).collect::<Vec<_>>();
    let found = spans.iter().filter(|s| s.service == WORKER && s.name == "rollout").find_map(|root| {
        let trace = in_trace(&root.trace_id);
        let submit =
            *trace.iter().find(|s| s.service == COORDINATOR && s.name == "medtvt.v1.Coordinator/SubmitGroups")?;
        let group = *trace.iter().find(|s| s.service == LEARNER && s.name == "train_group")?;
        Some((root, trace, submit, group))
    });
    let Some((root, trace, submit, group)) = found else {
        panic!("no trace holds a rollout, its submission and its training:\n{}", summary(&spans));
    };
    assert!(root.parent_span_id.is_empty(), "the rollout span is the root of its trace");
    assert_eq!(submit.parent_span_id, root.span_id, "SubmitGroups is a child of the rollout span");
    assert_eq!(group.parent_span_id, root.span_id, "train_group is a child of the rollout span");
    let ids: HashSet<&[u8]> = trace.iter().map(|s| s.span_id.as_slice()).collect();
    for span in &trace {
        let linked = span.parent_span_id.is_empty() || ids.contains(span.parent_span_id.as_slice());
        assert!(linked, "{span:?} has a parent outside its trace:\n{}", summary(trace.iter().copied()));
    }
    // The learner's step: its own trace, linked both ways with the group's.
    let step =
        spans.iter().find(|s| s.service == LEARNER && s.name == "train_step" && group.links.contains(&s.span_id));
    let Some(step) = step else { panic!("train_group is not linked to a train_step span:\n{}", summary(&spans)) };
    assert!(step.links.contains(&root.span_id), "the train_step span links to the rollout span");
    let pulled = spans.iter().any(|s| {
        s.service == COORDINATOR
            && s.name == "medtvt.v1.Coordinator/PullTrainingBatch"
            && s.parent_span_id == step.span_id
    });
    assert!(pulled, "no PullTrainingBatch span is a child of the train_step span:\n{}", summary(&spans));

    let metrics = metric_names(&received);
    for (service, name) in [
        (COORDINATOR, "medtvt.coordinator.prompts_waiting"),
        (COORDINATOR, "medtvt.coordinator.leased_prompts"),
        (COORDINATOR, "medtvt.coordinator.queue_depth"),
        (COORDINATOR, "medtvt.policy.lag"),
        (LEARNER, "medtvt.train.loss"),
    ] {
        assert!(
            metrics.contains(&(service.to_string(), name.to_string())),
            "{service} exported no {name}: {metrics:?}"
        );
    }
}
