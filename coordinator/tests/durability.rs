//! Resuming a run after the coordinator is killed. Each coordinator "process" runs on its own
//! tokio runtime; killing it shuts that runtime down in the background, which drops every task
//! (connections, reaper, handlers) where it stands: no graceful shutdown path runs, as with
//! SIGKILL. A new coordinator on the same run directory must continue the run: same job ids,
//! policy version and steps, the same shards for re-pulled steps, the published weights, and
//! every prompt group trained exactly once over the whole run.

mod common;

use common::*;
use medtvt_coordinator::in_process::InProcessCoordinator;
use medtvt_coordinator::ServerOptions;
use medtvt_proto::client::{self, Client, ConnectOptions};
use medtvt_proto::v1 as pb;
use std::collections::HashSet;
use std::path::Path;
use tonic::Code;

/// A coordinator "process" on `run_dir` (see [`InProcessCoordinator`]), with a client.
async fn start(run_dir: &Path) -> InProcessCoordinator {
    let options = ServerOptions { run_dir: Some(run_dir.to_path_buf()), ..options() };
    InProcessCoordinator::start("127.0.0.1:0".parse().unwrap(), options).await.expect("the coordinator starts")
}

async fn client_of(coordinator: &InProcessCoordinator) -> Client {
    let options = ConnectOptions { attempts: 3, ..ConnectOptions::default() };
    client::connect_with(&coordinator.url(), None, &options).await.unwrap()
}

fn keys(groups: &[pb::RolloutGroup]) -> Vec<(u64, u64)> {
    groups.iter().map(|g| (g.prompt_id, g.epoch)).collect()
}

fn weights(job: u64, version: u64) -> pb::WeightChunk {
    pb::WeightChunk {
        job_id: job,
        policy_version: version,
        tensor_name: "lm_head.weight".into(),
        dtype: "f32".into(),
        shape: vec![2, 2],
        data: (0..16u8).map(|b| b * version as u8).collect::<Vec<u8>>().into(),
        offset: 0,
        total_bytes: 16,
        last_of_tensor: true,
        last_of_version: true,
    }
}

async fn fetch(c: &mut Client, worker_id: u64, job_id: u64, have_version: u64) -> Vec<pb::WeightChunk> {
    let req = pb::FetchWeightsRequest { worker_id, job_id, have_version };
    let mut stream = c.fetch_weights(req).await.unwrap().into_inner();
    let mut out = Vec::new();
    while let Some(chunk) = stream.message().await.unwrap() {
        out.push(chunk);
    }
    out
}

fn summary(s: &pb::JobStatus) -> (u64, String, i32, u64, u64) {
    (s.job_id, s.name.clone(), s.state, s.step, s.policy_version)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_coordinator_resumes_pt_and_grpo_jobs_from_its_run_dir() {
    let data = tempfile::tempdir().unwrap();
    write_dataset(data.path(), 12);
    let run_dir = tempfile::tempdir().unwrap();

    // ── First coordinator: PT job 1 at step 1 (rank 0 reported it, rank 1 not yet). ──
    let first = start(run_dir.path()).await;
    assert!(!first.resumed());
    let mut c = client_of(&first).await;
    let pt = submit(&mut c, config_text(data.path(), "pt", ""), &[]).await;
    let grpo = submit(&mut c, config_text(data.path(), "grpo", ""), &["train.steps=4"]).await;
    let mut pt_samples = Vec::new();
    for rank in 0..2 {
        pt_samples.extend(pull(&mut c, pt, rank, 0, 0).await.samples);
    }
    for rank in 0..2 {
        report(&mut c, pt, rank, 0, 1).await;
    }
    let step1 = [pull(&mut c, pt, 0, 1, 0).await.samples, pull(&mut c, pt, 1, 1, 0).await.samples];
    report(&mut c, pt, 0, 1, 2).await;
    let before = c.get_status(pb::StatusRequest::default()).await.unwrap().into_inner();
    first.kill();

    // ── Second coordinator: PT resumes and finishes; GRPO job 2 runs until a kill mid-step. ──
    let second = start(run_dir.path()).await;
    assert!(second.resumed());
    let mut c = client_of(&second).await;
    let after = c.get_status(pb::StatusRequest::default()).await.unwrap().into_inner();
    assert_eq!(after.jobs.iter().map(summary).collect::<Vec<_>>(), before.jobs.iter().map(summary).collect::<Vec<_>>());
    assert_eq!(summary(&after.jobs[0]), (pt, "test-pt".into(), pb::JobState::Running as i32, 1, 2));
    assert_eq!(after.jobs[1].state, pb::JobState::Queued as i32);
    assert_eq!(after.jobs[0].latest_metrics, before.jobs[0].latest_metrics);
    assert!(after.workers.is_empty(), "processes register again");
    for rank in 0..2 {
        assert_eq!(
            pull(&mut c, pt, rank, 1, 0).await.samples,
            step1[rank as usize],
            "re-pulled step 1 is the same shard"
        );
    }
    pt_samples.extend(step1.concat());
    // Rank 0's report of step 1 survived: rank 1's completes the step.
    assert_eq!(report(&mut c, pt, 1, 1, 2).await.steps_completed, 2);
    for rank in 0..2 {
        pt_samples.extend(pull(&mut c, pt, rank, 2, 0).await.samples);
    }
    for rank in 0..2 {
        report(&mut c, pt, rank, 2, 3).await;
    }
    let finish = pb::FinishJobRequest {
        job_id: pt,
        rank: 0,
        checkpoint_dir: "ckpt".into(),
        failure: String::new(),
        ..Default::default()
    };
    assert_eq!(c.finish_job(finish).await.unwrap().into_inner().state, pb::JobState::Succeeded as i32);
    let distinct: HashSet<_> = pt_samples.iter().collect();
    assert_eq!((pt_samples.len(), distinct.len()), (12, 12), "one epoch of 12 samples, none repeated or skipped");

    assert_eq!(job_status(&mut c, grpo).await.state, pb::JobState::Running as i32);
    let worker = register(&mut c, pb::Role::RolloutWorker, "w", 0).await;
    let leased = lease(&mut c, worker, grpo, 6).await;
    assert_eq!(leased.prompts.len(), 6);
    // Five groups come back; one prompt is still being sampled when the coordinator dies.
    let groups = groups_for(&leased, worker, 0);
    assert_eq!(submit_groups(&mut c, groups[..5].to_vec()).await.accepted, 5);
    let mut trained = Vec::new();
    for rank in 0..2 {
        trained.extend(keys(&pull(&mut c, grpo, rank, 0, 1_000).await.groups));
    }
    c.publish_weights(tokio_stream::iter(vec![weights(grpo, 1)])).await.unwrap();
    for rank in 0..2 {
        report(&mut c, grpo, rank, 0, 1).await;
    }
    // Rank 0 pulls step 1 (sealing it); rank 1 has not yet. One accepted group waits in the queue.
    let step1_rank0 = pull(&mut c, grpo, 0, 1, 1_000).await;
    assert_eq!(step1_rank0.groups.len(), 1);
    let before = job_status(&mut c, grpo).await;
    assert_eq!((before.step, before.policy_version, before.queue_depth), (1, 1, 1));
    second.kill();

    // ── Third coordinator: GRPO resumes at step 1 and finishes. ──
    let third = start(run_dir.path()).await;
    let mut c = client_of(&third).await;
    let after = job_status(&mut c, grpo).await;
    assert_eq!(summary(&after), summary(&before));
    assert_eq!(job_status(&mut c, pt).await.state, pb::JobState::Succeeded as i32);

    let err = c.lease_prompts(pb::LeaseRequest { worker_id: worker, job_id: grpo, max_prompts: 1 }).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(client::is_unknown_worker(&err), "{}", err.message());
    let worker2 = register(&mut c, pb::Role::RolloutWorker, "w-again", 0).await;
    assert!(worker2 > worker, "worker ids are not reused across restarts");

    let fetched = fetch(&mut c, worker2, grpo, 0).await;
    assert_eq!(fetched.len(), 1);
    assert_eq!((fetched[0].policy_version, fetched[0].data.clone()), (1, weights(grpo, 1).data));
    assert_eq!(fetched[0].shape, vec![2, 2]);

    let again = pull(&mut c, grpo, 0, 1, 1_000).await;
    // Compared as messages: protobuf map fields (reward_parts) encode in no fixed order.
    assert_eq!(again.groups, step1_rank0.groups, "re-pulled step 1 is the same shard, every field");
    let step1_rank1 = pull(&mut c, grpo, 1, 1, 1_000).await;
    trained.extend(keys(&step1_rank0.groups));
    trained.extend(keys(&step1_rank1.groups));
    for rank in 0..2 {
        report(&mut c, grpo, rank, 1, 1).await;
    }

    // What was leased or waiting but not in a sealed step is leased again first.
    let sealed: HashSet<_> = trained.iter().copied().collect();
    let lost: Vec<_> = leased.prompts.iter().map(|p| (p.prompt_id, p.epoch)).filter(|k| !sealed.contains(k)).collect();
    assert_eq!(lost.len(), 2);
    let mut first_lease = true;
    for step in 2..4 {
        let shard0 = loop {
            let l = lease(&mut c, worker2, grpo, 10).await;
            if first_lease {
                assert_eq!(l.prompts.iter().map(|p| (p.prompt_id, p.epoch)).take(2).collect::<Vec<_>>(), lost);
                first_lease = false;
            }
            if !l.prompts.is_empty() {
                submit_groups(&mut c, groups_for(&l, worker2, l.policy_version)).await;
            }
            let batch = pull(&mut c, grpo, 0, step, 200).await;
            if !batch.pending {
                break batch;
            }
        };
        trained.extend(keys(&shard0.groups));
        trained.extend(keys(&pull(&mut c, grpo, 1, step, 1_000).await.groups));
        for rank in 0..2 {
            report(&mut c, grpo, rank, step, step + 1).await;
        }
    }
    let finish = pb::FinishJobRequest {
        job_id: grpo,
        rank: 0,
        checkpoint_dir: "ckpt".into(),
        failure: String::new(),
        ..Default::default()
    };
    assert_eq!(c.finish_job(finish).await.unwrap().into_inner().state, pb::JobState::Succeeded as i32);
    let unique: HashSet<_> = trained.iter().collect();
    assert_eq!((trained.len(), unique.len()), (8, 8), "4 steps x 2 groups, each trained exactly once: {trained:?}");
    let done = job_status(&mut c, grpo).await;
    assert_eq!((done.step, done.groups_trained, done.policy_version), (4, 8, 4));
    drop(c);
    third.kill();
}

#[tokio::test]
async fn a_resumed_coordinator_does_not_reuse_job_ids_and_keeps_ended_jobs() {
    let data = tempfile::tempdir().unwrap();
    write_dataset(data.path(), 12);
    let run_dir = tempfile::tempdir().unwrap();
    let first = start(run_dir.path()).await;
    let mut c = client_of(&first).await;
    let cancelled = submit(&mut c, config_text(data.path(), "sft", ""), &[]).await;
    c.cancel_job(pb::CancelJobRequest { job_id: cancelled }).await.unwrap();
    first.kill();

    let second = start(run_dir.path()).await;
    let mut c = client_of(&second).await;
    let status = job_status(&mut c, cancelled).await;
    assert_eq!(status.state, pb::JobState::Cancelled as i32);
    let next = submit(&mut c, config_text(data.path(), "pt", ""), &[]).await;
    assert_eq!(next, cancelled + 1);
    assert_eq!(job_status(&mut c, next).await.state, pb::JobState::Running as i32);
    second.kill();
}
