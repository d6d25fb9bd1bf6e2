//! [`Policy`] for MedTVT-R1 (`medtvt_model::medtvt::MedTvt`): the model the `medtvt learner` and
//! `medtvt rollout-worker` processes train and sample.

use super::{FinishedRollout, GroupSpec, Policy, PolicyError, RolloutEngine, RolloutSampling, Sampled, TrainableCount};
use crate::llama::{ContinuousBatch, GroupRequest};
use crate::medtvt::{MedTvt, PromptBatch};
use crate::{MedTokenizer, SamplingParams};
use medtvt_config::{RunConfig, Stage};
use medtvt_data::ModalityInputs;
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
            .map(|path| {
                MedTokenizer::from_file(path)
                    .map_err(|e| PolicyError::Tokenizer { path: path.to_path_buf(), problem: e.to_string() })
            })
            .transpose()?;
        let model = MedTvt::from_run_config(config, device, tokenizer).map_err(model_error)?;
        if let Some((stored, grown)) = model.vocab_resize() {
            tracing::info!(
                stored,
                grown,
                "grew the decoder's vocabulary for the modality placeholders (new rows: the mean of the stored ones)"
            );
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

    fn encode_prompts(
        &self,
        prompts: &[(String, ModalityInputs)],
        max_prompt_tokens: usize,
    ) -> Result<PromptBatch, PolicyError> {
        self.0.encode_prompts(prompts, max_prompt_tokens).map_err(model_error)
    }

    fn repeat_prompts(&self, prompts: &PromptBatch, times: i64) -> PromptBatch {
        prompts.repeat_interleave(times)
    }

    fn encode_answers(&self, texts: &[String], max_tokens: usize) -> Result<(Tensor, Tensor), PolicyError> {
        self.0.encode_completions(texts, max_tokens).map_err(model_error)
    }

    fn score(
        &self,
        prompts: &PromptBatch,
        completion_ids: &Tensor,
        completion_mask: &Tensor,
        temperature: f64,
        train: bool,
    ) -> Tensor {
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
        Ok(Sampled {
            tokens: generation.tokens,
            logprobs: generation.logprobs,
            finished_by_eos: generation.finished_by_eos,
        })
    }

    fn rollout_engine(
        &self,
        slots: usize,
        sampling: &RolloutSampling,
    ) -> Result<Box<dyn RolloutEngine<Self>>, PolicyError> {
        let params = SamplingParams {
            max_new_tokens: sampling.max_new_tokens,
            temperature: sampling.temperature,
            top_p: sampling.top_p,
            top_k: sampling.top_k,
            greedy: false,
            seed: sampling.seed,
            eos_token_ids: self.0.eos_ids().to_vec(),
        };
        let batch = ContinuousBatch::new(slots, &params, self.0.device()).map_err(model_error)?;
        Ok(Box::new(MedTvtRollouts { batch }))
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

/// MedTVT's rollouts: continuous batching over the decoder ([`ContinuousBatch`]); the encoders and
/// the MPL run once per prompt at submission.
pub struct MedTvtRollouts {
    batch: ContinuousBatch,
}

impl RolloutEngine<MedTvtPolicy> for MedTvtRollouts {
    fn submit(
        &mut self,
        policy: &MedTvtPolicy,
        prompts: &PromptBatch,
        groups: &[GroupSpec],
    ) -> Result<(), PolicyError> {
        let rows = policy.0.prompt_rows(prompts).map_err(model_error)?;
        if rows.len() != groups.len() {
            return Err(PolicyError::Model(format!("{} prompts for {} groups", rows.len(), groups.len())));
        }
        for (embeds, spec) in rows.into_iter().zip(groups) {
            let request = GroupRequest { id: spec.id, embeds, group_size: spec.group_size, seed: spec.seed };
            self.batch.submit(request).map_err(model_error)?;
        }
        Ok(())
    }

    fn step(&mut self, policy: &MedTvtPolicy, version: u64) -> Result<Vec<FinishedRollout>, PolicyError> {
        let done = self.batch.step(policy.0.decoder(), version).map_err(model_error)?;
        Ok(done
            .into_iter()
            .map(|g| {
                let sampled = Sampled {
                    tokens: g.generation.tokens,
                    logprobs: g.generation.logprobs,
                    finished_by_eos: g.generation.finished_by_eos,
                };
                FinishedRollout { id: g.id, sampled, token_versions: g.tags }
            })
            .collect())
    }

    fn cancel(&mut self, ids: &[u64]) {
        self.batch.cancel(ids);
    }

    fn free_slots(&self) -> usize {
        self.batch.free_slots()
    }

    fn is_idle(&self) -> bool {
        self.batch.is_idle()
    }
}
