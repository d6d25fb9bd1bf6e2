//! Loss parity with TRL: `grpo::grpo_loss` on the fixed log-probs, advantages and mask of
//! tests/fixtures/grpo_loss.json equals what TRL's own `GRPOTrainer._compute_loss` computed from
//! them (scripts/make_grpo_loss_fixtures.py), in every TRL loss type we have an aggregation mode
//! for: the loss, its gradient with respect to every policy log-prob, the mean k3 KL and the
//! clip fractions, to 1e-6.

use medtvt_learner::grpo::{grpo_loss, GrpoBatch, GrpoOptions, KlEstimator, LossAggregation};
use serde::Deserialize;
use tch::{Kind, Tensor};

#[derive(Deserialize)]
struct Fixture {
    beta: f64,
    eps_low: f64,
    eps_high: f64,
    max_completion_length: f64,
    logp: Vec<Vec<f64>>,
    logp_old: Vec<Vec<f64>>,
    logp_ref: Vec<Vec<f64>>,
    mask: Vec<Vec<f64>>,
    advantages: Vec<f64>,
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    loss_type: String,
    loss: f64,
    grad_logp: Vec<Vec<f64>>,
    kl_mean: f64,
    clip_fraction: f64,
    clip_low_fraction: f64,
    clip_high_fraction: f64,
}

fn matrix(rows: &[Vec<f64>]) -> Tensor {
    let flat: Vec<f64> = rows.iter().flatten().copied().collect();
    Tensor::from_slice(&flat).view([rows.len() as i64, rows[0].len() as i64])
}

fn close(what: &str, ours: f64, theirs: f64) {
    assert!((ours - theirs).abs() < 1e-6, "{what}: ours {ours}, TRL {theirs}");
}

/// Our aggregation mode (and Dr. GRPO divisor) for a TRL loss type.
fn aggregation(loss_type: &str, max_completion_length: f64) -> (LossAggregation, Option<f64>) {
    match loss_type {
        "grpo" => (LossAggregation::SeqMeanTokenMean, None),
        // DAPO normalises by the generation batch's tokens: with one process and one
        // micro-batch that is bnpo's token mean.
        "bnpo" | "dapo" => (LossAggregation::TokenMean, None),
        "dr_grpo" => (LossAggregation::SeqMeanTokenSum, Some(max_completion_length)),
        other => panic!("no aggregation mode for TRL loss type {other}"),
    }
}

#[test]
fn grpo_loss_equals_trls_in_every_matching_loss_type() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/grpo_loss.json");
    let text = std::fs::read_to_string(path).expect("fixture (scripts/make_grpo_loss_fixtures.py)");
    let f: Fixture = serde_json::from_str(&text).expect("fixture parses");
    let (old, reference, mask) = (matrix(&f.logp_old), matrix(&f.logp_ref), matrix(&f.mask));
    let advantages = Tensor::from_slice(&f.advantages);
    assert_eq!(f.cases.len(), 4);
    for case in &f.cases {
        let (loss_aggregation, token_sum_divisor) = aggregation(&case.loss_type, f.max_completion_length);
        let options = GrpoOptions {
            eps_low: f.eps_low,
            eps_high: f.eps_high,
            beta: f.beta,
            kl_estimator: KlEstimator::K3,
            loss_aggregation,
            token_sum_divisor,
            ..GrpoOptions::default()
        };
        let logp = matrix(&f.logp).set_requires_grad(true);
        let batch = GrpoBatch {
            logp: &logp,
            logp_old: Some(&old),
            logp_ref: Some(&reference),
            logp_sampler: None,
            advantages: &advantages,
            mask: &mask,
        };
        let out = grpo_loss(batch, &options).unwrap();
        let name = |what: &str| format!("{} {what}", case.loss_type);
        close(&name("loss"), out.loss.double_value(&[]), case.loss);
        close(&name("kl"), out.metrics.kl_mean.unwrap(), case.kl_mean);
        close(&name("clip fraction"), out.metrics.clip_fraction, case.clip_fraction);
        close(&name("low clip fraction"), out.metrics.clip_low_fraction, case.clip_low_fraction);
        close(&name("high clip fraction"), out.metrics.clip_high_fraction, case.clip_high_fraction);
        out.loss.backward();
        let ours = Vec::<f64>::try_from(logp.grad().to_kind(Kind::Double).view([-1])).unwrap();
        let theirs: Vec<f64> = case.grad_logp.iter().flatten().copied().collect();
        for (i, (a, b)) in ours.iter().zip(&theirs).enumerate() {
            close(&name(&format!("gradient of token {i}")), *a, *b);
        }
    }
    // The fixture exercises both clips, so the clipped branches are compared too.
    assert!(f.cases[0].clip_low_fraction > 0.0 && f.cases[0].clip_high_fraction > 0.0);
}
