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
use medtvt_eval::EvalReport;
use medtvt_learner::metrics_log::{self, MetricsRecord};
use medtvt_proto::client;
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
        std::fs::remove_dir_all(&run_dir).with_context(|| format!("clearing the previous demo in {}", run_dir.display()))?;
    }

    println!("\n[1/5] synthesising {} encounters into {}", args.encounters, data_dir.display());
    let synth = SynthConfig { progress: true, image_size: 64, ..SynthConfig::new(args.encounters, args.seed) };
    let summary = synthesize(&data_dir, &synth).with_context(|| format!("writing {}", data_dir.display()))?;
    println!("      {} QA samples written", summary.samples);

    println!("\n[2/5] starting a local cluster: coordinator, 2 learners, 2 rollout workers (separate processes)");
    let mut cluster = LocalCluster::start(&ClusterShape { learners: 2, rollout_workers: 2, run_dir: run_dir.clone() })?;
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
            println!("      {label} trained in {:.0?}; evaluating {} on the test split", stage_started.elapsed(), stage_dir.join("final").display());
            let report = tokio::task::block_in_place(|| evaluate(&eval_args(&stage_dir.join("final"), &data_dir, args.eval_samples)))?;
            let log = stage_dir.join("metrics.jsonl");
            if log.is_file() {
                combined.extend(metrics_log::read_all(&log)?);
            }
            combined.push(MetricsRecord { stage: (*dir).to_string(), step: outcome.steps, values: report_metrics(&report) });
            rows.push((label, report));
        }
        shutdown(&mut c).await
    });
    result?;
    cluster.wait_then_kill(Duration::from_secs(20));

    println!("\n[4/5] results on the test split ({} samples of each kind)\n", args.eval_samples);
    print!("{}", comparison_table(&rows));
    let sft = rows.iter().find(|(l, _)| *l == "SFT").and_then(|(_, r)| r.disease.as_ref()).map(|d| d.sample_jaccard);
    let grpo = rows.iter().find(|(l, _)| *l == "GRPO").and_then(|(_, r)| r.disease.as_ref()).map(|d| d.sample_jaccard);
    match (sft, grpo) {
        (Some(s), Some(g)) if g > s => println!("\nGRPO improved the sample-wise Jaccard over SFT: {s:.4} -> {g:.4}."),
        (Some(s), Some(g)) => println!("\nGRPO did NOT improve the sample-wise Jaccard over SFT this time: {s:.4} -> {g:.4}."),
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

/// One row per stage: the disease-level headline numbers and the text overlap.
fn comparison_table(rows: &[(&str, EvalReport)]) -> String {
    let mut out = String::from("| Stage | Jaccard | Macro F1 | Micro F1 | Exact set | Valid format | BLEU-4 | ROUGE-L |\n");
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
