//! GRPO over the wire: rollout workers lease prompts and stream groups, learners pull the
//! steps, report them and publish weights; leases expire, late and duplicate submissions are
//! ignored, stale groups are dropped and re-sampled, silent workers are declared dead.

mod common;

use common::*;
use medtvt_coordinator::ServerOptions;
use medtvt_proto::client::Client;
use medtvt_proto::v1 as pb;
use std::collections::HashSet;
use std::time::Duration;
use tonic::Code;

/// A rollout worker: lease, (fetch weights when the lease says newer,) sample, submit; until
/// the job is done.
async fn rollout_worker(mut c: Client, job: u64, name: &str) -> u32 {
    let me = register(&mut c, pb::Role::RolloutWorker, name, 0).await;
    let mut have_version = 0;
    let mut accepted = 0;
    loop {
        let lease = lease(&mut c, me, job, 2).await;
        if lease.job_done {
            return accepted;
        }
        if lease.prompts.is_empty() {
            // The protocol's own back-off hint, not a readiness wait.
            tokio::time::sleep(Duration::from_millis(lease.retry_after_ms.max(1))).await;
            continue;
        }
        if lease.policy_version > have_version {
            let mut stream = c
                .fetch_weights(pb::FetchWeightsRequest { job_id: job, have_version, worker_id: me })
                .await
                .unwrap()
                .into_inner();
            while let Some(chunk) = stream.message().await.unwrap() {
                have_version = have_version.max(chunk.policy_version);
            }
        }
        accepted += submit_groups(&mut c, groups_for(&lease, me, have_version)).await.accepted;
    }
}

/// A learner rank: pull each step, "train", publish weights (rank 0), report; then finish.
async fn learner(mut c: Client, job: u64, rank: u32, steps: u64) -> Vec<(u64, u64)> {
    let mut trained = Vec::new();
    for step in 0..steps {
        let batch = loop {
            let batch = pull(&mut c, job, rank, step, 2_000).await;
            if !batch.pending {
                break batch;
            }
        };
        assert!(!batch.done, "step {step} of {steps}");
        assert_eq!(batch.groups.len(), 2, "prompts_per_step 4 over 2 ranks");
        for g in &batch.groups {
            let prompt = g.prompt.as_ref().expect("prompt attached");
            assert_eq!((prompt.prompt_id, prompt.epoch), (g.prompt_id, g.epoch));
            assert!(String::from_utf8_lossy(&prompt.sample_json).contains("\"kind\":\"disease\""));
            trained.push((g.prompt_id, g.epoch));
        }
        if rank == 0 {
            let chunk = pb::WeightChunk {
                job_id: job,
                policy_version: step + 1,
                tensor_name: "lm_head.weight".into(),
                dtype: "f32".into(),
                shape: vec![2],
                data: vec![step as u8; 8].into(),
                offset: 0,
                total_bytes: 8,
                last_of_tensor: true,
                last_of_version: true,
            };
            c.publish_weights(tokio_stream::iter(vec![chunk])).await.unwrap();
        }
        report(&mut c, job, rank, step, step + 1).await;
    }
    assert!(pull(&mut c, job, rank, steps, 0).await.done);
    if rank == 0 {
        let finish = pb::FinishJobRequest {
            job_id: job,
            rank: 0,
            checkpoint_dir: "ckpt".into(),
            failure: String::new(),
            ..Default::default()
        };
        c.finish_job(finish).await.unwrap();
    }
    trained
}

#[tokio::test]
async fn every_prompt_group_is_trained_exactly_once_across_steps() {
    let server = TestServer::start(options()).await;
    let mut c = server.client().await;
    let steps = 5;
    let job = submit(&mut c, server.config("grpo", ""), &["train.steps=5", "grpo.prompts_per_step=4"]).await;
    let workers =
        [tokio::spawn(rollout_worker(c.clone(), job, "w0")), tokio::spawn(rollout_worker(c.clone(), job, "w1"))];
    let learners = [tokio::spawn(learner(c.clone(), job, 0, steps)), tokio::spawn(learner(c.clone(), job, 1, steps))];
    let mut trained = Vec::new();
    for l in learners {
        trained.extend(l.await.unwrap());
    }
    let mut accepted = 0;
    for w in workers {
        accepted += w.await.unwrap();
    }
    let unique: HashSet<_> = trained.iter().collect();
    assert_eq!(trained.len(), 20, "5 steps x 4 groups");
    assert_eq!(unique.len(), 20, "no group trained twice: {trained:?}");

    let status = job_status(&mut c, job).await;
    assert_eq!(status.state, pb::JobState::Succeeded as i32, "{}", status.message);
    assert_eq!((status.step, status.groups_trained, status.policy_version), (5, 20, 5));
    assert_eq!(status.groups_accepted, accepted as u64);
    // Every accepted group was trained, dropped as stale, or is still queued.
    assert!(status.groups_accepted >= status.groups_trained);
    assert_eq!(status.leased_prompts_outstanding, 0, "leases are void once the job ended");
    server.stop().await;
}

#[tokio::test]
async fn expired_lease_is_re_leased_and_late_or_duplicate_submissions_are_ignored() {
    let server = TestServer::start(options()).await;
    let mut c = server.client().await;
    let job = submit(&mut c, server.config("grpo", "lease_timeout_s = 0.3\n"), &[]).await;
    let slow = register(&mut c, pb::Role::RolloutWorker, "slow", 0).await;
    let fast = register(&mut c, pb::Role::RolloutWorker, "fast", 0).await;
    let first = lease(&mut c, slow, job, 2).await;
    assert_eq!(first.prompts.len(), 2);
    assert!(first.deadline_unix_ms > 0);

    eventually(&mut c, job, "the lease to expire", |s| s.jobs[0].leases_expired == 1).await;
    let second = lease(&mut c, fast, job, 2).await;
    let ids = |l: &pb::Lease| l.prompts.iter().map(|p| (p.prompt_id, p.epoch)).collect::<Vec<_>>();
    assert_eq!(ids(&second), ids(&first), "expired prompts are leased again first");

    let late = submit_groups(&mut c, groups_for(&first, slow, 0)).await;
    assert_eq!((late.accepted, late.stale), (0, 2));
    let on_time = submit_groups(&mut c, groups_for(&second, fast, 0)).await;
    assert_eq!(on_time.accepted, 2);
    let again = submit_groups(&mut c, groups_for(&second, fast, 0)).await;
    assert_eq!((again.accepted, again.duplicates), (0, 2));
    let mut forged = groups_for(&second, fast, 0);
    forged.iter_mut().for_each(|g| {
        g.lease_id = 9_999;
        g.prompt_id = 11;
        g.epoch = 3;
    });
    assert_eq!(submit_groups(&mut c, forged).await.unknown_lease, 2);

    let status = job_status(&mut c, job).await;
    assert_eq!(
        (
            status.groups_accepted,
            status.late_groups_ignored,
            status.duplicates_ignored,
            status.unknown_lease_groups,
            status.queue_depth
        ),
        (2, 2, 2, 2, 2)
    );
    // Both groups go into step 0, once.
    let shard0 = pull(&mut c, job, 0, 0, 1_000).await;
    let shard1 = pull(&mut c, job, 1, 0, 1_000).await;
    let mut trained: Vec<_> = shard0.groups.iter().chain(&shard1.groups).map(|g| (g.prompt_id, g.epoch)).collect();
    trained.sort();
    let mut expected = ids(&second);
    expected.sort();
    assert_eq!(trained, expected);
    server.stop().await;
}

#[tokio::test]
async fn malformed_or_misdirected_groups_are_refused() {
    let server = TestServer::start(options()).await;
    let mut c = server.client().await;
    let job = submit(&mut c, server.config("grpo", ""), &[]).await;
    let me = register(&mut c, pb::Role::RolloutWorker, "w", 0).await;
    let l = lease(&mut c, me, job, 1).await;
    let mut short = groups_for(&l, me, 0);
    short[0].completions.pop();
    let err = c.submit_groups(tokio_stream::iter(short)).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("group_size = 2"), "{}", err.message());
    let mut wrong_job = groups_for(&l, me, 0);
    wrong_job[0].job_id = 77;
    assert_eq!(c.submit_groups(tokio_stream::iter(wrong_job)).await.unwrap_err().code(), Code::NotFound);
    let err = c.lease_prompts(pb::LeaseRequest { worker_id: 555, job_id: job, max_prompts: 1 }).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let learner = register(&mut c, pb::Role::Learner, "l", 0).await;
    let err = c.lease_prompts(pb::LeaseRequest { worker_id: learner, job_id: job, max_prompts: 1 }).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    server.stop().await;
}

#[tokio::test]
async fn stale_groups_are_dropped_and_their_prompts_sampled_again() {
    let server = TestServer::start(options()).await;
    let mut c = server.client().await;
    let job = submit(&mut c, server.config("grpo", ""), &["grpo.max_staleness=0"]).await;
    let me = register(&mut c, pb::Role::RolloutWorker, "w", 0).await;
    // Window: (0 + 2) steps x 2 prompts.
    let l = lease(&mut c, me, job, 10).await;
    assert_eq!(l.prompts.len(), 4);
    let groups = groups_for(&l, me, 0);
    assert_eq!(submit_groups(&mut c, groups[..3].to_vec()).await.accepted, 3);
    for rank in 0..2 {
        assert_eq!(pull(&mut c, job, rank, 0, 1_000).await.groups.len(), 1);
    }
    for rank in 0..2 {
        report(&mut c, job, rank, 0, 1).await;
    }
    // Version 1 now: the queued version-0 group is dropped when step 1 is assembled...
    assert!(pull(&mut c, job, 0, 1, 50).await.pending);
    // ...and one arriving at version 0 is dropped on arrival.
    let late = submit_groups(&mut c, groups[3..].to_vec()).await;
    assert_eq!((late.accepted, late.stale), (0, 1));
    let status = job_status(&mut c, job).await;
    assert_eq!((status.groups_dropped_stale, status.queue_depth, status.groups_trained), (2, 0, 2));

    // Both prompts come back first and, sampled at version 1, make step 1.
    let again = lease(&mut c, me, job, 10).await;
    let ids = |ps: &[pb::Prompt]| ps.iter().map(|p| (p.prompt_id, p.epoch)).collect::<Vec<_>>();
    let mut returned = ids(&again.prompts[..2]);
    returned.sort();
    let mut dropped = ids(&l.prompts[2..]);
    dropped.sort();
    assert_eq!(returned, dropped);
    assert_eq!(submit_groups(&mut c, groups_for(&again, me, 1)).await.accepted as usize, again.prompts.len());
    let step1: Vec<_> = [pull(&mut c, job, 0, 1, 1_000).await, pull(&mut c, job, 1, 1, 1_000).await]
        .iter()
        .flat_map(|b| b.groups.iter().map(|g| (g.prompt_id, g.epoch)).collect::<Vec<_>>())
        .collect();
    let mut step1_sorted = step1.clone();
    step1_sorted.sort();
    assert_eq!(step1_sorted, dropped);
    server.stop().await;
}

#[tokio::test]
async fn silent_worker_is_marked_dead_and_its_leases_return() {
    let server = TestServer::start(options()).await;
    let mut c = server.client().await;
    let job = submit(&mut c, server.config("grpo", "heartbeat_timeout_s = 0.3\n"), &[]).await;
    let me = register(&mut c, pb::Role::RolloutWorker, "quiet", 0).await;
    let hb = c.heartbeat(pb::HeartbeatRequest { worker_id: me, ..Default::default() }).await.unwrap().into_inner();
    assert_eq!((hb.job_id, hb.job_state, hb.shutdown), (job, pb::JobState::Running as i32, false));
    assert!(hb.heartbeat_interval_ms <= 100, "a third of the job's timeout");
    let l = lease(&mut c, me, job, 2).await;
    assert_eq!(l.prompts.len(), 2);
    let status = eventually(&mut c, job, "the worker to be declared dead", |s| {
        s.workers.iter().any(|w| w.worker_id == me && !w.alive)
    })
    .await;
    assert_eq!(status.jobs[0].leased_prompts_outstanding, 0);
    assert_eq!(status.jobs[0].leases_expired, 1);
    // It comes back with a heartbeat, but its old lease stays void.
    c.heartbeat(pb::HeartbeatRequest { worker_id: me, ..Default::default() }).await.unwrap();
    let status = c.get_status(pb::StatusRequest::default()).await.unwrap().into_inner();
    assert!(status.workers.iter().any(|w| w.worker_id == me && w.alive));
    assert_eq!(submit_groups(&mut c, groups_for(&l, me, 0)).await.stale, 2);
    let err = c.heartbeat(pb::HeartbeatRequest { worker_id: 12_345, ..Default::default() }).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    server.stop().await;
}

/// A training batch over the gRPC message limit is refused with MESSAGE_TOO_LARGE, and the message
/// names its size, the limit and the flag that raises it (each group alone fits).
#[tokio::test]
async fn a_batch_over_the_message_limit_is_refused_naming_the_limit() {
    let limit = 4096;
    let server = TestServer::start(ServerOptions { max_message_bytes: limit, ..options() }).await;
    let mut c = server.client().await;
    // One learner: its batch holds both groups.
    let job = submit(&mut c, server.config("grpo", ""), &["cluster.learners=1"]).await;
    let me = register(&mut c, pb::Role::RolloutWorker, "w", 0).await;
    let l = lease(&mut c, me, job, 2).await;
    assert_eq!(l.prompts.len(), 2);
    for mut group in groups_for(&l, me, 0) {
        for completion in &mut group.completions {
            completion.text = "x".repeat(1200);
        }
        assert_eq!(submit_groups(&mut c, vec![group]).await.accepted, 1);
    }
    let req =
        pb::PullBatchRequest { job_id: job, rank: 0, world_size: 1, step: 0, wait_ms: 2_000, ..Default::default() };
    let err = c.pull_training_batch(req).await.unwrap_err();
    assert_eq!(medtvt_proto::errors::reason_of(&err), Some(pb::ErrorReason::MessageTooLarge));
    assert_eq!(err.code(), Code::ResourceExhausted);
    let message = err.message();
    assert!(message.contains(&format!("limit of {limit} bytes")) && message.contains("--max-message-mib"), "{message}");
    server.stop().await;
}
