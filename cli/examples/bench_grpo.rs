//! Side-by-side GRPO benchmark (not a test; prints a Markdown table).
//!
//! One GRPO step of ours, in one process: the rollout worker's `roll_out` (sample G completions
//! per prompt with the batched sampler, decode, Jaccard + format rewards) followed by the
//! learner's `Trainer::step` (score the completions, reference log-probs for the k3 KL, the
//! clipped GRPO loss, backward, AdamW). Then TRL's `GRPOTrainer` (scripts/bench_grpo_trl.py) on the
//! very same decoder weights and tokenizer (the checkpoint's HF layout), prompts, group size,
//! completion budget, learning rate, beta and thread count. Both sides run text-only prompts (TRL
//! has no ECG/X-ray/lab encoders); a third row runs ours with all three modalities for scale.
//!
//! Without `--checkpoint` the decoder is a fresh tiny Llama at the shape of the TRL figure in
//! shared/docs/grpo_peers.md (hidden 256, 4 layers, 8 heads, 4 KV heads, vocab 2048) with random
//! weights, so most rewards are 0; neither side skips work for tied groups, so the timing is the
//! same work. Give `--checkpoint runs/demo/sft/final` to time a trained model instead.
//!
//! ```sh
//! make bench-grpo            # or:
//! cargo run --release -p medtvt-cli --example bench_grpo -- --steps 5 --threads 2
//! ```

use anyhow::{bail, Context, Result};
use clap::Parser;
use medtvt_config::{parse_run_config, RunConfig};
use medtvt_data::synth::{synthesize, SynthConfig};
use medtvt_data::{read_jsonl, QaKind, QaSample};
use medtvt_eval::vocabulary::{DiseaseVocabulary, NameMatching};
use medtvt_eval::{DiagnosisReward, RewardWeights};
use medtvt_learner::collective::SingleRank;
use medtvt_learner::trainer::{StepData, Trainer, TrainerOptions};
use medtvt_model::policy::medtvt::MedTvtPolicy;
use medtvt_model::policy::{Policy, RolloutSampling};
use medtvt_proto::v1::{Lease, Prompt};
use medtvt_role::device::parse_device;
use medtvt_role::inputs::InputLoader;
use medtvt_rollout_worker::rollout::{roll_out, RolloutSettings};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;
use tch::Device;

#[derive(Parser, Debug)]
struct Args {
    /// A MedTVT checkpoint directory (e.g. runs/demo/sft/final); default: a fresh tiny model.
    #[arg(long)]
    checkpoint: Option<PathBuf>,
    #[arg(long, default_value_t = 4)]
    prompts_per_step: usize,
    #[arg(long, default_value_t = 8)]
    group: usize,
    /// Completion budget (max new tokens) on both sides.
    #[arg(long, default_value_t = 64)]
    max_new: usize,
    /// Timed steps on each side, after one warm-up step.
    #[arg(long, default_value_t = 5)]
    steps: usize,
    /// Intra-op threads (torch.set_num_threads on both sides).
    #[arg(long, default_value_t = 2)]
    threads: i32,
    #[arg(long, default_value_t = 1e-5)]
    lr: f64,
    #[arg(long, default_value_t = 0.04)]
    beta: f64,
    /// Skip the TRL run (ours only).
    #[arg(long)]
    no_trl: bool,
    /// Skip the multimodal row.
    #[arg(long)]
    no_multimodal: bool,
    /// cpu, cuda or cuda:N (both sides).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Weights dtype: f32, bf16 or f16 (both sides).
    #[arg(long, default_value = "f32")]
    dtype: String,
}

/// One side's timings over the timed steps.
struct Row {
    system: String,
    step_s: Vec<f64>,
    rollout_s: Vec<f64>,
    completion_tokens: Vec<f64>,
    prompt_tokens: f64,
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    if s.is_empty() {
        f64::NAN
    } else {
        s[s.len() / 2]
    }
}

/// The shipped demo GRPO config with the benchmark's shapes and paths.
fn grpo_config(data: &Path, checkpoint: &Path, out: &Path, a: &Args) -> Result<RunConfig> {
    let overrides: Vec<String> = vec![
        format!("run.out_dir={}", out.display()),
        format!("data.dir={}", data.display()),
        format!("model.checkpoint={}", checkpoint.display()),
        "train.steps=1000".into(),
        "train.warmup_steps=0".into(),
        format!("train.learning_rate={}", a.lr),
        format!("grpo.group_size={}", a.group),
        format!("grpo.prompts_per_step={}", a.prompts_per_step),
        format!("grpo.max_new_tokens={}", a.max_new),
        format!("grpo.beta={}", a.beta),
        "grpo.temperature=1.0".into(),
        format!("model.dtype=\"{}\"", a.dtype),
        "grpo.loss_aggregation=\"token_mean\"".into(),
    ];
    let shipped = include_str!("../../configs/tiny-grpo.toml");
    Ok(parse_run_config(shipped, Path::new("configs/tiny-grpo.toml"), &overrides)?)
}

/// A fresh tiny model at the TRL figure's shape, saved so that both sides load the same weights.
fn fresh_checkpoint(data: &Path, samples: &[QaSample], out: &Path) -> Result<PathBuf> {
    let texts: Vec<String> = samples.iter().flat_map(|s| [s.question.clone(), s.answer.clone()]).collect();
    let tokenizer = out.join("tokenizer.json");
    MedTvtPolicy::train_tokenizer(&texts, 2048, &tokenizer).context("training the tokenizer")?;
    // The shipped tiny PT config, resized to the TRL figure's decoder shape.
    let overrides: Vec<String> = [
        format!("run.out_dir={}", out.display()),
        format!("data.dir={}", data.display()),
        "model.tiny.vocab_size=2048".into(),
        "model.tiny.hidden_size=256".into(),
        "model.tiny.intermediate_size=768".into(),
        "model.tiny.num_heads=8".into(),
        "model.tiny.num_kv_heads=4".into(),
    ]
    .into();
    let shipped = include_str!("../../configs/tiny-pt.toml");
    let cfg = parse_run_config(shipped, Path::new("configs/tiny-pt.toml"), &overrides)?;
    let policy = MedTvtPolicy::load(&cfg, Device::Cpu, Some(&tokenizer))?;
    let dir = out.join("init");
    policy.save(&dir)?;
    Ok(dir)
}

/// Without modality files and placeholders: what TRL can run too.
fn text_only(s: &QaSample) -> QaSample {
    let question = s.question.replace("<ecg>", "").replace("<cxr>", "").replace("<lab>", "").trim().to_string();
    QaSample { ecg: None, cxr: None, lab: None, question, ..s.clone() }
}

fn ours(a: &Args, cfg: &RunConfig, samples: &[QaSample], label: &str) -> Result<Row> {
    let device = parse_device(&a.device)?;
    let mut policy = MedTvtPolicy::load(cfg, device, None)?;
    policy.set_trainable(cfg.run.stage, true);
    let mut reference = MedTvtPolicy::load(cfg, device, None)?;
    reference.set_trainable(cfg.run.stage, true);
    let loader = InputLoader::from_config(cfg, policy.image_size())?;
    let mut trainer = Trainer::new(policy, Some(reference), Box::new(SingleRank), TrainerOptions::from_config(cfg));
    let reward =
        DiagnosisReward::new(DiseaseVocabulary::paper_default(NameMatching::Synonyms), RewardWeights::default());
    let settings = RolloutSettings {
        group_size: a.group,
        max_prompt_tokens: cfg.data.max_prompt_tokens,
        sampling: RolloutSampling { max_new_tokens: a.max_new, temperature: 1.0, top_p: 1.0, top_k: 0, seed: 0 },
    };
    let mut row =
        Row { system: label.into(), step_s: vec![], rollout_s: vec![], completion_tokens: vec![], prompt_tokens: 0.0 };
    let mut prompt_tokens = Vec::new();
    for step in 0..=a.steps {
        let batch: Vec<QaSample> =
            (0..a.prompts_per_step).map(|i| samples[(step * a.prompts_per_step + i) % samples.len()].clone()).collect();
        let lease = Lease {
            lease_id: step as u64 + 1,
            job_id: 1,
            policy_version: step as u64,
            group_size: a.group as u32,
            prompts: batch
                .iter()
                .enumerate()
                .map(|(i, s)| Ok(Prompt { prompt_id: i as u64, epoch: 0, sample_json: serde_json::to_vec(s)?.into() }))
                .collect::<Result<_>>()?,
            ..Default::default()
        };
        let started = Instant::now();
        let mut groups = roll_out(trainer.policy(), &loader, &reward, &settings, &lease, 1, step as u64)?;
        let rollout = started.elapsed().as_secs_f64();
        // What the coordinator does between the worker and the learner: attach each group's prompt.
        for (group, prompt) in groups.iter_mut().zip(&lease.prompts) {
            group.prompt = Some(prompt.clone());
        }
        let prompts = loader.prompts(&batch)?;
        for p in &prompts {
            let m = &trainer.policy().0;
            prompt_tokens.push(m.tokenizer().encode(&m.prompt_text(&p.0)?, false)?.len() as f64);
        }
        let tokens: usize = groups.iter().flat_map(|g| &g.completions).map(|c| c.token_ids.len()).sum();
        trainer.step(&StepData::Grpo { groups, prompts })?;
        let total = started.elapsed().as_secs_f64();
        eprintln!(
            "{label}: step {step}{} {total:.2} s (rollout {rollout:.2} s), {tokens} completion tokens",
            if step == 0 { " (warm-up)" } else { "" }
        );
        if step > 0 {
            row.step_s.push(total);
            row.rollout_s.push(rollout);
            row.completion_tokens.push(tokens as f64);
        }
    }
    row.prompt_tokens = prompt_tokens.iter().sum::<f64>() / prompt_tokens.len().max(1) as f64;
    Ok(row)
}

fn trl(a: &Args, cfg: &RunConfig, samples: &[QaSample], work: &Path) -> Result<Row> {
    let checkpoint = cfg.model.checkpoint.as_deref().context("the benchmark config names a checkpoint")?;
    let cfg_policy = MedTvtPolicy::load(cfg, Device::Cpu, None)?;
    let prompts: Vec<serde_json::Value> = samples
        .iter()
        .map(|s| Ok(serde_json::json!({ "prompt": cfg_policy.0.prompt_text(&s.question)?, "reference": s.answer })))
        .collect::<Result<_>>()?;
    let prompts_file = work.join("trl_prompts.json");
    std::fs::write(&prompts_file, serde_json::to_vec(&prompts)?)?;
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let python = root.join(".venv/bin/python");
    let output = Command::new(&python)
        .arg(root.join("scripts/bench_grpo_trl.py"))
        .args(["--checkpoint", &checkpoint.display().to_string(), "--prompts", &prompts_file.display().to_string()])
        .args(["--group", &a.group.to_string(), "--prompts-per-step", &a.prompts_per_step.to_string()])
        .args([
            "--max-new",
            &a.max_new.to_string(),
            "--steps",
            &a.steps.to_string(),
            "--threads",
            &a.threads.to_string(),
        ])
        .args([
            "--lr",
            &a.lr.to_string(),
            "--beta",
            &a.beta.to_string(),
            "--out",
            &work.join("trl").display().to_string(),
        ])
        .args(["--device", &a.device, "--dtype", &a.dtype])
        .output()
        .with_context(|| {
            format!("running {} scripts/bench_grpo_trl.py (make bench-grpo installs trl)", python.display())
        })?;
    if !output.status.success() {
        bail!("the TRL side failed:\n{}", String::from_utf8_lossy(&output.stderr));
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let last = stdout.lines().last().context("the TRL side printed nothing")?;
    let v: serde_json::Value = serde_json::from_str(last).with_context(|| format!("TRL side output {last:?}"))?;
    let floats = |key: &str| -> Vec<f64> {
        v[key].as_array().map(|a| a.iter().filter_map(|x| x.as_f64()).collect()).unwrap_or_default()
    };
    Ok(Row {
        system: format!("TRL {} GRPOTrainer (text only)", v["trl_version"].as_str().unwrap_or("?")),
        step_s: floats("step_s"),
        rollout_s: Vec::new(),
        completion_tokens: floats("completion_tokens"),
        prompt_tokens: v["prompt_tokens"].as_f64().unwrap_or(f64::NAN),
    })
}

fn main() -> Result<()> {
    let a = Args::parse();
    tch::set_num_threads(a.threads);
    tch::manual_seed(0);
    let work = tempfile::tempdir()?;
    let data = work.path().join("data");
    let synth = SynthConfig { image_size: 64, ..SynthConfig::new(40, 0) };
    synthesize(&data, &synth)?;
    let samples: Vec<QaSample> =
        read_jsonl(&data.join("qa.jsonl"))?.into_iter().filter(|s| s.kind == QaKind::Disease).collect();
    let checkpoint = match &a.checkpoint {
        Some(dir) => dir.clone(),
        None => fresh_checkpoint(&data, &samples, work.path())?,
    };
    let cfg = grpo_config(&data, &checkpoint, &work.path().join("ours"), &a)?;
    let text: Vec<QaSample> = samples.iter().map(text_only).collect();
    let mut rows = vec![ours(&a, &cfg, &text, "ours (text only)")?];
    if !a.no_trl {
        rows.push(trl(&a, &cfg, &text, work.path())?);
    }
    if !a.no_multimodal {
        rows.push(ours(&a, &cfg, &samples, "ours (ECG + X-ray + labs)")?);
    }
    println!(
        "\nGRPO step, {} prompts x {} completions, <= {} new tokens, {} thread(s), lr {}, beta {}; median of {} steps after a warm-up\n",
        a.prompts_per_step, a.group, a.max_new, a.threads, a.lr, a.beta, a.steps
    );
    println!("| system | prompt tokens | completion tokens / step | step s | of which rollout s | completion tok/s |");
    println!("|---|---:|---:|---:|---:|---:|");
    for r in &rows {
        let step = median(&r.step_s);
        let tokens = r.completion_tokens.iter().sum::<f64>() / r.completion_tokens.len().max(1) as f64;
        let rollout = if r.rollout_s.is_empty() { "-".to_string() } else { format!("{:.2}", median(&r.rollout_s)) };
        let rate = r.completion_tokens.iter().sum::<f64>() / r.step_s.iter().sum::<f64>();
        println!("| {} | {:.0} | {:.0} | {:.2} | {} | {:.0} |", r.system, r.prompt_tokens, tokens, step, rollout, rate);
    }
    Ok(())
}
