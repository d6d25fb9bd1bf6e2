//! The control plane under load: many simulated rollout workers and 8 simulated learner ranks
//! against a real coordinator with a run directory, once with the durable state committed under
//! the state lock (the previous design, `CommitMode::UnderLock`) and once on the writer thread
//! with group commit (`CommitMode::Writer`). Prints one Markdown table: RPC latency (p50/p99 of
//! LeasePrompts, SubmitGroups and ReportStep, the calls made while steps are sealed), steps per
//! second, the writer's commits, and the process's RSS after the first and the last step.
//!
//! Ignored by default (a measurement, not a check); run with
//! `cargo test -p medtvt-coordinator --release --test control_plane_bench -- --ignored --nocapture`.
//! `MEDTVT_BENCH_WORKERS=64,256` sets the worker counts.

mod common;

use common::*;
use medtvt_coordinator::journal_writer::CommitMode;
use medtvt_coordinator::service::ServiceOptions;
use medtvt_coordinator::{Coordinator, ServerOptions};
use medtvt_proto::client::{self, Client, ConnectOptions};
use medtvt_proto::v1 as pb;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const STEPS: u64 = 20;
const RANKS: u32 = 8;
const PROMPTS_PER_STEP: u32 = 64;
const GROUP_SIZE: u32 = 8;
const COMPLETION_TOKENS: usize = 96;
const WEIGHT_BYTES: usize = 4 << 20;

#[derive(Default)]
struct Latencies {
    lease: Vec<Duration>,
    submit: Vec<Duration>,
    report: Vec<Duration>,
}

type Shared = Arc<Mutex<Latencies>>;

fn record(shared: &Shared, f: impl FnOnce(&mut Latencies)) {
    f(&mut shared.lock().unwrap());
}

fn percentile(values: &mut [Duration], q: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort();
    let i = ((values.len() as f64 - 1.0) * q).round() as usize;
    values[i].as_secs_f64() * 1e3
}

fn rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(f64::NAN, |kib| kib / 1024.0)
}

async fn connect(url: &str) -> Client {
    let options = ConnectOptions { attempts: 3, max_message_bytes: 256 << 20, ..ConnectOptions::default() };
    client::connect_with(url, None, &options).await.unwrap()
}

/// The rig's group for `prompt`, with completions of [`COMPLETION_TOKENS`] tokens (the size a
/// real worker submits).
fn group(lease: &pb::Lease, worker_id: u64, prompt: &pb::Prompt, salt: u64) -> pb::RolloutGroup {
    let mut group = group_for(lease, worker_id, prompt, lease.policy_version);
    for (i, c) in group.completions.iter_mut().enumerate() {
        c.token_ids = (0..COMPLETION_TOKENS as i64).map(|t| (t + i as i64 + salt as i64) % 1000).collect();
        c.logprobs = vec![-0.5; COMPLETION_TOKENS];
    }
    group
}

async fn worker(url: String, job: u64, n: usize, lat: Shared) {
    let mut c = connect(&url).await;
    let req =
        pb::RegisterRequest { role: pb::Role::RolloutWorker as i32, name: format!("w{n}"), rank: 0, world_size: 0 };
    let me = c.register(req).await.unwrap().into_inner().worker_id;
    loop {
        let t = Instant::now();
        let lease = c
            .lease_prompts(pb::LeaseRequest { worker_id: me, job_id: job, max_prompts: 2 })
            .await
            .unwrap()
            .into_inner();
        record(&lat, |l| l.lease.push(t.elapsed()));
        if lease.job_done {
            return;
        }
        if lease.prompts.is_empty() {
            tokio::time::sleep(Duration::from_millis(lease.retry_after_ms.max(1))).await;
            continue;
        }
        // "Generating" takes a while on a real worker; 20 ms keeps the simulated ones busy.
        tokio::time::sleep(Duration::from_millis(20)).await;
        let groups: Vec<_> = lease.prompts.iter().map(|p| group(&lease, me, p, n as u64)).collect();
        let t = Instant::now();
        let reply = c.submit_groups(tokio_stream::iter(groups)).await;
        record(&lat, |l| l.submit.push(t.elapsed()));
        if reply.is_err() {
            return;
        }
    }
}

fn weights(job: u64, version: u64) -> Vec<pb::WeightChunk> {
    let chunk = 1 << 20;
    let data = prost::bytes::Bytes::from(vec![version as u8; chunk]);
    (0..WEIGHT_BYTES / chunk)
        .map(|i| pb::WeightChunk {
            job_id: job,
            policy_version: version,
            tensor_name: "lm_head.weight".into(),
            dtype: "bf16".into(),
            shape: vec![(WEIGHT_BYTES / 2) as i64],
            data: data.clone(),
            offset: (i * chunk) as u64,
            total_bytes: WEIGHT_BYTES as u64,
            last_of_tensor: (i + 1) * chunk == WEIGHT_BYTES,
            last_of_version: (i + 1) * chunk == WEIGHT_BYTES,
        })
        .collect()
}

/// One learner rank; rank 0 returns the RSS after the first and the last step.
async fn learner(url: String, job: u64, rank: u32, lat: Shared) -> (f64, f64) {
    let mut c = connect(&url).await;
    let req = pb::RegisterRequest { role: pb::Role::Learner as i32, name: format!("l{rank}"), rank, world_size: RANKS };
    c.register(req).await.unwrap();
    let (mut first, mut last) = (f64::NAN, f64::NAN);
    for step in 0..STEPS {
        loop {
            let req =
                pb::PullBatchRequest { job_id: job, rank, world_size: RANKS, step, wait_ms: 2_000, group_epoch: 0 };
            let batch = c.pull_training_batch(req).await.unwrap().into_inner();
            if !batch.pending {
                assert!(!batch.done, "step {step}");
                break;
            }
        }
        if rank == 0 {
            c.publish_weights(tokio_stream::iter(weights(job, step + 1))).await.unwrap();
        }
        let t = Instant::now();
        let req = pb::StepReport { job_id: job, rank, step, policy_version_after: step + 1, ..Default::default() };
        c.report_step(req).await.unwrap();
        record(&lat, |l| l.report.push(t.elapsed()));
        if rank == 0 {
            if step == 0 {
                first = rss_mib();
            }
            last = rss_mib();
        }
    }
    if rank == 0 {
        let finish = pb::FinishJobRequest { job_id: job, rank: 0, checkpoint_dir: "ckpt".into(), ..Default::default() };
        c.finish_job(finish).await.unwrap();
    }
    (first, last)
}

async fn run(mode: CommitMode, workers: usize) -> String {
    let dir = tempfile::tempdir().unwrap();
    write_dataset(dir.path(), 400);
    let options = ServerOptions {
        run_dir: Some(dir.path().join("run")),
        service: ServiceOptions { commit_mode: mode, ..ServiceOptions::default() },
        ..options()
    };
    let coordinator = Coordinator::bind("127.0.0.1:0".parse().unwrap(), options).await.unwrap();
    let url = format!("http://{}", coordinator.local_addr());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(coordinator.serve(async move {
        let _ = stopped.await;
    }));
    let config = format!(
        "[run]\nname = \"bench\"\nstage = \"grpo\"\nout_dir = \"out\"\nseed = 1\n\n[data]\ndir = \"{}\"\n\n[model]\n\n\
         [train]\nsteps = {STEPS}\nbatch_size = 8\nlearning_rate = 0.001\ncheckpoint_every = 5\n\n\
         [grpo]\ngroup_size = {GROUP_SIZE}\nprompts_per_step = {PROMPTS_PER_STEP}\nmax_new_tokens = {COMPLETION_TOKENS}\n\
         max_staleness = 1\n\n[cluster]\nlearners = {RANKS}\n",
        dir.path().display()
    );
    let mut c = connect(&url).await;
    let job = submit(&mut c, config, &[]).await;
    let lat: Shared = Arc::default();
    let started = Instant::now();
    let ranks: Vec<_> = (0..RANKS).map(|r| tokio::spawn(learner(url.clone(), job, r, lat.clone()))).collect();
    let pool: Vec<_> = (0..workers).map(|n| tokio::spawn(worker(url.clone(), job, n, lat.clone()))).collect();
    let mut rss = (f64::NAN, f64::NAN);
    for (r, handle) in ranks.into_iter().enumerate() {
        let got = handle.await.unwrap();
        if r == 0 {
            rss = got;
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    for handle in pool {
        let _ = tokio::time::timeout(Duration::from_secs(10), handle).await;
    }
    let _ = stop.send(());
    let _ = tokio::time::timeout(Duration::from_secs(10), server).await;
    let mut l = std::mem::take(&mut *lat.lock().unwrap());
    let name = match mode {
        CommitMode::UnderLock => "under the state lock (old)",
        CommitMode::Writer => "writer thread, group commit (new)",
    };
    format!(
        "| {name} | {workers} | {RANKS} | {:.2} | {:.1} / {:.1} | {:.1} / {:.1} | {:.1} / {:.1} | {:.0} -> {:.0} |",
        STEPS as f64 / elapsed,
        percentile(&mut l.lease, 0.5),
        percentile(&mut l.lease, 0.99),
        percentile(&mut l.submit, 0.5),
        percentile(&mut l.submit, 0.99),
        percentile(&mut l.report, 0.5),
        percentile(&mut l.report, 0.99),
        rss.0,
        rss.1,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement, not a check; run explicitly"]
async fn control_plane_latency_under_load() {
    let counts: Vec<usize> = std::env::var("MEDTVT_BENCH_WORKERS")
        .ok()
        .map(|v| v.split(',').filter_map(|n| n.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![64, 256]);
    println!(
        "\n{STEPS} GRPO steps x {PROMPTS_PER_STEP} prompts x {GROUP_SIZE} completions of {COMPLETION_TOKENS} tokens, \
         {RANKS} learner ranks, {} MiB of weights per step, run directory on local disk\n",
        WEIGHT_BYTES >> 20
    );
    println!("| durable state written | workers | learner ranks | steps/s | lease p50 / p99 ms | submit p50 / p99 ms | report p50 / p99 ms | RSS MiB, step 1 -> {STEPS} |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    for &workers in &counts {
        for mode in [CommitMode::UnderLock, CommitMode::Writer] {
            println!("{}", run(mode, workers).await);
        }
    }
}
