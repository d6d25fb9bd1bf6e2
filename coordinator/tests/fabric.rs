//! The plumbing around the jobs: weight relay (chunked, byte-identical, versioned), the
//! learners' rendezvous, the shared-secret token, the health service and message size limits.

mod common;

use common::*;
use medtvt_proto::client::{self, ConnectOptions};
use medtvt_proto::v1 as pb;
use tonic::Code;

fn tensor_chunks(job: u64, version: u64, name: &str, data: &[u8], chunk: usize) -> Vec<pb::WeightChunk> {
    let mut out = Vec::new();
    let mut offset = 0;
    loop {
        let end = (offset + chunk).min(data.len());
        out.push(pb::WeightChunk {
            job_id: job,
            policy_version: version,
            tensor_name: name.into(),
            dtype: "bf16".into(),
            shape: vec![data.len() as i64 / 2],
            data: data[offset..end].to_vec().into(),
            offset: offset as u64,
            total_bytes: data.len() as u64,
            last_of_tensor: end == data.len(),
            last_of_version: false,
        });
        offset = end;
        if offset == data.len() {
            return out;
        }
    }
}

#[tokio::test]
async fn weights_round_trip_byte_identical_with_a_version_bump() {
    let server = TestServer::start(options()).await;
    let mut c = server.client().await;
    let job = submit(&mut c, server.config("grpo", ""), &[]).await;
    let worker = register(&mut c, pb::Role::RolloutWorker, "w", 0).await;
    let big: Vec<u8> = (0..2_621_446u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    let small: Vec<u8> = (0..10u8).collect();
    let mut chunks = tensor_chunks(job, 1, "model.layers.0.mlp.up_proj.weight", &big, 300 * 1024);
    chunks.extend(tensor_chunks(job, 1, "lm_head.bias", &small, 4));
    chunks.last_mut().unwrap().last_of_version = true;

    // Nothing newer than the starting checkpoint yet: an empty stream.
    let mut none = c
        .fetch_weights(pb::FetchWeightsRequest { job_id: job, have_version: 0, worker_id: worker })
        .await
        .unwrap()
        .into_inner();
    assert!(none.message().await.unwrap().is_none());

    let published = c.publish_weights(tokio_stream::iter(chunks.clone())).await.unwrap().into_inner();
    assert_eq!(
        (published.policy_version, published.tensors, published.bytes),
        (1, 2, (big.len() + small.len()) as u64)
    );
    let hb = c.heartbeat(pb::HeartbeatRequest { worker_id: worker, ..Default::default() }).await.unwrap().into_inner();
    assert_eq!(hb.policy_version, 1);

    let mut stream = c
        .fetch_weights(pb::FetchWeightsRequest { job_id: job, have_version: 0, worker_id: worker })
        .await
        .unwrap()
        .into_inner();
    let mut tensors: Vec<(String, Vec<u8>, Vec<i64>, String)> = Vec::new();
    let mut last_of_version = 0;
    while let Some(chunk) = stream.message().await.unwrap() {
        assert!(chunk.data.len() <= medtvt_proto::MAX_WEIGHT_CHUNK_BYTES);
        assert_eq!(chunk.policy_version, 1);
        if chunk.offset == 0 {
            tensors.push((chunk.tensor_name.clone(), Vec::new(), chunk.shape.clone(), chunk.dtype.clone()));
        }
        let current = tensors.last_mut().unwrap();
        assert_eq!(chunk.offset as usize, current.1.len());
        current.1.extend_from_slice(&chunk.data);
        last_of_version += chunk.last_of_version as u32;
    }
    assert_eq!(last_of_version, 1);
    assert_eq!(tensors.len(), 2);
    assert_eq!(tensors[0].0, "model.layers.0.mlp.up_proj.weight");
    assert!(tensors[0].1 == big, "big tensor differs");
    assert_eq!((tensors[0].2.clone(), tensors[0].3.as_str()), (vec![big.len() as i64 / 2], "bf16"));
    assert_eq!(tensors[1].1, small);

    let mut current = c
        .fetch_weights(pb::FetchWeightsRequest { job_id: job, have_version: 1, worker_id: worker })
        .await
        .unwrap()
        .into_inner();
    assert!(current.message().await.unwrap().is_none(), "up to date: nothing to send");
    let err = c.publish_weights(tokio_stream::iter(chunks.clone())).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "versions only move forward");
    let mut truncated = chunks.clone();
    truncated.truncate(3);
    truncated.iter_mut().for_each(|ch| ch.policy_version = 2);
    let err = c.publish_weights(tokio_stream::iter(truncated)).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "a version without last_of_version is refused");
    assert_eq!(job_status(&mut c, job).await.policy_version, 1);
    server.stop().await;
}

#[tokio::test]
async fn rendezvous_gathers_every_rank_payload_in_rank_order() {
    let server = TestServer::start(options()).await;
    let mut c = server.client().await;
    let job = submit(&mut c, server.config("sft", ""), &[]).await;
    let call = |rank: u32, payload: &'static str| {
        let mut c = c.clone();
        async move {
            let req = pb::RendezvousRequest {
                job_id: job,
                key: "collective/0".into(),
                rank,
                world_size: 2,
                payload: payload.into(),
            };
            c.rendezvous(req).await.map(|r| r.into_inner().payloads)
        }
    };
    let rank1 = tokio::spawn(call(1, "10.0.0.2:29500"));
    let rank0 = tokio::spawn(call(0, "10.0.0.1:29500"));
    let expected: Vec<prost::bytes::Bytes> = vec!["10.0.0.1:29500".into(), "10.0.0.2:29500".into()];
    assert_eq!(rank0.await.unwrap().unwrap(), expected);
    assert_eq!(rank1.await.unwrap().unwrap(), expected);
    let bad =
        pb::RendezvousRequest { job_id: job, key: "k".into(), rank: 2, world_size: 2, payload: Default::default() };
    assert_eq!(c.rendezvous(bad).await.unwrap_err().code(), Code::InvalidArgument);
    server.stop().await;
}

#[tokio::test]
async fn token_is_enforced_and_health_stays_open() {
    let server = TestServer::start(ServerOptions { auth_token: Some("s3cret-token".into()), ..options() }).await;
    let status = |c: &mut medtvt_proto::client::Client| {
        let mut c = c.clone();
        async move { c.get_status(pb::StatusRequest::default()).await.map(drop).map_err(|e| e.code()) }
    };
    let mut anonymous = server.client().await;
    assert_eq!(status(&mut anonymous).await, Err(Code::Unauthenticated));
    let mut wrong = server.client_with_token(Some("s3cret-tokem")).await;
    assert_eq!(status(&mut wrong).await, Err(Code::Unauthenticated));
    let mut right = server.client_with_token(Some("s3cret-token")).await;
    assert_eq!(status(&mut right).await, Ok(()));

    let channel = tonic::transport::Endpoint::from_shared(server.url.clone()).unwrap().connect().await.unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let req = tonic_health::pb::HealthCheckRequest { service: medtvt_proto::SERVICE_NAME.into() };
    let reply = health.check(req).await.unwrap().into_inner();
    assert_eq!(reply.status, tonic_health::pb::health_check_response::ServingStatus::Serving as i32);
    server.stop().await;
}

#[tokio::test]
async fn oversized_messages_are_refused() {
    let server = TestServer::start(ServerOptions { max_message_bytes: 1 << 20, ..options() }).await;
    let options = ConnectOptions { attempts: 3, max_message_bytes: 16 << 20, ..ConnectOptions::default() };
    let mut c = client::connect_with(&server.url, None, &options).await.unwrap();
    let job = submit(&mut c, server.config("grpo", ""), &[]).await;
    let data = vec![7u8; 2 << 20];
    let mut chunks = tensor_chunks(job, 1, "w", &data, data.len());
    chunks[0].last_of_version = true;
    let err = c.publish_weights(tokio_stream::iter(chunks)).await.unwrap_err();
    assert!(matches!(err.code(), Code::OutOfRange | Code::ResourceExhausted), "{err:?}");
    assert_eq!(job_status(&mut c, job).await.policy_version, 0);
    server.stop().await;
}

use medtvt_coordinator::ServerOptions;
