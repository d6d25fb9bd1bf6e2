//! `medtvt demo`: the whole MedTVT-R1 pipeline on the embedded tiny CPU default, as separate
//! processes over loopback gRPC: synthesise a MedTVT-QA set, start a local cluster (coordinator,
//! 2 learners, 2 rollout workers), run PT, SFT and GRPO as jobs on it, evaluate each stage's
//! checkpoint on the test split, print a before/after table with the verdict on GRPO, and draw the
//! plots. Everything goes under `runs/demo/` of the working directory.
//!
//! `medtvt demo --showcase` (`make showcase`) is the same pipeline sized for GRPO to have evidence
//! to sharpen (twice the data, three times the SFT steps, a longer GRPO; meant to stay under an
//! hour on 2 idle cores, against the demo's 15 minutes), under `runs/showcase/`. docs/results.md
//! says why and what it measured.

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

/// The stage configs of `--showcase`: the same model, 600 SFT steps and a longer GRPO.
const SHOWCASE_STAGES: [(&str, &str, &str); 3] = [
    ("PT", "pt", include_str!("../../configs/showcase-pt.toml")),
    ("SFT", "sft", include_str!("../../configs/showcase-sft.toml")),
    ("GRPO", "grpo", include_str!("../../configs/showcase-grpo.toml")),
];

#[derive(clap::Args, Debug, Clone)]
pub struct DemoArgs {
    /// Run the showcase (`make showcase`): the same pipeline with enough data and SFT steps for
    /// GRPO to have evidence to sharpen, under runs/showcase/.
    #[arg(long)]
    pub showcase: bool,
    /// Encounters in the synthetic set (two QA samples each; 80/10/10 train/val/test); default
    /// 600, 1200 with --showcase.
    #[arg(long)]
    pub encounters: Option<usize>,
    /// Test samples of each QA kind evaluated after every stage; default 60, with --showcase
    /// the whole test split.
    #[arg(long)]
    pub eval_samples: Option<usize>,
    /// Seeds the data and every stage (initialisation, batches, sampling).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

/// What differs between `make demo` and `make showcase`.
struct Profile {
    showcase: bool,
    run_dir: &'static str,
    stages: &'static [(&'static str, &'static str, &'static str); 3],
    encounters: usize,
    eval_samples: usize,
}

const DEMO: Profile =
    Profile { showcase: false, run_dir: "runs/demo", stages: &STAGES, encounters: 600, eval_samples: 60 };
const SHOWCASE: Profile =
    Profile { showcase: true, run_dir: "runs/showcase", stages: &SHOWCASE_STAGES, encounters: 1200, eval_samples: 120 };

pub fn run(args: &DemoArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    let profile = if args.showcase { &SHOWCASE } else { &DEMO };
    let args = &ResolvedArgs {
        encounters: args.encounters.unwrap_or(profile.encounters),
        eval_samples: args.eval_samples.unwrap_or(profile.eval_samples),
        seed: args.seed,
    };
    let run_dir = PathBuf::from(profile.run_dir);
    let data_dir = run_dir.join("data");
    let name = if profile.showcase { "medtvt demo --showcase" } else { "medtvt demo" };
    println!("== {name}: PT -> SFT -> GRPO of the tiny MedTVT-R1 on synthetic MedTVT-QA (CPU) ==");
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
        for (i, (label, dir, toml)) in profile.stages.iter().enumerate() {
            println!("\n[3/5] stage {}/3: {label}", i + 1);
            let stage_started = Instant::now();
            // The seed drives the data (above) and every stage's initialisation and sampling.
            let job = StageJob {
                label: (*label).to_string(),
                config_toml: (*toml).to_string(),
                overrides: vec![format!("run.seed={}", args.seed)],
            };
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
    let mut improved = None;
    let disease_report_of =
        |label: &str| rows.iter().find(|(l, _)| *l == label).and_then(|(_, r)| r.disease.as_ref().map(|d| (r, d)));
    match (disease_report_of("SFT"), disease_report_of("GRPO")) {
        (Some((sft, sft_d)), Some((grpo, grpo_d))) => {
            let references = medtvt_data::read_jsonl(&data_dir.join("qa.jsonl"))?;
            let (diff, se, n) = paired_jaccard_difference(sft, grpo, &references);
            let comparison = Comparison {
                diff,
                se,
                n,
                sft_macro_f1: sft_d.macro_avg.f1,
                grpo_macro_f1: grpo_d.macro_avg.f1,
                grpo_f1: grpo_d.per_disease.iter().map(|d| (d.disease.clone(), d.f1)).collect(),
                reward_slope: least_squares_slope(&grpo_rewards(&combined)),
            };
            let (ok, text) = grpo_verdict(&comparison);
            improved = Some(ok);
            println!("\n{text}");
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
    println!("\n{}", closing_lines(profile.showcase, improved));
    Ok(())
}

/// The demo's last words: which command shows GRPO's gain. The 15-minute demo's SFT is too short
/// for GRPO to have evidence to sharpen (docs/results.md), so it points at `make showcase`.
fn closing_lines(showcase: bool, improved: Option<bool>) -> String {
    let this_run = match improved {
        Some(true) => "This run shows GRPO's gain over SFT: see the verdict above, plots/reward.png and plots/f1.png.",
        Some(false) => "This run did not show a GRPO gain over SFT by the verdict's rule above.",
        None => "This run evaluated no disease-level answers, so it says nothing about GRPO's gain.",
    };
    if showcase {
        format!("{this_run}\ndocs/results.md has what the showcase measured, seed by seed.")
    } else {
        format!(
            "{this_run}\nThe 15-minute demo is a smoke test of the whole system: 200 SFT steps leave the tiny model at\n\
             the label prior, with little for GRPO to sharpen. The run sized to show GRPO's gain is\n\
             `make showcase` (1200 encounters, 600 SFT and 30 GRPO steps); docs/results.md has what it measured."
        )
    }
}

/// The demo's arguments with the profile's defaults filled in.
struct ResolvedArgs {
    encounters: usize,
    eval_samples: usize,
    seed: u64,
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

/// A least-squares line's slope with its standard error and 95% confidence interval.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Slope {
    pub slope: f64,
    pub se: f64,
    pub low: f64,
    pub high: f64,
    pub n: usize,
}

/// Ordinary least squares of y on x: the slope, its standard error from the residuals
/// (s^2 = SSE / (n - 2), se = s / sqrt(Sxx)) and the 95% interval slope +- t(0.975, n - 2) se.
/// None with fewer than three points or no spread in x.
pub(crate) fn least_squares_slope(points: &[(f64, f64)]) -> Option<Slope> {
    let n = points.len();
    if n < 3 {
        return None;
    }
    let nf = n as f64;
    let mx = points.iter().map(|p| p.0).sum::<f64>() / nf;
    let my = points.iter().map(|p| p.1).sum::<f64>() / nf;
    let sxx: f64 = points.iter().map(|p| (p.0 - mx).powi(2)).sum();
    if sxx <= 0.0 {
        return None;
    }
    let sxy: f64 = points.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    let slope = sxy / sxx;
    let intercept = my - slope * mx;
    let sse: f64 = points.iter().map(|p| (p.1 - intercept - slope * p.0).powi(2)).sum();
    let se = (sse / (nf - 2.0) / sxx).sqrt();
    let t = student_t_975(n - 2);
    Some(Slope { slope, se, low: slope - t * se, high: slope + t * se, n })
}

/// The 0.975 quantile of Student's t with `df` degrees of freedom: exact to 3 decimals from a
/// table up to 30, then the Cornish-Fisher expansion around the normal quantile (error < 1e-4).
fn student_t_975(df: usize) -> f64 {
    const TABLE: [f64; 30] = [
        12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
    ];
    if (1..=30).contains(&df) {
        return TABLE[df - 1];
    }
    let z: f64 = 1.959_963_984_540_054;
    let d = df.max(1) as f64;
    z + (z.powi(3) + z) / (4.0 * d)
        + (5.0 * z.powi(5) + 16.0 * z.powi(3) + 3.0 * z) / (96.0 * d * d)
        + (3.0 * z.powi(7) + 19.0 * z.powi(5) + 17.0 * z.powi(3) - 15.0 * z) / (384.0 * d.powi(3))
}

/// What the verdict weighs: the paired Jaccard difference on the test samples, both stages'
/// macro F1 and GRPO's per-disease F1 (a gain from collapsing toward the most common label does
/// not count), and the trend of the mean sampled reward over the GRPO steps.
#[derive(Debug, Clone)]
pub(crate) struct Comparison {
    pub diff: f64,
    pub se: f64,
    pub n: usize,
    pub sft_macro_f1: f64,
    pub grpo_macro_f1: f64,
    /// (disease, F1 after GRPO).
    pub grpo_f1: Vec<(String, f64)>,
    pub reward_slope: Option<Slope>,
}

/// The demo's answer to "did GRPO beat SFT?": an improvement needs all three of a paired Jaccard
/// gain beyond two standard errors, F1 > 0 for every disease after GRPO, and a macro F1 no lower
/// than SFT's. Returns whether it improved and the lines to print.
pub(crate) fn grpo_verdict(c: &Comparison) -> (bool, String) {
    let mut lines = Vec::new();
    match c.reward_slope {
        Some(s) => lines.push(format!(
            "Mean sampled reward over {} GRPO steps: slope {:+.5} per step (95% CI {:+.5} to {:+.5}){}.",
            s.n,
            s.slope,
            s.low,
            s.high,
            if s.low > 0.0 {
                ", rising"
            } else if s.high < 0.0 {
                ", falling"
            } else {
                ", no trend beyond noise"
            }
        )),
        None => lines.push("Too few GRPO steps logged to fit a reward trend.".to_string()),
    }
    lines.push(format!(
        "GRPO - SFT sample-wise Jaccard on {} test samples: {:+.4} (paired standard error {:.4}).",
        c.n, c.diff, c.se
    ));
    lines.push(format!("Macro F1: SFT {:.4}, GRPO {:.4}.", c.sft_macro_f1, c.grpo_macro_f1));
    let silent: Vec<&str> =
        c.grpo_f1.iter().filter(|(_, f)| f.is_nan() || *f <= 0.0).map(|(d, _)| d.as_str()).collect();
    let gain = c.diff > 2.0 * c.se;
    let macro_kept = c.grpo_macro_f1 >= c.sft_macro_f1;
    let improved = gain && silent.is_empty() && macro_kept && !c.grpo_f1.is_empty();
    let verdict = if improved {
        "GRPO improved over SFT: Jaccard gain beyond two standard errors, every disease still has F1 > 0, \
         and macro F1 did not fall."
            .to_string()
    } else {
        let mut why = Vec::new();
        if c.diff < -2.0 * c.se {
            why.push("it made the sample-wise Jaccard worse".to_string());
        } else if !gain {
            why.push("the Jaccard change is within two standard errors".to_string());
        }
        if !silent.is_empty() {
            why.push(format!("F1 is 0 after GRPO for {}", silent.join(", ")));
        }
        if c.grpo_f1.is_empty() {
            why.push("no per-disease F1 after GRPO".to_string());
        }
        if !macro_kept {
            why.push("macro F1 fell below SFT's".to_string());
        }
        format!("GRPO did NOT improve over SFT: {}.", why.join("; "))
    };
    lines.push(verdict);
    (improved, lines.join("\n"))
}

/// (step, mean sampled reward) of every GRPO step in the log records.
fn grpo_rewards(records: &[MetricsRecord]) -> Vec<(f64, f64)> {
    records
        .iter()
        .filter(|r| r.stage == "grpo")
        .filter_map(|r| r.values.get("reward_mean").filter(|v| v.is_finite()).map(|&v| (r.step as f64, v)))
        .collect()
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

    fn comparison(diff: f64, se: f64, grpo_f1: &[f64], macros: (f64, f64)) -> Comparison {
        Comparison {
            diff,
            se,
            n: 60,
            sft_macro_f1: macros.0,
            grpo_macro_f1: macros.1,
            grpo_f1: grpo_f1.iter().enumerate().map(|(i, &f)| (format!("disease {i}"), f)).collect(),
            reward_slope: least_squares_slope(&[(1.0, 0.1), (2.0, 0.2), (3.0, 0.35), (4.0, 0.4)]),
        }
    }

    #[test]
    fn only_a_change_beyond_two_standard_errors_counts() {
        let f1 = [0.5, 0.4, 0.3];
        let (ok, text) = grpo_verdict(&comparison(0.10, 0.03, &f1, (0.4, 0.45)));
        assert!(ok && text.contains("GRPO improved over SFT"), "{text}");
        let (ok, text) = grpo_verdict(&comparison(0.0125, 0.02, &f1, (0.4, 0.45)));
        assert!(!ok && text.contains("within two standard errors") && text.contains("+0.0125"), "{text}");
        let (ok, text) = grpo_verdict(&comparison(-0.07, 0.02, &f1, (0.4, 0.45)));
        assert!(!ok && text.contains("made the sample-wise Jaccard worse"), "{text}");
    }

    #[test]
    fn a_gain_from_collapsing_onto_the_prior_does_not_count() {
        // A disease no longer named.
        let (ok, text) = grpo_verdict(&comparison(0.10, 0.03, &[0.6, 0.0, 0.5], (0.4, 0.45)));
        assert!(!ok && text.contains("F1 is 0 after GRPO for disease 1"), "{text}");
        // Macro F1 below SFT's although every disease is still named.
        let (ok, text) = grpo_verdict(&comparison(0.10, 0.03, &[0.6, 0.1, 0.5], (0.45, 0.40)));
        assert!(!ok && text.contains("macro F1 fell below SFT's"), "{text}");
        // An equal macro F1 is kept.
        assert!(grpo_verdict(&comparison(0.10, 0.03, &[0.6, 0.1, 0.5], (0.4, 0.4))).0);
        // A NaN F1 (no support, no prediction) is not "> 0".
        assert!(!grpo_verdict(&comparison(0.10, 0.03, &[0.6, f64::NAN], (0.4, 0.4))).0);
    }

    #[test]
    fn reward_slope_matches_a_hand_computed_fit() {
        // y = 0.1, 0.2, 0.35, 0.4 at x = 1..4: mean x 2.5, Sxx 5, Sxy 0.525, slope 0.105,
        // intercept 0.2625 - 0.2625 = 0; residuals -0.005, -0.01, +0.035, -0.02: SSE 0.00175,
        // se = sqrt(0.00175 / 2 / 5) = 0.013229; t(0.975, 2) = 4.303.
        let s = least_squares_slope(&[(1.0, 0.1), (2.0, 0.2), (3.0, 0.35), (4.0, 0.4)]).unwrap();
        assert!((s.slope - 0.105).abs() < 1e-12, "{s:?}");
        assert!((s.se - (0.00175f64 / 10.0).sqrt()).abs() < 1e-12, "{s:?}");
        assert!((s.low - (0.105 - 4.303 * s.se)).abs() < 1e-12 && (s.high - (0.105 + 4.303 * s.se)).abs() < 1e-12);
        assert_eq!(s.n, 4);
        // An exact line has no residual error; a flat series no slope.
        let exact = least_squares_slope(&[(0.0, 1.0), (1.0, 3.0), (2.0, 5.0)]).unwrap();
        assert!((exact.slope - 2.0).abs() < 1e-12 && exact.se < 1e-9);
        assert!(least_squares_slope(&[(0.0, 1.0), (1.0, 3.0)]).is_none());
        assert!(least_squares_slope(&[(1.0, 1.0), (1.0, 3.0), (1.0, 2.0)]).is_none());
    }

    #[test]
    fn t_quantiles_match_the_table_and_approach_the_normal() {
        assert_eq!(student_t_975(1), 12.706);
        assert_eq!(student_t_975(30), 2.042);
        // Published values: t(0.975, 40) = 2.0211, t(0.975, 60) = 2.0003, t(0.975, 120) = 1.9799.
        assert!((student_t_975(40) - 2.0211).abs() < 2e-4, "{}", student_t_975(40));
        assert!((student_t_975(60) - 2.0003).abs() < 2e-4);
        assert!((student_t_975(120) - 1.9799).abs() < 2e-4);
    }

    #[test]
    fn the_demo_closes_by_naming_the_command_that_shows_the_gain() {
        for improved in [Some(true), Some(false), None] {
            assert!(closing_lines(false, improved).contains("`make showcase`"), "{improved:?}");
            assert!(!closing_lines(true, improved).contains("`make showcase`"), "{improved:?}");
        }
        assert!(closing_lines(true, Some(true)).starts_with("This run shows GRPO's gain"));
        assert!(closing_lines(true, Some(false)).contains("did not show"));
    }

    #[test]
    fn grpo_rewards_are_read_from_the_grpo_steps_only() {
        let rec = |stage: &str, step, v| MetricsRecord {
            stage: stage.into(),
            step,
            values: [("reward_mean".to_string(), v)].into(),
        };
        let got =
            grpo_rewards(&[rec("sft", 5, 9.0), rec("grpo", 1, 0.2), rec("grpo", 2, f64::NAN), rec("grpo", 3, 0.3)]);
        assert_eq!(got, vec![(1.0, 0.2), (3.0, 0.3)]);
    }
}
