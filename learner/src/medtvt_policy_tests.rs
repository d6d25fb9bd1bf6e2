//! The trainer on the real MedTVT-R1 policy (`medtvt_model::policy::medtvt::MedTvtPolicy`): a tiny
//! model overfits a handful of synthetic samples in SFT and GRPO, in f32 and bf16.

use crate::collective::SingleRank;
use crate::grpo::{GrpoOptions, ImportanceSampling};
use crate::optim::{AdamWConfig, LrSchedule};
use crate::trainer::{GrpoStepOptions, StepData, Trainer, TrainerOptions};
use medtvt_config::OldLogprobs;
use medtvt_config::{RunConfig, Stage};
use medtvt_data::ModalityInputs;
use medtvt_data::{LabPercentiles, QaKind, QaSample};
use medtvt_eval::{DiagnosisReward, DiseaseVocabulary, NameMatching, RewardWeights};
use medtvt_model::policy::medtvt::MedTvtPolicy;
use medtvt_model::policy::{Policy, RolloutSampling};
use medtvt_model::SamplingParams;
use medtvt_proto::v1::{Completion, Prompt, RolloutGroup};
use medtvt_role::inputs::{InputLoader, LAB_PERCENTILES_FILE};
use std::path::Path;
use tch::Kind;
use tch::{Device, Tensor};

/// A tiny MedTVT run config for SFT in `model.dtype = dtype`; `[model.tiny]` decides the model.
fn sft_config_in(data: &Path, dtype: &str) -> RunConfig {
    let text = format!(
        "[run]\nname = \"overfit\"\nstage = \"sft\"\nout_dir = \"{out}\"\nseed = 1\n\n[data]\ndir = \"{data}\"\n\n\
[model]\ndevice = \"cpu\"\ndtype = \"{dtype}\"\ntrain_all = true\n\n[model.tiny]\nvocab_size = 512\nhidden_size = 64\nintermediate_size = 128\n\
num_layers = 2\nnum_heads = 4\nnum_kv_heads = 2\nimage_size = 32\nvit_patch_size = 16\nvit_depth = 1\necg_resnet_blocks = 1\n\n\
[train]\nsteps = 1\nlearning_rate = 0.003\n",
        out = data.display(),
        data = data.display(),
    );
    medtvt_config::parse_run_config(&text, Path::new("overfit.toml"), &[]).unwrap()
}

/// Four disease-level samples of a small synthetic dataset, their loaded prompts and
/// answers, and a tokenizer trained on them (kept alive by the returned temporary folder).
struct Handful {
    tmp: tempfile::TempDir,
    samples: Vec<QaSample>,
    prompts: Vec<(String, ModalityInputs)>,
    answers: Vec<String>,
}

impl Handful {
    fn new() -> Handful {
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("data");
        let mut synth = medtvt_data::synth::SynthConfig::new(6, 11);
        synth.image_size = 32;
        medtvt_data::synth::synthesize(&data, &synth).unwrap();
        let samples: Vec<QaSample> = medtvt_data::read_jsonl(&data.join("qa.jsonl"))
            .unwrap()
            .into_iter()
            .filter(|s| s.kind == QaKind::Disease)
            .take(4)
            .collect();
        assert_eq!(samples.len(), 4);
        let texts: Vec<String> = samples.iter().flat_map(|s| [s.question.clone(), s.answer.clone()]).collect();
        MedTvtPolicy::train_tokenizer(&texts, 512, &tmp.path().join("tokenizer.json")).unwrap();
        let percentiles = LabPercentiles::load(&data.join(LAB_PERCENTILES_FILE)).unwrap();
        let prompts = InputLoader::new(data.clone(), percentiles, 32).prompts(&samples).unwrap();
        let answers: Vec<String> = samples.iter().map(|s| s.answer.clone()).collect();
        Handful { tmp, samples, prompts, answers }
    }

    /// A tiny model in `dtype` training every parameter.
    fn policy(&self, dtype: &str) -> MedTvtPolicy {
        let cfg = sft_config_in(&self.tmp.path().join("data"), dtype);
        let mut policy =
            MedTvtPolicy::load(&cfg, Device::Cpu, Some(self.tmp.path().join("tokenizer.json").as_path())).unwrap();
        policy.set_trainable(Stage::Sft, true);
        policy
    }

    /// [`Handful::policy`] in a trainer at constant `lr` (SFT, or GRPO with `grpo`).
    fn trainer(&self, dtype: &str, lr: f64) -> Trainer<MedTvtPolicy> {
        self.trainer_with(dtype, lr, None)
    }

    fn trainer_with(&self, dtype: &str, lr: f64, grpo: Option<GrpoStepOptions>) -> Trainer<MedTvtPolicy> {
        let policy = self.policy(dtype);
        let options = TrainerOptions {
            stage: if grpo.is_some() { Stage::Grpo } else { Stage::Sft },
            max_prompt_tokens: 256,
            max_answer_tokens: 256,
            grad_accumulation: 1,
            grad_clip: 1.0,
            schedule: LrSchedule { peak: lr, warmup: 0, total: 1_000, min_ratio: 1.0 },
            adamw: AdamWConfig::default(),
            grpo,
        };
        Trainer::new(policy, None, Box::new(SingleRank), options)
    }

    fn step_data(&self) -> StepData {
        StepData::Supervised { prompts: self.prompts.clone(), answers: self.answers.clone() }
    }

    /// `g` completions of every prompt sampled by `sampler` (its KV-cache decode), as the
    /// rollout groups of policy version 0 and their prompts.
    fn sampled_groups(&self, sampler: &MedTvtPolicy, g: usize) -> StepData {
        let encoded = sampler.encode_prompts(&self.prompts, 256).unwrap();
        let repeated = sampler.repeat_prompts(&encoded, g as i64);
        let sampling = RolloutSampling { max_new_tokens: 24, temperature: 1.0, top_p: 1.0, top_k: 0, seed: 3 };
        let sampled = sampler.sample(&repeated, &sampling).unwrap();
        let groups = self
            .samples
            .iter()
            .enumerate()
            .map(|(i, sample)| RolloutGroup {
                prompt_id: i as u64,
                policy_version: 0,
                completions: (i * g..(i + 1) * g)
                    .map(|row| Completion {
                        token_ids: sampled.tokens[row].clone(),
                        logprobs: sampled.logprobs[row].clone(),
                        reward: (row % g) as f32,
                        ..Default::default()
                    })
                    .collect(),
                prompt: Some(Prompt {
                    prompt_id: i as u64,
                    epoch: 0,
                    sample_json: serde_json::to_vec(sample).unwrap().into(),
                }),
                ..Default::default()
            })
            .collect();
        StepData::Grpo { groups, prompts: self.prompts.clone() }
    }
}

fn grpo_options(old_logprobs: OldLogprobs, importance_sampling: ImportanceSampling, cap: f64) -> GrpoStepOptions {
    GrpoStepOptions {
        loss: GrpoOptions { beta: 0.0, importance_sampling, importance_sampling_cap: cap, ..GrpoOptions::default() },
        group_size: 4,
        temperature: 1.0,
        old_logprobs,
    }
}

/// Issue #12: on CPU in f32 the sampler's KV-cache log-probs and the learner's full forward
/// agree on the groups the trained version sampled (lag 0) to float noise.
#[test]
fn f32_sampler_and_learner_agree_on_lag0_tokens() {
    let handful = Handful::new();
    let mut trainer =
        handful.trainer_with("f32", 1e-3, Some(grpo_options(OldLogprobs::Sampler, ImportanceSampling::None, 3.0)));
    let data = handful.sampled_groups(trainer.policy(), 4);
    let m = trainer.step(&data).unwrap().metrics;
    assert!(m["mismatch/tokens"] > 16.0, "{m:?}");
    eprintln!(
        "f32 sampler and learner: |logp diff| mean {:e} p99 {:e} max {:e}",
        m["mismatch/logp_abs/mean"], m["mismatch/logp_abs/p99"], m["mismatch/logp_abs/max"]
    );
    assert!(m["mismatch/logp_abs/max"] < 1e-5, "{m:?}");
    assert!(m["mismatch/logp_abs/p99"] <= m["mismatch/logp_abs/max"] + 1e-12);
    assert_eq!(m["mismatch/outside_clip"], 0.0);
}

/// Issue #12: a bf16 sampler against an f32 learner shows its mismatch, and the truncated
/// importance-sampling correction bounds the weights by the cap.
#[test]
fn a_bf16_sampler_shows_its_mismatch_and_the_correction_bounds_the_weights() {
    let handful = Handful::new();
    let cap = 1.001;
    let mut trainer =
        handful.trainer_with("f32", 1e-3, Some(grpo_options(OldLogprobs::Learner, ImportanceSampling::Truncate, cap)));
    let mut sampler = handful.policy("bf16");
    sampler.copy_named_tensors(&trainer.policy().all_tensors()).unwrap();
    let data = handful.sampled_groups(&sampler, 4);
    let m = trainer.step(&data).unwrap().metrics;
    eprintln!(
        "bf16 sampler, f32 learner: |logp diff| mean {:e} p99 {:e} max {:e}",
        m["mismatch/logp_abs/mean"], m["mismatch/logp_abs/p99"], m["mismatch/logp_abs/max"]
    );
    // Two orders of magnitude above the f32 sampler's (< 1e-5 at every token).
    assert!(m["mismatch/logp_abs/mean"] > 1e-4, "bf16 weights must show: {m:?}");
    assert!(
        m["mismatch/logp_abs/max"] > cap.ln(),
        "some weight must exceed the cap for the test to mean anything: {m:?}"
    );
    assert!(m["is/corrected_fraction"] > 0.0, "{m:?}");
    assert!(m["is/weight_max"] <= cap + 1e-6, "the cap (in f32) bounds every weight: {m:?}");
    // The learner's own old log-probs: the ratio starts at 1, nothing is clipped.
    assert_eq!(m["clip_fraction"], 0.0);
}

/// The decoder's RMSNorm weights (f32 masters) of a trainer.
fn norm_weights(trainer: &Trainer<MedTvtPolicy>) -> Vec<(String, Tensor)> {
    trainer.master_weights().into_iter().filter(|(n, _)| n.starts_with("llm.") && n.contains("norm")).collect()
}

/// Issue #12: a bf16 model keeps f32 master weights. At lr 1e-6 every update is far below
/// half a bf16 ulp of a norm weight (1.0: ulp 2^-7), so without masters the norms never move;
/// with them the masters move as the f32 run's weights do and the model's bf16 copies are
/// the masters rounded.
#[test]
fn bf16_training_moves_norm_weights_at_lr_1e_6_like_f32() {
    let handful = Handful::new();
    let steps = 4;
    let mut moved = Vec::new();
    for dtype in ["f32", "bf16"] {
        let mut trainer = handful.trainer(dtype, 1e-6);
        let before: Vec<Tensor> = norm_weights(&trainer).into_iter().map(|(_, t)| t.copy()).collect();
        for _ in 0..steps {
            assert!(!trainer.step(&handful.step_data()).unwrap().skipped);
        }
        let after = norm_weights(&trainer);
        let delta =
            Tensor::cat(&after.iter().zip(&before).map(|((_, a), b)| (a - b).view([-1])).collect::<Vec<_>>(), 0);
        if dtype == "bf16" {
            let model: std::collections::BTreeMap<String, Tensor> =
                trainer.policy().all_tensors().into_iter().collect();
            for (name, master) in &after {
                assert_eq!(model[name].kind(), Kind::BFloat16, "{name}");
                assert!(
                    model[name].equal(&master.to_kind(Kind::BFloat16)),
                    "{name}: the bf16 copy is not the rounded master"
                );
            }
        }
        moved.push(delta);
    }
    let mean_abs = |t: &Tensor| t.abs().mean(Kind::Double).double_value(&[]);
    let (f32_move, bf16_move) = (mean_abs(&moved[0]), mean_abs(&moved[1]));
    assert!(
        f32_move > 0.5e-6 * steps as f64,
        "the f32 run must move its norms for the comparison to mean anything: {f32_move}"
    );
    assert!(
        (bf16_move / f32_move - 1.0).abs() < 0.25,
        "mean |change| of the norm weights: bf16 {bf16_move:e}, f32 {f32_move:e}"
    );
    let same_direction =
        moved[0].sign().eq_tensor(&moved[1].sign()).to_kind(Kind::Double).mean(Kind::Double).double_value(&[]);
    assert!(
        same_direction > 0.8,
        "bf16 and f32 moved the norm weights the same way for only {same_direction:.2} of them"
    );
}

/// Issue #12: a short bf16 run's loss tracks the f32 run's.
#[test]
fn bf16_loss_tracks_the_f32_loss() {
    let handful = Handful::new();
    let losses: Vec<Vec<f64>> = ["f32", "bf16"]
        .iter()
        .map(|dtype| {
            let mut trainer = handful.trainer(dtype, 3e-3);
            (0..12).map(|_| trainer.step(&handful.step_data()).unwrap().metrics["loss"]).collect()
        })
        .collect();
    let (f32_losses, bf16_losses) = (&losses[0], &losses[1]);
    assert!(f32_losses[11] < 0.7 * f32_losses[0], "the f32 run must learn: {f32_losses:?}");
    // Step by step within 10 % (bf16 rounding can make one step's loss jump and the next recover),
    // and the last four steps' mean within 5 %.
    for (step, (a, b)) in f32_losses.iter().zip(bf16_losses).enumerate() {
        assert!((a - b).abs() < 0.10 * a, "step {step}: f32 loss {a}, bf16 loss {b}\n{f32_losses:?}\n{bf16_losses:?}");
    }
    let tail = |l: &[f64]| l[8..].iter().sum::<f64>() / 4.0;
    let (a, b) = (tail(f32_losses), tail(bf16_losses));
    assert!((a - b).abs() < 0.05 * a, "last four steps: f32 {a}, bf16 {b}\n{f32_losses:?}\n{bf16_losses:?}");
}

/// Issue #4: the tiny model overfits a handful of disease-level samples in SFT: the answer
/// loss falls near zero and greedy decoding gives back each sample's reference answer, whose
/// parsed disease set equals the sample's labels.
#[test]
fn tiny_model_overfits_a_handful_of_samples_in_sft() {
    let handful = Handful::new();
    let Handful { samples, prompts, answers, .. } = &handful;
    let mut trainer = handful.trainer("f32", 1e-2);
    let step_data = handful.step_data();
    let first = trainer.step(&step_data).unwrap().metrics["loss"];
    let mut loss = first;
    let mut steps = 1;
    while loss > 0.005 && steps < 600 {
        loss = trainer.step(&step_data).unwrap().metrics["loss"];
        steps += 1;
    }
    assert!(loss < 0.005, "answer loss {first} -> {loss} after {steps} steps");

    let model = &trainer.policy().0;
    let batch = model.encode_prompts(prompts, 256).unwrap();
    let longest = answers.iter().map(|a| model.tokenizer().encode(a, false).unwrap().len()).max().unwrap();
    let params = SamplingParams { max_new_tokens: longest + 4, greedy: true, ..SamplingParams::default() };
    let (generation, _) = model.generate(&batch, &params).unwrap();
    let vocabulary = DiseaseVocabulary::paper_default(NameMatching::Synonyms);
    let reward = DiagnosisReward::new(vocabulary.clone(), RewardWeights::default());
    for ((sample, tokens), reference) in samples.iter().zip(&generation.tokens).zip(answers.iter()) {
        let text = model.decode(tokens).unwrap();
        assert_eq!(&text, reference, "{}: greedy answer differs from the reference", sample.id);
        let predicted = reward.parse(&text).map(|a| a.diseases()).unwrap_or_default();
        let labels: medtvt_eval::DiseaseSet = sample.labels.iter().map(|l| vocabulary.lookup(l).unwrap()).collect();
        assert_eq!(predicted, labels, "{}: {text}", sample.id);
    }
}
