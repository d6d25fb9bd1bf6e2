//! The pipeline gauges a running coordinator records (prompts waiting, leased prompts, queue
//! depth, policy lag), read back through a real OTel SDK pipeline with an in-memory exporter
//! while a GRPO job moves prompts from waiting to leased to queued to trained, and through
//! GetStatus, which `medtvt status` prints.

mod common;

use common::*;
use medtvt_coordinator::ServerOptions;
use medtvt_proto::v1 as pb;
use medtvt_telemetry::metrics::RunMetrics;
use opentelemetry::metrics::MeterProvider as _;
use opentelemetry_sdk::metrics::data::{AggregatedMetrics, MetricData};
use opentelemetry_sdk::metrics::{InMemoryMetricExporter, PeriodicReader, SdkMeterProvider};
use std::time::Duration;

const GAUGES: [&str; 4] = [
    "medtvt.coordinator.prompts_waiting",
    "medtvt.coordinator.leased_prompts",
    "medtvt.coordinator.queue_depth",
    "medtvt.policy.lag",
];

/// The coordinator's meter, and a way to read the last exported value of each gauge.
struct Recorded {
    provider: SdkMeterProvider,
    exporter: InMemoryMetricExporter,
}

impl Recorded {
    fn new() -> Recorded {
        let exporter = InMemoryMetricExporter::default();
        let provider =
            SdkMeterProvider::builder().with_reader(PeriodicReader::builder(exporter.clone()).build()).build();
        Recorded { provider, exporter }
    }

    fn metrics(&self) -> RunMetrics {
        RunMetrics::from_meter(&self.provider.meter("coordinator-test"))
    }

    /// The latest value of each of [`GAUGES`], in that order (`None` when not recorded yet).
    fn latest(&self) -> [Option<u64>; 4] {
        self.exporter.reset();
        self.provider.force_flush().expect("flushing the meter provider");
        let exported = self.exporter.get_finished_metrics().expect("reading the in-memory exporter");
        GAUGES.map(|name| {
            let data = exported
                .iter()
                .flat_map(|rm| rm.scope_metrics())
                .flat_map(|sm| sm.metrics())
                .find(|m| m.name() == name)?;
            match data.data() {
                AggregatedMetrics::U64(MetricData::Gauge(gauge)) => gauge.data_points().last().map(|p| p.value()),
                _ => panic!("{name} is not a u64 gauge"),
            }
        })
    }

    /// Waits (a few reaper ticks at most) until the gauges read `expected`.
    async fn expect(&self, expected: [u64; 4], when: &str) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let latest = self.latest();
            if latest == expected.map(Some) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{when}: gauges {GAUGES:?} are {latest:?}, expected {expected:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

#[tokio::test]
async fn the_reaper_records_the_running_jobs_pipeline() {
    let recorded = Recorded::new();
    let server = TestServer::start(ServerOptions { metrics: recorded.metrics(), ..options() }).await;
    let mut c = server.client().await;
    // Nothing runs yet: every gauge reads 0.
    recorded.expect([0, 0, 0, 0], "before any job").await;

    // 3 steps of 2 prompts, max_staleness 1: a window of 6 prompts may be leased.
    let job = submit(&mut c, server.config("grpo", ""), &[]).await;
    recorded.expect([6, 0, 0, 0], "a fresh GRPO job").await;
    let me = register(&mut c, pb::Role::RolloutWorker, "w", 0).await;
    let first = lease(&mut c, me, job, 3).await;
    recorded.expect([3, 3, 0, 0], "three prompts leased").await;
    // GetStatus (what `medtvt status` prints) reports the same values.
    let pipeline =
        c.get_status(pb::StatusRequest::default()).await.unwrap().into_inner().pipeline.expect("the pipeline gauges");
    assert_eq!(
        (pipeline.job_id, pipeline.prompts_waiting, pipeline.leased_prompts, pipeline.queue_depth, pipeline.policy_lag),
        (job, 3, 3, 0, 0)
    );
    let groups = groups_for(&first, me, 0);
    submit_groups(&mut c, groups[..2].to_vec()).await;
    recorded.expect([3, 1, 2, 0], "two groups back").await;

    // Step 0 trains the two version-0 groups; the policy moves to version 1.
    for rank in 0..2 {
        assert_eq!(pull(&mut c, job, rank, 0, 1_000).await.groups.len(), 1);
        report(&mut c, job, rank, 0, 1).await;
    }
    submit_groups(&mut c, vec![group_for(&first, me, &first.prompts[2], 1)]).await;
    let second = lease(&mut c, me, job, 10).await;
    assert_eq!(second.prompts.len(), 3, "4 prompts left to train, 1 of them queued");
    submit_groups(&mut c, vec![group_for(&second, me, &second.prompts[0], 0)]).await;
    // Step 1 is assembled at version 1 from groups sampled at versions 1 and 0: lag 1.
    assert_eq!(pull(&mut c, job, 0, 1, 1_000).await.groups.len(), 1);
    recorded.expect([0, 2, 0, 1], "step 1 assembled").await;

    c.cancel_job(pb::CancelJobRequest { job_id: job }).await.unwrap();
    recorded.expect([0, 0, 0, 0], "the job cancelled").await;
    server.stop().await;
}
