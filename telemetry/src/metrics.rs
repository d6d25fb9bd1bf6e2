//! The OTel instruments a MedTVT run records, under `medtvt.*` names, behind one cheap handle.
//!
//! | our key (metrics.jsonl)  | OTel instrument                    | kind          | unit        |
//! |--------------------------|------------------------------------|---------------|-------------|
//! | `reward_mean`            | `medtvt.reward.mean`               | gauge f64     | `1`         |
//! | `reward_std`             | `medtvt.reward.std`                | gauge f64     | `1`         |
//! | `loss`                   | `medtvt.train.loss`                | gauge f64     | `1`         |
//! | `kl` (or `kl_mean`)      | `medtvt.train.kl`                  | gauge f64     | `1`         |
//! | `clip_fraction`          | `medtvt.train.clip_fraction`       | gauge f64     | `1`         |
//! | `tokens_per_s`           | `medtvt.train.tokens_per_second`   | gauge f64     | `{token}/s` |
//! | `mismatch/logp_abs/mean` | `medtvt.train.sampler_mismatch.mean` | gauge f64   | `1`         |
//! | `mismatch/logp_abs/p99`  | `medtvt.train.sampler_mismatch.p99`  | gauge f64   | `1`         |
//! | `mismatch/logp_abs/max`  | `medtvt.train.sampler_mismatch.max`  | gauge f64   | `1`         |
//! | `mismatch/outside_clip`  | `medtvt.train.sampler_mismatch.outside_clip` | gauge f64 | `1`   |
//! | `step_time_s`            | `medtvt.train.step.duration`       | histogram f64 | `s`         |
//! | any other key, e.g. `reward/jaccard` | `medtvt.train.metric` with attribute `medtvt.metric` = key | gauge f64 | `1` |
//! | `set_queue_depth`        | `medtvt.coordinator.queue_depth`   | gauge u64     | `{group}`   |
//! | `set_leased_prompts`     | `medtvt.coordinator.leased_prompts`| gauge u64     | `{prompt}`  |
//! | `set_prompts_waiting`    | `medtvt.coordinator.prompts_waiting`| gauge u64    | `{prompt}`  |
//! | `set_policy_lag`         | `medtvt.policy.lag`                | gauge u64     | `{version}` |
//!
//! The `mismatch/*` values compare the sampler's log-probs with the learner's on the tokens that
//! the policy version being trained sampled itself (lag 0): |logp_learner - logp_sampler| per
//! token and the fraction of those tokens whose ratio is outside the clip range before any update.
//!
//! Per-step scalars are gauges (the last value per export period; a backend plots them over
//! time) except the step time, a histogram so its distribution survives aggregation.
//!
//! The coordinator records its four gauges for the running GRPO job (all 0 when none runs), so
//! they read as the stages of the rollout pipeline: `prompts_waiting` (leasable now, no worker
//! has taken them) -> `leased_prompts` (out with rollout workers) -> `queue_depth` (their groups
//! accepted, waiting for the learners). Prompts waiting mean the workers are the bottleneck (the
//! signal to add workers); a deep queue means the learners are. `policy.lag` is the staleness of
//! the last training batch: the policy version it was assembled at minus the oldest version that
//! sampled one of its groups.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use opentelemetry::metrics::{Gauge, Histogram, Meter};
use opentelemetry::{global, KeyValue};

use crate::init::INSTRUMENTATION_SCOPE;

/// Set by [`crate::init`] once it has installed a global meter provider.
static METER_PROVIDER_INSTALLED: AtomicBool = AtomicBool::new(false);

pub(crate) fn mark_meter_provider_installed() {
    METER_PROVIDER_INSTALLED.store(true, Ordering::Release);
}

/// Attribute naming the key of a step value that has no dedicated instrument.
pub const OTHER_METRIC_KEY_ATTRIBUTE: &str = "medtvt.metric";
/// Instrument for step values that have no dedicated instrument.
pub const OTHER_METRIC_INSTRUMENT: &str = "medtvt.train.metric";

/// Upper bucket bounds of the step-time histogram, in seconds (a tiny CPU step to a slow GPU one).
const STEP_TIME_BOUNDS_S: [f64; 13] = [0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0, 120.0, 300.0];

/// A per-step scalar with a dedicated instrument.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepMetric {
    RewardMean,
    RewardStd,
    Loss,
    Kl,
    ClipFraction,
    TokensPerSecond,
    StepTime,
    SamplerMismatchMean,
    SamplerMismatchP99,
    SamplerMismatchMax,
    SamplerMismatchOutsideClip,
}

impl StepMetric {
    pub const ALL: [StepMetric; 11] = [
        StepMetric::RewardMean,
        StepMetric::RewardStd,
        StepMetric::Loss,
        StepMetric::Kl,
        StepMetric::ClipFraction,
        StepMetric::TokensPerSecond,
        StepMetric::StepTime,
        StepMetric::SamplerMismatchMean,
        StepMetric::SamplerMismatchP99,
        StepMetric::SamplerMismatchMax,
        StepMetric::SamplerMismatchOutsideClip,
    ];

    /// The key our code reports it under (metrics.jsonl, the coordinator's latest metrics).
    pub fn key(self) -> &'static str {
        match self {
            StepMetric::RewardMean => "reward_mean",
            StepMetric::RewardStd => "reward_std",
            StepMetric::Loss => "loss",
            StepMetric::Kl => "kl",
            StepMetric::ClipFraction => "clip_fraction",
            StepMetric::TokensPerSecond => "tokens_per_s",
            StepMetric::StepTime => "step_time_s",
            StepMetric::SamplerMismatchMean => "mismatch/logp_abs/mean",
            StepMetric::SamplerMismatchP99 => "mismatch/logp_abs/p99",
            StepMetric::SamplerMismatchMax => "mismatch/logp_abs/max",
            StepMetric::SamplerMismatchOutsideClip => "mismatch/outside_clip",
        }
    }

    /// The metric for a reported key; `kl_mean` (the GRPO loss's field name) is an alias of `kl`.
    pub fn from_key(key: &str) -> Option<StepMetric> {
        if key == "kl_mean" {
            return Some(StepMetric::Kl);
        }
        Self::ALL.into_iter().find(|metric| metric.key() == key)
    }

    /// The OTel instrument name.
    pub fn instrument_name(self) -> &'static str {
        match self {
            StepMetric::RewardMean => "medtvt.reward.mean",
            StepMetric::RewardStd => "medtvt.reward.std",
            StepMetric::Loss => "medtvt.train.loss",
            StepMetric::Kl => "medtvt.train.kl",
            StepMetric::ClipFraction => "medtvt.train.clip_fraction",
            StepMetric::TokensPerSecond => "medtvt.train.tokens_per_second",
            StepMetric::StepTime => "medtvt.train.step.duration",
            StepMetric::SamplerMismatchMean => "medtvt.train.sampler_mismatch.mean",
            StepMetric::SamplerMismatchP99 => "medtvt.train.sampler_mismatch.p99",
            StepMetric::SamplerMismatchMax => "medtvt.train.sampler_mismatch.max",
            StepMetric::SamplerMismatchOutsideClip => "medtvt.train.sampler_mismatch.outside_clip",
        }
    }

    fn unit(self) -> &'static str {
        match self {
            StepMetric::TokensPerSecond => "{token}/s",
            StepMetric::StepTime => "s",
            _ => "1",
        }
    }

    fn description(self) -> &'static str {
        match self {
            StepMetric::RewardMean => "Mean reward of the step's completions",
            StepMetric::RewardStd => "Standard deviation of the step's completion rewards",
            StepMetric::Loss => "GRPO loss of the step",
            StepMetric::Kl => "Mean per-token KL to the reference policy",
            StepMetric::ClipFraction => "Fraction of tokens where the ratio clip was active",
            StepMetric::TokensPerSecond => "Tokens processed per second",
            StepMetric::StepTime => "Wall time of one step",
            StepMetric::SamplerMismatchMean => {
                "Mean |learner - sampler| log-prob on tokens the trained version sampled"
            }
            StepMetric::SamplerMismatchP99 => "99th percentile of |learner - sampler| log-prob on lag-0 tokens",
            StepMetric::SamplerMismatchMax => "Largest |learner - sampler| log-prob on lag-0 tokens",
            StepMetric::SamplerMismatchOutsideClip => {
                "Fraction of lag-0 tokens whose ratio is outside the clip range before the update"
            }
        }
    }
}

/// The instruments, created once per handle.
struct Instruments {
    /// One gauge per [`StepMetric`] except `StepTime`, in `StepMetric::ALL` order.
    step_gauges: Vec<(StepMetric, Gauge<f64>)>,
    step_duration: Histogram<f64>,
    other: Gauge<f64>,
    queue_depth: Gauge<u64>,
    leased_prompts: Gauge<u64>,
    prompts_waiting: Gauge<u64>,
    policy_lag: Gauge<u64>,
}

impl Instruments {
    fn new(meter: &Meter) -> Self {
        let step_gauges = StepMetric::ALL
            .into_iter()
            .filter(|metric| *metric != StepMetric::StepTime)
            .map(|metric| {
                let gauge = meter
                    .f64_gauge(metric.instrument_name())
                    .with_unit(metric.unit())
                    .with_description(metric.description())
                    .build();
                (metric, gauge)
            })
            .collect();
        let step = StepMetric::StepTime;
        let u64_gauge = |name: &'static str, unit: &'static str, description: &'static str| {
            meter.u64_gauge(name).with_unit(unit).with_description(description).build()
        };
        Self {
            step_gauges,
            step_duration: meter
                .f64_histogram(step.instrument_name())
                .with_unit(step.unit())
                .with_description(step.description())
                .with_boundaries(STEP_TIME_BOUNDS_S.to_vec())
                .build(),
            other: meter
                .f64_gauge(OTHER_METRIC_INSTRUMENT)
                .with_unit("1")
                .with_description("A step value without its own instrument; its key is in medtvt.metric")
                .build(),
            queue_depth: u64_gauge(
                "medtvt.coordinator.queue_depth",
                "{group}",
                "Rollout groups accepted and waiting for the learners",
            ),
            leased_prompts: u64_gauge(
                "medtvt.coordinator.leased_prompts",
                "{prompt}",
                "Prompts leased to rollout workers and not yet returned",
            ),
            prompts_waiting: u64_gauge(
                "medtvt.coordinator.prompts_waiting",
                "{prompt}",
                "Prompts the coordinator would lease now but no rollout worker has taken",
            ),
            policy_lag: u64_gauge(
                "medtvt.policy.lag",
                "{version}",
                "Policy versions between the one that trained the last batch and the oldest one that sampled it",
            ),
        }
    }

    fn record(&self, key: &str, value: f64, attrs: &[KeyValue]) {
        match StepMetric::from_key(key) {
            // A NaN/inf duration would poison the histogram's sum forever; gauges keep NaN
            // visible instead, since a NaN loss is exactly what one wants to see.
            Some(StepMetric::StepTime) if value.is_finite() => self.step_duration.record(value, attrs),
            Some(StepMetric::StepTime) => {}
            Some(metric) => {
                if let Some((_, gauge)) = self.step_gauges.iter().find(|(m, _)| *m == metric) {
                    gauge.record(value, attrs);
                }
            }
            None => {
                let mut with_key = attrs.to_vec();
                with_key.push(KeyValue::new(OTHER_METRIC_KEY_ATTRIBUTE, key.to_owned()));
                self.other.record(value, &with_key);
            }
        }
    }
}

/// Handle to the run's instruments; cheap to clone, and a no-op when telemetry is not exporting.
#[derive(Clone)]
pub struct RunMetrics {
    instruments: Option<Arc<Instruments>>,
}

impl std::fmt::Debug for RunMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunMetrics").field("enabled", &self.is_enabled()).finish()
    }
}

impl RunMetrics {
    /// Instruments on the global meter provider installed by [`crate::init`]; a no-op handle when
    /// `init` installed none (no OTLP endpoint) or has not run yet — so create it after `init`.
    pub fn global() -> Self {
        if METER_PROVIDER_INSTALLED.load(Ordering::Acquire) {
            Self::from_meter(&global::meter(INSTRUMENTATION_SCOPE))
        } else {
            Self::disabled()
        }
    }

    /// Instruments on a given meter (a custom provider, or a test's in-memory one).
    pub fn from_meter(meter: &Meter) -> Self {
        Self { instruments: Some(Arc::new(Instruments::new(meter))) }
    }

    /// A handle whose every method returns at once.
    pub fn disabled() -> Self {
        Self { instruments: None }
    }

    /// Whether recordings go anywhere.
    pub fn is_enabled(&self) -> bool {
        self.instruments.is_some()
    }

    /// Records one step's scalars, mapped by key as in the module table, with `attrs` on each
    /// point (keep them low-cardinality: stage, job id — never the step number).
    pub fn record_step(&self, values: &BTreeMap<String, f64>, attrs: &[KeyValue]) {
        let Some(instruments) = &self.instruments else {
            return;
        };
        for (key, value) in values {
            instruments.record(key, *value, attrs);
        }
    }

    /// Rollout groups accepted by the coordinator and waiting for the learners.
    pub fn set_queue_depth(&self, depth: u64) {
        if let Some(instruments) = &self.instruments {
            instruments.queue_depth.record(depth, &[]);
        }
    }

    /// Prompts currently leased to rollout workers.
    pub fn set_leased_prompts(&self, leased: u64) {
        if let Some(instruments) = &self.instruments {
            instruments.leased_prompts.record(leased, &[]);
        }
    }

    /// Prompts the coordinator would lease right now but no rollout worker has taken.
    pub fn set_prompts_waiting(&self, waiting: u64) {
        if let Some(instruments) = &self.instruments {
            instruments.prompts_waiting.record(waiting, &[]);
        }
    }

    /// How many policy versions the rollouts being trained on lag behind the learner.
    pub fn set_policy_lag(&self, lag: u64) {
        if let Some(instruments) = &self.instruments {
            instruments.policy_lag.record(lag, &[]);
        }
    }
}

#[cfg(test)]
mod tests {
    use opentelemetry::metrics::MeterProvider as _;
    use opentelemetry_sdk::metrics::data::{AggregatedMetrics, MetricData, ResourceMetrics};
    use opentelemetry_sdk::metrics::{InMemoryMetricExporter, PeriodicReader, SdkMeterProvider};

    use super::*;

    #[test]
    fn every_step_metric_round_trips_through_its_key_and_has_a_distinct_name() {
        for metric in StepMetric::ALL {
            assert_eq!(StepMetric::from_key(metric.key()), Some(metric));
            assert!(metric.instrument_name().starts_with("medtvt."));
        }
        let mut names: Vec<_> = StepMetric::ALL.iter().map(|m| m.instrument_name()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), StepMetric::ALL.len());
        assert_eq!(StepMetric::from_key("kl_mean"), Some(StepMetric::Kl));
        assert_eq!(StepMetric::from_key("reward/jaccard"), None);
    }

    #[test]
    fn a_disabled_handle_reports_itself_and_records_nothing() {
        let metrics = RunMetrics::disabled();
        assert!(!metrics.is_enabled());
        metrics.record_step(&BTreeMap::from([("loss".to_owned(), 1.0)]), &[]);
        metrics.set_queue_depth(3);
    }

    /// Records through a real SDK pipeline and reads back what an exporter would receive.
    #[test]
    fn record_step_lands_in_the_named_instruments_with_attributes() {
        let exporter = InMemoryMetricExporter::default();
        let provider =
            SdkMeterProvider::builder().with_reader(PeriodicReader::builder(exporter.clone()).build()).build();
        let metrics = RunMetrics::from_meter(&provider.meter("test"));
        assert!(metrics.is_enabled());
        let values = BTreeMap::from([
            ("loss".to_owned(), 0.25),
            ("kl_mean".to_owned(), 0.01),
            ("step_time_s".to_owned(), 1.5),
            ("reward/jaccard".to_owned(), 0.75),
            ("mismatch/logp_abs/p99".to_owned(), 2e-7),
        ]);
        metrics.record_step(&values, &[KeyValue::new("medtvt.stage", "grpo")]);
        metrics.record_step(&BTreeMap::from([("step_time_s".to_owned(), f64::INFINITY)]), &[]);
        metrics.set_queue_depth(7);
        metrics.set_prompts_waiting(5);
        metrics.set_policy_lag(2);
        if let Err(error) = provider.force_flush() {
            panic!("flush failed: {error}");
        }
        let exported = match exporter.get_finished_metrics() {
            Ok(exported) => exported,
            Err(error) => panic!("reading the in-memory exporter: {error}"),
        };

        assert_eq!(gauge_f64(&exported, "medtvt.train.loss"), vec![(0.25, vec!["medtvt.stage=grpo".to_owned()])]);
        assert_eq!(gauge_f64(&exported, "medtvt.train.kl"), vec![(0.01, vec!["medtvt.stage=grpo".to_owned()])]);
        assert_eq!(
            gauge_f64(&exported, "medtvt.train.sampler_mismatch.p99"),
            vec![(2e-7, vec!["medtvt.stage=grpo".to_owned()])]
        );
        assert_eq!(
            gauge_f64(&exported, OTHER_METRIC_INSTRUMENT),
            vec![(0.75, vec!["medtvt.metric=reward/jaccard".to_owned(), "medtvt.stage=grpo".to_owned()])]
        );
        // The infinite step time was dropped: one point, sum 1.5.
        assert_eq!(histogram_count_sum(&exported, "medtvt.train.step.duration"), Some((1, 1.5)));
        assert_eq!(gauge_u64(&exported, "medtvt.coordinator.queue_depth"), vec![7]);
        assert_eq!(gauge_u64(&exported, "medtvt.coordinator.prompts_waiting"), vec![5]);
        assert_eq!(gauge_u64(&exported, "medtvt.policy.lag"), vec![2]);
        assert!(gauge_u64(&exported, "medtvt.coordinator.leased_prompts").is_empty());
    }

    fn find<'a>(exported: &'a [ResourceMetrics], name: &str) -> Option<&'a AggregatedMetrics> {
        exported
            .iter()
            .flat_map(|rm| rm.scope_metrics())
            .flat_map(|sm| sm.metrics())
            .find(|m| m.name() == name)
            .map(|m| m.data())
    }

    /// (value, sorted "key=value" attributes) of each point of an f64 gauge.
    fn gauge_f64(exported: &[ResourceMetrics], name: &str) -> Vec<(f64, Vec<String>)> {
        let Some(AggregatedMetrics::F64(MetricData::Gauge(gauge))) = find(exported, name) else {
            return Vec::new();
        };
        gauge
            .data_points()
            .map(|point| {
                let mut attrs: Vec<String> = point.attributes().map(|kv| format!("{}={}", kv.key, kv.value)).collect();
                attrs.sort();
                (point.value(), attrs)
            })
            .collect()
    }

    fn gauge_u64(exported: &[ResourceMetrics], name: &str) -> Vec<u64> {
        let Some(AggregatedMetrics::U64(MetricData::Gauge(gauge))) = find(exported, name) else {
            return Vec::new();
        };
        gauge.data_points().map(|point| point.value()).collect()
    }

    fn histogram_count_sum(exported: &[ResourceMetrics], name: &str) -> Option<(u64, f64)> {
        let Some(AggregatedMetrics::F64(MetricData::Histogram(histogram))) = find(exported, name) else {
            return None;
        };
        let point = histogram.data_points().next()?;
        Some((point.count(), point.sum()))
    }
}
