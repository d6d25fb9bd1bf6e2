//! Jobs over the wire: config validation at submit, the FIFO of jobs, PT/SFT batches sharded
//! over two learner ranks, finishing, cancelling and shutting down.

mod common;

use common::*;
use medtvt_proto::v1 as pb;
use std::collections::HashSet;
use tonic::Code;

#[tokio::test]
async fn invalid_config_or_dataset_is_invalid_argument_naming_the_problem() {
    let server = TestServer::start(options()).await;
    let mut c = server.client().await;
    let bad_key =
        pb::SubmitJobRequest { config_toml: server.config("pt", ""), overrides: vec!["train.learning_rate=-1".into()] };
    let err = c.submit_job(bad_key).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("`train.learning_rate`"), "{}", err.message());

    let unknown = pb::SubmitJobRequest { config_toml: server.config("pt", "bogus_key = 1\n"), overrides: vec![] };
    let err = c.submit_job(unknown).await.unwrap_err();
    assert!(err.code() == Code::InvalidArgument && err.message().contains("bogus_key"), "{}", err.message());

    let uneven = pb::SubmitJobRequest {
        config_toml: server.config("grpo", ""),
        overrides: vec!["grpo.prompts_per_step=3".into()],
    };
    let err = c.submit_job(uneven).await.unwrap_err();
    assert!(err.message().contains("`grpo.prompts_per_step`"), "{}", err.message());

    let broken = tempfile::tempdir().unwrap();
    std::fs::write(broken.path().join("qa.jsonl"), "{\"split\":\"train\",\"kind\":\"disease\"}\nnot json\n").unwrap();
    let req = pb::SubmitJobRequest { config_toml: config_text(broken.path(), "sft", ""), overrides: vec![] };
    let err = c.submit_job(req).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("qa.jsonl:2:"), "{}", err.message());

    let status = c.get_status(pb::StatusRequest::default()).await.unwrap().into_inner();
    assert!(status.jobs.is_empty(), "no invalid job was queued");
    server.stop().await;
}

#[tokio::test]
async fn pt_batches_are_sharded_disjointly_idempotent_and_jobs_run_in_order() {
    let server = TestServer::start(options()).await;
    let mut c = server.client().await;
    let pt = submit(&mut c, server.config("pt", ""), &[]).await;
    let sft = submit(&mut c, server.config("sft", ""), &[]).await;
    let learner0 = register(&mut c, pb::Role::Learner, "l0", 0).await;

    let assignment = c
        .wait_for_job(pb::WaitForJobRequest { worker_id: learner0, after_job_id: 0, wait_ms: 5_000 })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((assignment.job_id, assignment.stage), (pt, pb::Stage::Pt as i32));
    assert!(assignment.config_toml.contains("stage = \"pt\""), "{}", assignment.config_toml);
    assert_eq!(job_status(&mut c, sft).await.state, pb::JobState::Queued as i32);

    let mut seen = HashSet::new();
    for step in 0..3 {
        let a = pull(&mut c, pt, 0, step, 0).await;
        let b = pull(&mut c, pt, 1, step, 0).await;
        assert_eq!((a.samples.len(), b.samples.len()), (2, 2), "batch_size 4 over 2 ranks");
        for s in a.samples.iter().chain(&b.samples) {
            let value: serde_json::Value = serde_json::from_slice(s).unwrap();
            assert_eq!(value["kind"], "physiological");
            assert!(seen.insert(s.clone()), "12 samples, 12 pulled: no repeats within the epoch");
        }
        assert_eq!(pull(&mut c, pt, 0, step, 0).await.samples, a.samples, "re-pull returns the same shard");
        report(&mut c, pt, 0, step, step + 1).await;
        report(&mut c, pt, 1, step, step + 1).await;
    }
    assert!(pull(&mut c, pt, 0, 3, 0).await.done);
    let err = c
        .pull_training_batch(pb::PullBatchRequest {
            job_id: pt,
            rank: 0,
            world_size: 3,
            step: 0,
            wait_ms: 0,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    let finish = pb::FinishJobRequest {
        job_id: pt,
        rank: 0,
        checkpoint_dir: "out/final".into(),
        failure: String::new(),
        ..Default::default()
    };
    assert_eq!(c.finish_job(finish).await.unwrap().into_inner().state, pb::JobState::Succeeded as i32);
    let done = job_status(&mut c, pt).await;
    assert_eq!((done.step, done.policy_version), (3, 3));
    assert_eq!(done.latest_metrics.get("loss"), Some(&(1.0 / 3.0)));

    // The learner stays attached and gets the next job.
    let next = c
        .wait_for_job(pb::WaitForJobRequest { worker_id: learner0, after_job_id: pt, wait_ms: 5_000 })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((next.job_id, next.stage), (sft, pb::Stage::Sft as i32));
    let batch = pull(&mut c, sft, 1, 0, 0).await;
    assert!(batch.samples.iter().all(|s| String::from_utf8_lossy(s).contains("\"kind\":\"disease\"")));
    server.stop().await;
}

#[tokio::test]
async fn cancel_ends_the_job_for_learners_and_shutdown_stops_the_server() {
    let server = TestServer::start(options()).await;
    let mut c = server.client().await;
    let job = submit(&mut c, server.config("sft", ""), &[]).await;
    let worker = register(&mut c, pb::Role::Learner, "l", 0).await;
    // A learner long-polling for a step of a cancelled job is told `done`.
    let waiting = {
        let mut c = c.clone();
        tokio::spawn(async move { pull(&mut c, job, 0, 99, 5_000).await })
    };
    let cancelled = c.cancel_job(pb::CancelJobRequest { job_id: job }).await.unwrap().into_inner();
    assert_eq!(cancelled.state, pb::JobState::Cancelled as i32);
    let batch = pull(&mut c, job, 0, 0, 0).await;
    assert!(batch.done && batch.job_state == pb::JobState::Cancelled as i32);
    assert!(waiting.await.unwrap().done);
    let err = c.cancel_job(pb::CancelJobRequest { job_id: 42 }).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);

    // A process waiting for the next job learns about the shutdown and the server stops.
    let waiter = {
        let mut c = c.clone();
        tokio::spawn(async move {
            c.wait_for_job(pb::WaitForJobRequest { worker_id: worker, after_job_id: job, wait_ms: 10_000 })
                .await
                .unwrap()
                .into_inner()
        })
    };
    c.shutdown(pb::ShutdownRequest { drain: true }).await.unwrap();
    let err = c
        .submit_job(pb::SubmitJobRequest { config_toml: server.config("pt", ""), overrides: vec![] })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    assert!(waiter.await.unwrap().shutdown);
    server.join().await;
}
