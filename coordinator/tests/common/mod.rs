//! Shared test rig: a real coordinator on 127.0.0.1:0 with a tiny qa.jsonl in a temporary
//! directory, typed clients, and config text with tiny numbers.
#![allow(dead_code)]

use medtvt_coordinator::{Coordinator, ServerOptions};
use medtvt_proto::client::{self, Client, ConnectOptions};
use medtvt_proto::v1 as pb;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub struct TestServer {
    pub addr: SocketAddr,
    pub url: String,
    pub dir: tempfile::TempDir,
    stop: Option<oneshot::Sender<()>>,
    handle: Option<JoinHandle<Result<(), medtvt_coordinator::CoordinatorError>>>,
}

/// Options for tests: fast reaping, no shutdown grace.
pub fn options() -> ServerOptions {
    ServerOptions {
        reap_interval: Duration::from_millis(20),
        shutdown_grace: Duration::ZERO,
        ..ServerOptions::default()
    }
}

/// `n` disease and `n` physiological train samples, plus test-split lines that must be skipped.
pub fn write_dataset(dir: &std::path::Path, n: usize) {
    let mut lines = Vec::new();
    for i in 0..n {
        lines.push(format!(r#"{{"split":"train","kind":"disease","id":"d{i}","answer":"<answer>sepsis</answer>"}}"#));
        lines.push(format!(r#"{{"split":"train","kind":"physiological","id":"p{i}"}}"#));
        lines.push(format!(r#"{{"split":"test","kind":"disease","id":"t{i}"}}"#));
    }
    std::fs::write(dir.join("qa.jsonl"), lines.join("\n") + "\n").unwrap();
}

impl TestServer {
    pub async fn start(options: ServerOptions) -> TestServer {
        let dir = tempfile::tempdir().unwrap();
        write_dataset(dir.path(), 12);
        let coordinator = Coordinator::bind("127.0.0.1:0".parse().unwrap(), options).await.unwrap();
        let addr = coordinator.local_addr();
        let (tx, rx) = oneshot::channel::<()>();
        let handle = tokio::spawn(coordinator.serve(async move {
            let _ = rx.await;
        }));
        TestServer { addr, url: format!("http://{addr}"), dir, stop: Some(tx), handle: Some(handle) }
    }

    pub async fn client(&self) -> Client {
        self.client_with_token(None).await
    }

    pub async fn client_with_token(&self, token: Option<&str>) -> Client {
        let options = ConnectOptions { attempts: 3, max_message_bytes: 64 << 20, ..ConnectOptions::default() };
        client::connect_with(&self.url, token, &options).await.unwrap()
    }

    /// Waits for the server to stop by itself (after a Shutdown request).
    pub async fn join(mut self) {
        let handle = self.handle.take().unwrap();
        tokio::time::timeout(Duration::from_secs(10), handle).await.expect("server did not stop").unwrap().unwrap();
    }

    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        self.join().await;
    }

    /// A config in this server's data directory.
    pub fn config(&self, stage: &str, extra: &str) -> String {
        config_text(self.dir.path(), stage, extra)
    }
}

pub fn config_text(data_dir: &std::path::Path, stage: &str, extra: &str) -> String {
    let grpo = if stage == "grpo" {
        "[grpo]\ngroup_size = 2\nprompts_per_step = 2\nmax_new_tokens = 4\nmax_staleness = 1\n"
    } else {
        ""
    };
    format!(
        "[run]\nname = \"test-{stage}\"\nstage = \"{stage}\"\nout_dir = \"out\"\nseed = 1\n\n[data]\ndir = \"{}\"\n\n[model]\n\n\
         [train]\nsteps = 3\nbatch_size = 4\nlearning_rate = 0.001\n\n{grpo}\n[cluster]\nlearners = 2\n{extra}",
        data_dir.display()
    )
}

pub async fn submit(client: &mut Client, config_toml: String, overrides: &[&str]) -> u64 {
    let req = pb::SubmitJobRequest { config_toml, overrides: overrides.iter().map(|s| s.to_string()).collect() };
    client.submit_job(req).await.unwrap().into_inner().job_id
}

pub async fn register(client: &mut Client, role: pb::Role, name: &str, rank: u32) -> u64 {
    let req = pb::RegisterRequest { role: role as i32, name: name.into(), rank, world_size: 2 };
    client.register(req).await.unwrap().into_inner().worker_id
}

pub async fn job_status(client: &mut Client, job_id: u64) -> pb::JobStatus {
    let status = client.get_status(pb::StatusRequest { job_id }).await.unwrap().into_inner();
    status.jobs.into_iter().next().unwrap()
}

pub async fn lease(client: &mut Client, worker_id: u64, job_id: u64, max_prompts: u32) -> pb::Lease {
    client.lease_prompts(pb::LeaseRequest { worker_id, job_id, max_prompts }).await.unwrap().into_inner()
}

/// A group for each prompt of the lease, sampled at `version`, with rewards that do not tie.
pub fn groups_for(lease: &pb::Lease, worker_id: u64, version: u64) -> Vec<pb::RolloutGroup> {
    lease.prompts.iter().map(|p| group_for(lease, worker_id, p, version)).collect()
}

pub fn group_for(lease: &pb::Lease, worker_id: u64, prompt: &pb::Prompt, version: u64) -> pb::RolloutGroup {
    pb::RolloutGroup {
        job_id: lease.job_id,
        lease_id: lease.lease_id,
        worker_id,
        prompt_id: prompt.prompt_id,
        epoch: prompt.epoch,
        policy_version: version,
        completions: (0..lease.group_size)
            .map(|i| pb::Completion {
                token_ids: vec![5, 6, i as i64],
                logprobs: vec![-0.5, -0.25, -1.0],
                reward: i as f32,
                reward_parts: [("jaccard".to_string(), i as f32), ("format".to_string(), 0.0)].into(),
                text: format!("<think>t</think><answer>a{i}</answer>"),
                truncated: false,
                token_policy_versions: Vec::new(),
            })
            .collect(),
        prompt: None,
        traceparent: String::new(),
    }
}

pub async fn submit_groups(client: &mut Client, groups: Vec<pb::RolloutGroup>) -> pb::SubmitGroupsResponse {
    client.submit_groups(tokio_stream::iter(groups)).await.unwrap().into_inner()
}

pub async fn pull(client: &mut Client, job_id: u64, rank: u32, step: u64, wait_ms: u64) -> pb::TrainingBatch {
    let req = pb::PullBatchRequest { job_id, rank, world_size: 2, step, wait_ms, ..Default::default() };
    client.pull_training_batch(req).await.unwrap().into_inner()
}

pub async fn report(
    client: &mut Client,
    job_id: u64,
    rank: u32,
    step: u64,
    version_after: u64,
) -> pb::StepReportResponse {
    let req = pb::StepReport {
        job_id,
        rank,
        step,
        metrics: [("loss".to_string(), 1.0 / (step + 1) as f64)].into(),
        policy_version_after: version_after,
        ..Default::default()
    };
    client.report_step(req).await.unwrap().into_inner()
}

/// Polls status until `pred` holds (for conditions that only time produces, e.g. a lease
/// timeout), failing after 10 s.
pub async fn eventually(
    client: &mut Client,
    job_id: u64,
    what: &str,
    pred: impl Fn(&pb::RunStatus) -> bool,
) -> pb::RunStatus {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let status = client.get_status(pb::StatusRequest { job_id }).await.unwrap().into_inner();
        if pred(&status) {
            return status;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}: {status:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
