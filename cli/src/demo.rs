//! `medtvt demo`: the whole MedTVT-R1 pipeline on the embedded tiny CPU default, as separate
//! processes over loopback gRPC: synthesise a MedTVT-QA set, start a local cluster (coordinator,
//! 2 learners, 2 rollout workers), run PT, SFT and GRPO as jobs on it, evaluate each stage's
//! checkpoint on the test split, print a before/after table, and draw the plots. Everything goes
//! under `runs/demo/` of the working directory.

use crate::cluster::{ClusterShape, LocalCluster};
use crate::eval_cmd::{evaluate, report_metrics, EvalArgs};
use crate::train_cmd::{run_stage, shutdown, StageJob};
use anyhow::Context;
use medtvt_data::synth::{synthesize, SynthConfig};
use medtvt_eval::{DiagnosisReward, DiseaseVocabulary, EvalReport, NameMatching, RewardWeights};
use medtvt_learner::metrics_log::{self, MetricsRecord};
use medtvt_proto::client;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The stage configs the demo runs, compiled into the binary so `make demo` needs no flags.
const STAGES: [(&str, &str, &str); 3] = [
    ("PT", "pt", include_str!("../../configs/tiny-pt.toml")),
    ("SFT", "sft", include_str!("../../configs/tiny-sft.toml")),
    ("GRPO", "grpo", include_str!("../../configs/tiny-grpo.toml")),
];

#[derive(clap::Args, Debug, Clone)]
pub struct DemoArgs {
    /// Encounters in the synthetic set (two QA samples each; 80/10/10 train/val/test).
    #[arg(long, default_value_t = 600)]
    pub encounters: usize,
    /// Test samples of each QA kind evaluated after every stage.
    #[arg(long, default_value_t = 60)]
    pub eval_samples: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

const RUN_DIR: &str = "runs/demo";

pub fn run(args: &DemoArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    let run_dir = PathBuf::from(RUN_DIR);
    let data_dir = run_dir.join("data");
    println!("== medtvt demo: PT -> SFT -> GRPO of the tiny MedTVT-R1 on synthetic MedTVT-QA (CPU) ==");
    if run_dir.exists() {
        std::fs::remove_dir_all(&run_dir)
            .with_context(|| format!("clearing the previous demo in {}", run_dir.display()))?;
    }

    println!("\n[1/5] synthesising {} encounters into {}", args.encounters, data_dir.display());
    let synth = SynthConfig { progress: true, image_size: 64, ..SynthConfig::new(args.encounters, args.seed) };
    let summary = synthesize(&data_dir, &synth).with_context(|| format!("writing {}", data_dir.display()))?;
    println!("      {} QA samples written", summary.samples);

    println!("\n[2/5] starting a local cluster: coordinator, 2 learners, 2 rollout workers (separate processes)");
    let shape =
        ClusterShape { learners: 2, rollout_workers: 2, run_dir: run_dir.clone(), job_roots: vec![run_dir.clone()] };
    let mut cluster = LocalCluster::start(&shape)?;
    println!("      coordinator at {}, logs in {}", cluster.url, cluster.log_dir.display());

    let runtime = tokio::runtime::Runtime::new().context("starting the tokio runtime")?;
    let mut rows: Vec<(&str, EvalReport)> = Vec::new();
    let mut combined: Vec<MetricsRecord> = Vec::new();
    let result: anyhow::Result<()> = runtime.block_on(async {
        let mut c = client::connect(&cluster.url, None).await?;
        for (i, (label, dir, toml)) in STAGES.iter().enumerate() {
            println!("\n[3/5] stage {}/3: {label}", i + 1);
            let stage_started = Instant::now();
            let job = StageJob { label: (*label).to_string(), config_toml: (*toml).to_string(), overrides: vec![] };
            let outcome = run_stage(&mut c, &job, Some(&mut cluster)).await?;
            let stage_dir = run_dir.join(dir);
            println!(
                "      {label} trained in {:.0?}; evaluating {} on the test split",
                stage_started.elapsed(),
                stage_dir.join("final").display()
            );
            let report = tokio::task::block_in_place(|| {
                evaluate(&eval_args(&stage_dir.join("final"), &data_dir, args.eval_samples))
            })?;
            let log = stage_dir.join("metrics.jsonl");
            if log.is_file() {
                combined.extend(metrics_log::read_all(&log)?);
            }
            combined.push(MetricsRecord {
                stage: (*dir).to_string(),
                step: outcome.steps,
                values: report_metrics(&report),
            });
            rows.push((label, report));
        }
        shutdown(&mut c).await
    });
    result?;
    cluster.wait_then_kill(Duration::from_secs(20));

    println!("\n[4/5] results on the test split ({} samples of each kind)\n", args.eval_samples);
    print!("{}", comparison_table(&rows));
    let report_of = |label: &str| rows.iter().find(|(l, _)| *l == label).map(|(_, r)| r);
    match (report_of("SFT"), report_of("GRPO")) {
        (Some(sft), Some(grpo)) if sft.disease.is_some() && grpo.disease.is_some() => {
            let references = medtvt_data::read_jsonl(&data_dir.join("qa.jsonl"))?;
            let (diff, se, n) = paired_jaccard_difference(sft, grpo, &references);
            println!("\n{}", grpo_verdict(diff, se, n));
        }
        _ => println!("\nNo disease-level samples were evaluated, so SFT and GRPO cannot be compared."),
    }
    if let Some((_, last)) = rows.last() {
        println!("\nFull report of the final (GRPO) checkpoint:\n\n{}", last.to_markdown());
    }

    println!("[5/5] plots");
    let combined_log = run_dir.join("metrics.jsonl");
    for record in &combined {
        metrics_log::append(&combined_log, record)?;
    }
    crate::plot::run(&crate::plot::PlotArgs { run_dir: run_dir.clone(), out: None })?;

    println!("\nDone in {:.0?}. Everything is under {}:", started.elapsed(), run_dir.display());
    println!("  data/               the synthetic MedTVT-QA set (WFDB, PNG, lab CSV, qa.jsonl)");
    println!("  pt/ sft/ grpo/      each stage's checkpoints (final/ is HF-readable) and metrics.jsonl");
    println!("  metrics.jsonl       all stages and evaluations; plots/ has reward, loss, KL and F1 charts");
    println!("  logs/               one log per process");
    Ok(())
}

fn eval_args(checkpoint: &Path, data: &Path, limit: usize) -> EvalArgs {
    EvalArgs {
        checkpoint: checkpoint.to_path_buf(),
        data: data.to_path_buf(),
        split: "test".into(),
        limit: Some(limit),
        batch_size: 16,
        max_new_tokens: 160,
        max_prompt_tokens: 512,
        exact: false,
        json: None,
        device: "cpu".into(),
    }
}

/// Per-sample Jaccard of GRPO minus SFT over the disease samples both answered: the mean
/// difference, its standard error (paired: the same samples on both sides) and the count.
fn paired_jaccard_difference(
    sft: &EvalReport,
    grpo: &EvalReport,
    references: &[medtvt_data::QaSample],
) -> (f64, f64, usize) {
    let reward =
        DiagnosisReward::new(DiseaseVocabulary::paper_default(NameMatching::Synonyms), RewardWeights::default());
    let by_id: HashMap<&str, &str> = references.iter().map(|s| (s.id.as_str(), s.answer.as_str())).collect();
    let jaccards = |r: &EvalReport| -> HashMap<String, f64> {
        r.answers
            .iter()
            .filter(|a| a.kind == "disease")
            .filter_map(|a| {
                by_id.get(a.id.as_str()).map(|reference| (a.id.clone(), reward.score(&a.answer, reference).jaccard))
            })
            .collect()
    };
    let (s, g) = (jaccards(sft), jaccards(grpo));
    let diffs: Vec<f64> = g.iter().filter_map(|(id, gj)| s.get(id).map(|sj| gj - sj)).collect();
    let (mean, se) = mean_and_standard_error(&diffs);
    (mean, se, diffs.len())
}

/// Mean and standard error of the mean (sample standard deviation / sqrt(n)).
fn mean_and_standard_error(values: &[f64]) -> (f64, f64) {
    let n = values.len() as f64;
    if n < 2.0 {
        return (values.first().copied().unwrap_or(0.0), f64::NAN);
    }
    let mean = values.iter().sum::<f64>() / n;
    let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0);
    (mean, (var / n).sqrt())
}

/// The demo's one-line answer to "did GRPO beat SFT?": only a difference beyond two standard
/// errors counts as a change.
fn grpo_verdict(diff: f64, se: f64, n: usize) -> String {
    let measured =
        format!("GRPO - SFT sample-wise Jaccard on {n} test samples: {diff:+.4} (paired standard error {se:.4})");
    if diff > 2.0 * se {
        format!("GRPO improved the sample-wise Jaccard over SFT. {measured}.")
    } else if diff < -2.0 * se {
        format!("GRPO did NOT improve over SFT: it made the sample-wise Jaccard worse. {measured}.")
    } else {
        format!("GRPO did NOT measurably improve over SFT: the change is within two standard errors. {measured}. See docs/results.md.")
    }
}

/// One row per stage: the disease-level headline numbers and the text overlap.
fn comparison_table(rows: &[(&str, EvalReport)]) -> String {
    let mut out =
        String::from("| Stage | Jaccard | Macro F1 | Micro F1 | Exact set | Valid format | BLEU-4 | ROUGE-L |\n");
    out.push_str("|---|---:|---:|---:|---:|---:|---:|---:|\n");
    for (label, r) in rows {
        let d = r.disease.as_ref();
        let t = r.text.as_ref();
        let f = |v: Option<f64>| v.map(|x| format!("{x:.4}")).unwrap_or_else(|| "-".into());
        out.push_str(&format!(
            "| {label} | {} | {} | {} | {} | {} | {} | {} |\n",
            f(d.map(|d| d.sample_jaccard)),
            f(d.map(|d| d.macro_avg.f1)),
            f(d.map(|d| d.micro_avg.f1)),
            f(d.map(|d| d.subset_accuracy)),
            f(d.map(|d| d.valid_format_rate)),
            f(t.map(|t| t.bleu4)),
            f(t.map(|t| t.rouge_l_f)),
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standard_error_matches_the_textbook_formula() {
        let (mean, se) = mean_and_standard_error(&[1.0, 2.0, 3.0, 4.0]);
        assert_eq!(mean, 2.5);
        // sample variance 5/3, se = sqrt(5/3 / 4)
        assert!((se - (5.0f64 / 12.0).sqrt()).abs() < 1e-12);
        assert!(mean_and_standard_error(&[0.3]).1.is_nan());
    }

    #[test]
    fn only_a_change_beyond_two_standard_errors_counts() {
        assert!(grpo_verdict(0.10, 0.03, 60).starts_with("GRPO improved"));
        assert!(grpo_verdict(0.0125, 0.02, 60).starts_with("GRPO did NOT measurably improve"));
        assert!(grpo_verdict(-0.07, 0.02, 60).contains("made the sample-wise Jaccard worse"));
        assert!(grpo_verdict(0.0125, 0.02, 60).contains("+0.0125"));
    }
}
