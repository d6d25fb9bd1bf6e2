//! How fast the coordinator relays weights over loopback: publish then fetch 256 MiB in 1 MiB
//! chunks. Ignored by default; run with
//! `cargo test -p medtvt-coordinator --release --test weights_throughput -- --ignored --nocapture`.

mod common;

use common::*;
use medtvt_proto::v1 as pb;
use std::time::Instant;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement, not a check; run explicitly"]
async fn weights_relay_throughput() {
    let server = TestServer::start(options()).await;
    let mut c = server.client().await;
    let job = submit(&mut c, server.config("grpo", ""), &[]).await;
    const MIB: usize = 1 << 20;
    let tensors = 16;
    let per_tensor = 16 * MIB;
    let block = prost::bytes::Bytes::from(vec![3u8; MIB]);
    let mut chunks = Vec::new();
    for t in 0..tensors {
        for i in 0..per_tensor / MIB {
            chunks.push(pb::WeightChunk {
                job_id: job,
                policy_version: 1,
                tensor_name: format!("layer.{t}.weight"),
                dtype: "bf16".into(),
                shape: vec![(per_tensor / 2) as i64],
                data: block.clone(),
                offset: (i * MIB) as u64,
                total_bytes: per_tensor as u64,
                last_of_tensor: (i + 1) * MIB == per_tensor,
                last_of_version: t + 1 == tensors && (i + 1) * MIB == per_tensor,
            });
        }
    }
    let total = (tensors * per_tensor) as f64;
    let start = Instant::now();
    c.publish_weights(tokio_stream::iter(chunks)).await.unwrap();
    let publish = start.elapsed().as_secs_f64();
    let start = Instant::now();
    let mut stream = c
        .fetch_weights(pb::FetchWeightsRequest { job_id: job, have_version: 0, worker_id: 0 })
        .await
        .unwrap()
        .into_inner();
    let mut received = 0usize;
    while let Some(chunk) = stream.message().await.unwrap() {
        received += chunk.data.len();
    }
    let fetch = start.elapsed().as_secs_f64();
    assert_eq!(received, tensors * per_tensor);
    println!(
        "256 MiB: publish {:.2} s ({:.0} MiB/s), fetch {:.2} s ({:.0} MiB/s)",
        publish,
        total / MIB as f64 / publish,
        fetch,
        total / MIB as f64 / fetch
    );
    server.stop().await;
}
