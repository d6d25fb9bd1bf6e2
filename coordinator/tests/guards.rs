//! The coordinator refuses what it cannot trust, with a code a client can act on and a
//! message naming the culprit: unknown worker ids (NOT_FOUND, "register again"), unknown job
//! ids (NOT_FOUND), and weight chunks whose metadata does not add up (INVALID_ARGUMENT naming
//! the tensor). Oversized messages are covered in fabric.rs.

mod common;

use common::*;
use medtvt_proto::client;
use medtvt_proto::v1 as pb;
use tonic::Code;

#[tokio::test]
async fn unknown_worker_ids_are_not_found_and_told_to_register_again() {
    let server = TestServer::start(options()).await;
    let mut c = server.client().await;
    let job = submit(&mut c, server.config("grpo", ""), &[]).await;
    let ghost = 4_242;
    let errors = [
        c.heartbeat(pb::HeartbeatRequest { worker_id: ghost, ..Default::default() }).await.unwrap_err(),
        c.wait_for_job(pb::WaitForJobRequest { worker_id: ghost, after_job_id: 0, wait_ms: 10 }).await.unwrap_err(),
        c.lease_prompts(pb::LeaseRequest { worker_id: ghost, job_id: job, max_prompts: 1 }).await.unwrap_err(),
        c.fetch_weights(pb::FetchWeightsRequest { worker_id: ghost, job_id: job, have_version: 0 }).await.unwrap_err(),
        c.deregister(pb::DeregisterRequest { worker_id: ghost }).await.unwrap_err(),
    ];
    for err in errors {
        assert_eq!(err.code(), Code::NotFound);
        assert_eq!(err.message(), "unknown worker id 4242: register again");
        assert!(client::is_unknown_worker(&err));
    }
    server.stop().await;
}

#[tokio::test]
async fn unknown_job_ids_are_not_found_naming_the_job() {
    let server = TestServer::start(options()).await;
    let mut c = server.client().await;
    submit(&mut c, server.config("grpo", ""), &[]).await;
    let worker = register(&mut c, pb::Role::RolloutWorker, "w", 0).await;
    let wrong = 99;
    let errors = [
        c.lease_prompts(pb::LeaseRequest { worker_id: worker, job_id: wrong, max_prompts: 1 }).await.unwrap_err(),
        c.pull_training_batch(pb::PullBatchRequest {
            job_id: wrong,
            rank: 0,
            world_size: 2,
            step: 0,
            wait_ms: 10,
            ..Default::default()
        })
        .await
        .unwrap_err(),
        c.report_step(pb::StepReport { job_id: wrong, rank: 0, step: 0, ..Default::default() }).await.unwrap_err(),
        c.finish_job(pb::FinishJobRequest { job_id: wrong, ..Default::default() }).await.unwrap_err(),
        c.fetch_weights(pb::FetchWeightsRequest { worker_id: worker, job_id: wrong, have_version: 0 })
            .await
            .unwrap_err(),
        c.get_status(pb::StatusRequest { job_id: wrong }).await.unwrap_err(),
        c.cancel_job(pb::CancelJobRequest { job_id: wrong }).await.unwrap_err(),
        c.rendezvous(pb::RendezvousRequest {
            job_id: wrong,
            key: "k".into(),
            rank: 0,
            world_size: 1,
            payload: Default::default(),
        })
        .await
        .unwrap_err(),
    ];
    for err in errors {
        assert_eq!(err.code(), Code::NotFound, "{err:?}");
        assert!(err.message().contains("unknown job id 99"), "{}", err.message());
    }
    let chunk = pb::WeightChunk {
        job_id: wrong,
        policy_version: 1,
        tensor_name: "w".into(),
        dtype: "u8".into(),
        shape: vec![1],
        data: vec![1u8].into(),
        total_bytes: 1,
        last_of_tensor: true,
        last_of_version: true,
        ..Default::default()
    };
    let err = c.publish_weights(tokio_stream::iter(vec![chunk])).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    server.stop().await;
}

#[tokio::test]
async fn weight_chunks_whose_metadata_does_not_add_up_are_invalid_naming_the_tensor() {
    let server = TestServer::start(options()).await;
    let mut c = server.client().await;
    let job = submit(&mut c, server.config("grpo", ""), &[]).await;
    let chunk = |dtype: &str, shape: Vec<i64>, total_bytes: u64, data: Vec<u8>, last: bool| pb::WeightChunk {
        job_id: job,
        policy_version: 1,
        tensor_name: "model.layers.0.mlp.up_proj.weight".into(),
        dtype: dtype.into(),
        shape,
        offset: 0,
        total_bytes,
        data: data.into(),
        last_of_tensor: last,
        last_of_version: last,
    };
    let cases = [
        (vec![chunk("f32", vec![2, 3], 16, vec![0; 16], true)], "[2, 3] x f32 is 24 bytes, but total_bytes = 16"),
        (vec![chunk("bf16", vec![4], 16, vec![0; 16], true)], "[4] x bf16 is 8 bytes, but total_bytes = 16"),
        (vec![chunk("q4_k", vec![4], 4, vec![0; 4], true)], "unknown dtype `q4_k`"),
        (vec![chunk("f32", vec![-1, 4], 16, vec![0; 16], true)], "negative dimension"),
        (
            vec![chunk("f32", vec![4], 16, vec![0; 8], false), {
                let mut c = chunk("f16", vec![4], 16, vec![0; 8], true);
                c.offset = 8;
                c
            }],
            "a chunk says dtype f16",
        ),
    ];
    for (chunks, expected) in cases {
        let err = c.publish_weights(tokio_stream::iter(chunks)).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{expected}: {err:?}");
        assert!(err.message().contains("tensor `model.layers.0.mlp.up_proj.weight`"), "{}", err.message());
        assert!(err.message().contains(expected), "{} (expected {expected})", err.message());
    }
    assert_eq!(job_status(&mut c, job).await.policy_version, 0, "nothing was installed");
    server.stop().await;
}
