//! [`Policy`] for MedTVT-R1 (`medtvt_model::medtvt::MedTvt`): the model the `medtvt learner` and
//! `medtvt rollout-worker` processes train and sample.

use crate::policy::{Policy, PolicyError, RolloutSampling, Sampled, TrainableCount};
use medtvt_config::{RunConfig, Stage};
use medtvt_data::ModalityInputs;
use medtvt_model::medtvt::{MedTvt, PromptBatch};
use medtvt_model::{MedTokenizer, SamplingParams};
use std::path::Path;
use tch::{Device, Tensor};

/// MedTVT-R1 as a [`Policy`].
pub struct MedTvtPolicy(pub MedTvt);

fn model_error(e: impl std::fmt::Display) -> PolicyError {
    PolicyError::Model(e.to_string())
}

impl Policy for MedTvtPolicy {
    type Prompts = PromptBatch;

    fn load(config: &RunConfig, device: Device, tokenizer: Option<&Path>) -> Result<Self, PolicyError> {
        let tokenizer = tokenizer
            .map(|path| MedTokenizer::from_file(path).map_err(|e| PolicyError::Tokenizer { path: path.to_path_buf(), problem: e.to_string() }))
            .transpose()?;
        let model = MedTvt::from_run_config(config, device, tokenizer).map_err(model_error)?;
        if let Some((stored, grown)) = model.vocab_resize() {
            tracing::info!(stored, grown, "grew the decoder's vocabulary for the modality placeholders (new rows: the mean of the stored ones)");
        }
        Ok(MedTvtPolicy(model))
    }

    fn train_tokenizer(texts: &[String], vocab_size: usize, out: &Path) -> Result<(), PolicyError> {
        let tokenizer = MedTvt::train_tiny_tokenizer(texts, vocab_size).map_err(model_error)?;
        tokenizer.save(out).map_err(|e| PolicyError::Tokenizer { path: out.to_path_buf(), problem: e.to_string() })
    }

    fn set_trainable(&mut self, stage: Stage, all: bool) -> TrainableCount {
        let s = self.0.set_trainable(stage, all);
        TrainableCount { trainable: s.trainable, frozen: s.frozen, groups: s.groups }
    }

    fn device(&self) -> Device {
        self.0.device()
    }

    fn image_size(&self) -> usize {
        self.0.image_size()
    }

    fn encode_prompts(&self, prompts: &[(String, ModalityInputs)], max_prompt_tokens: usize) -> Result<PromptBatch, PolicyError> {
        self.0.encode_prompts(prompts, max_prompt_tokens).map_err(model_error)
    }

    fn repeat_prompts(&self, prompts: &PromptBatch, times: i64) -> PromptBatch {
        prompts.repeat_interleave(times)
    }

    fn encode_answers(&self, texts: &[String], max_tokens: usize) -> Result<(Tensor, Tensor), PolicyError> {
        self.0.encode_completions(texts, max_tokens).map_err(model_error)
    }

    fn score(&self, prompts: &PromptBatch, completion_ids: &Tensor, completion_mask: &Tensor, temperature: f64, train: bool) -> Tensor {
        self.0.score(prompts, completion_ids, completion_mask, temperature, train)
    }

    fn sample(&self, prompts: &PromptBatch, s: &RolloutSampling) -> Result<Sampled, PolicyError> {
        let params = SamplingParams {
            max_new_tokens: s.max_new_tokens,
            temperature: s.temperature,
            top_p: s.top_p,
            top_k: s.top_k,
            greedy: false,
            seed: s.seed,
            // Empty: the model's own end tokens.
            eos_token_ids: Vec::new(),
        };
        let (generation, _gates) = self.0.generate(prompts, &params).map_err(model_error)?;
        Ok(Sampled { tokens: generation.tokens, logprobs: generation.logprobs, finished_by_eos: generation.finished_by_eos })
    }

    fn decode(&self, ids: &[i64]) -> String {
        // Undecodable ids give an empty text, which earns no reward, rather than failing a lease.
        self.0.decode(ids).unwrap_or_default()
    }

    fn all_tensors(&self) -> Vec<(String, Tensor)> {
        self.0.named_variables()
    }

    fn trainable_tensors(&self) -> Vec<(String, Tensor)> {
        self.0.trainable_tensors()
    }

    fn copy_named_tensors(&mut self, named: &[(String, Tensor)]) -> Result<(), PolicyError> {
        self.0.copy_named_tensors(named).map_err(model_error)
    }

    fn save(&self, dir: &Path) -> Result<(), PolicyError> {
        self.0.save(dir).map_err(model_error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collective::SingleRank;
    use crate::inputs::{InputLoader, LAB_PERCENTILES_FILE};
    use crate::optim::{AdamWConfig, LrSchedule};
    use crate::trainer::{StepData, Trainer, TrainerOptions};
    use medtvt_data::{LabPercentiles, QaKind, QaSample};
    use medtvt_eval::{DiagnosisReward, DiseaseVocabulary, NameMatching, RewardWeights};

    /// A tiny MedTVT run config for SFT; `[model.tiny]` decides the model.
    fn sft_config(data: &Path) -> RunConfig {
        let text = format!(
            "[run]\nname = \"overfit\"\nstage = \"sft\"\nout_dir = \"{out}\"\nseed = 1\n\n[data]\ndir = \"{data}\"\n\n\
[model]\ndevice = \"cpu\"\ntrain_all = true\n\n[model.tiny]\nvocab_size = 512\nhidden_size = 64\nintermediate_size = 128\n\
num_layers = 2\nnum_heads = 4\nnum_kv_heads = 2\nimage_size = 32\nvit_patch_size = 16\nvit_depth = 1\necg_resnet_blocks = 1\n\n\
[train]\nsteps = 1\nlearning_rate = 0.003\n",
            out = data.display(),
            data = data.display(),
        );
        medtvt_config::parse_run_config(&text, Path::new("overfit.toml"), &[]).unwrap()
    }

    /// Issue #4: the tiny model overfits a handful of disease-level samples in SFT: the answer
    /// loss falls near zero and greedy decoding gives back each sample's reference answer, whose
    /// parsed disease set equals the sample's labels.
    #[test]
    fn tiny_model_overfits_a_handful_of_samples_in_sft() {
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("data");
        let mut synth = medtvt_data::synth::SynthConfig::new(6, 11);
        synth.image_size = 32;
        medtvt_data::synth::synthesize(&data, &synth).unwrap();
        let samples: Vec<QaSample> =
            medtvt_data::read_jsonl(&data.join("qa.jsonl")).unwrap().into_iter().filter(|s| s.kind == QaKind::Disease).take(4).collect();
        assert_eq!(samples.len(), 4);

        let texts: Vec<String> = samples.iter().flat_map(|s| [s.question.clone(), s.answer.clone()]).collect();
        let tokenizer_path = tmp.path().join("tokenizer.json");
        MedTvtPolicy::train_tokenizer(&texts, 512, &tokenizer_path).unwrap();
        let cfg = sft_config(&data);
        let mut policy = MedTvtPolicy::load(&cfg, Device::Cpu, Some(tokenizer_path.as_path())).unwrap();
        policy.set_trainable(Stage::Sft, true);
        let percentiles = LabPercentiles::load(&data.join(LAB_PERCENTILES_FILE)).unwrap();
        let prompts = InputLoader::new(data.clone(), percentiles, 32).prompts(&samples).unwrap();
        let answers: Vec<String> = samples.iter().map(|s| s.answer.clone()).collect();

        let options = TrainerOptions {
            stage: Stage::Sft,
            max_prompt_tokens: 256,
            max_answer_tokens: 256,
            grad_accumulation: 1,
            grad_clip: 1.0,
            schedule: LrSchedule { peak: 1e-2, warmup: 0, total: 1_000, min_ratio: 1.0 },
            adamw: AdamWConfig::default(),
            grpo: None,
        };
        let mut trainer = Trainer::new(policy, None, Box::new(SingleRank), options);
        let step_data = StepData::Supervised { prompts: prompts.clone(), answers: answers.clone() };
        let first = trainer.step(&step_data).unwrap().metrics["loss"];
        let mut loss = first;
        let mut steps = 1;
        while loss > 0.005 && steps < 600 {
            loss = trainer.step(&step_data).unwrap().metrics["loss"];
            steps += 1;
        }
        assert!(loss < 0.005, "answer loss {first} -> {loss} after {steps} steps");

        let model = &trainer.policy().0;
        let batch = model.encode_prompts(&prompts, 256).unwrap();
        let longest = answers.iter().map(|a| model.tokenizer().encode(a, false).unwrap().len()).max().unwrap();
        let params = SamplingParams { max_new_tokens: longest + 4, greedy: true, ..SamplingParams::default() };
        let (generation, _) = model.generate(&batch, &params).unwrap();
        let vocabulary = DiseaseVocabulary::paper_default(NameMatching::Synonyms);
        let reward = DiagnosisReward::new(vocabulary.clone(), RewardWeights::default());
        for ((sample, tokens), reference) in samples.iter().zip(&generation.tokens).zip(&answers) {
            let text = model.decode(tokens).unwrap();
            assert_eq!(&text, reference, "{}: greedy answer differs from the reference", sample.id);
            let predicted = reward.parse(&text).map(|a| a.diseases()).unwrap_or_default();
            let labels: medtvt_eval::DiseaseSet = sample.labels.iter().map(|l| vocabulary.lookup(l).unwrap()).collect();
            assert_eq!(predicted, labels, "{}: {text}", sample.id);
        }
    }
}
