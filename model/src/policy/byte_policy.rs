//! A small real network implementing [`Policy`] for the trainer's unit tests: byte-level
//! tokens, a prompt vector (mean of the prompt's token embeddings plus a projection of the mean
//! lab value, so a NaN input reaches the loss), and a next-token head over the previous token's
//! embedding. It learns, its gradients are real, and it is fast on CPU.

use super::{Policy, PolicyError, RolloutSampling, Sampled, TrainableCount};
use medtvt_config::{RunConfig, Stage};
use medtvt_data::ModalityInputs;
use std::path::Path;
use tch::nn::{self, Module};
use tch::{Device, Kind, Tensor};

const EOS: i64 = 256;
const VOCAB: i64 = 257;

pub struct BytePolicy {
    vs: nn::VarStore,
    embed: nn::Embedding,
    lab: nn::Linear,
    head: nn::Linear,
}

pub struct BytePrompts {
    /// `[b, t]` byte ids, right-padded with 0.
    ids: Tensor,
    /// `[b, t]` f32.
    mask: Tensor,
    /// `[b, 1]` mean lab value (0 without labs).
    lab: Tensor,
}

impl BytePolicy {
    pub fn new(hidden: i64) -> Self {
        let vs = nn::VarStore::new(Device::Cpu);
        let root = vs.root();
        let embed = nn::embedding(&root / "embed", VOCAB, hidden, Default::default());
        let lab = nn::linear(&root / "lab", 1, hidden, Default::default());
        let head = nn::linear(&root / "head", hidden, VOCAB, Default::default());
        BytePolicy { vs, embed, lab, head }
    }

    /// `new` with every weight a fixed function of `seed`, drawn without libtorch's global
    /// generator, so tests running on parallel threads get bit-identical models.
    pub fn with_seed(hidden: i64, seed: i64) -> Self {
        let policy = BytePolicy::new(hidden);
        let mut vars: Vec<(String, Tensor)> = policy.vs.variables().into_iter().collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        tch::no_grad(|| {
            for (i, (_, var)) in vars.iter().enumerate() {
                let n = var.numel() as i64;
                let values = ((Tensor::arange(n, (Kind::Float, Device::Cpu)) * 0.7311 + (seed * 31 + i as i64) as f64)
                    .sin()
                    * 0.1)
                    .view(var.size().as_slice());
                var.shallow_clone().copy_(&values);
            }
        });
        policy
    }

    /// `[b, d]` prompt vectors.
    fn prompt_vectors(&self, p: &BytePrompts) -> Tensor {
        let emb = self.embed.forward(&p.ids) * p.mask.unsqueeze(-1); // [b, t, d]
        let mean =
            emb.sum_dim_intlist(1, false, Kind::Float) / p.mask.sum_dim_intlist(1, true, Kind::Float).clamp_min(1.0);
        mean + self.lab.forward(&p.lab)
    }

    /// `[b, tc, V]` next-token logits for the completion positions.
    fn logits(&self, p: &BytePrompts, completion_ids: &Tensor) -> Tensor {
        let b = completion_ids.size()[0];
        let previous = Tensor::cat(
            &[
                Tensor::full([b, 1], EOS, (Kind::Int64, Device::Cpu)),
                completion_ids.narrow(1, 0, completion_ids.size()[1] - 1),
            ],
            1,
        );
        let h = self.embed.forward(&previous) + self.prompt_vectors(p).unsqueeze(1); // [b, tc, d]
        self.head.forward(&h.tanh())
    }
}

fn bytes_to_ids(texts: &[String], max: usize, append_eos: bool) -> (Tensor, Tensor) {
    let rows: Vec<Vec<i64>> = texts
        .iter()
        .map(|t| {
            let mut ids: Vec<i64> = t.bytes().take(max).map(i64::from).collect();
            // A cut answer gets no end token (as MedTvt::encode_completions).
            if append_eos && t.len() <= max {
                ids.push(EOS);
            }
            ids
        })
        .collect();
    let width = rows.iter().map(Vec::len).max().unwrap_or(0).max(1);
    let mut ids = vec![0i64; rows.len() * width];
    let mut mask = vec![0f32; rows.len() * width];
    for (r, row) in rows.iter().enumerate() {
        for (c, &id) in row.iter().enumerate() {
            ids[r * width + c] = id;
            mask[r * width + c] = 1.0;
        }
    }
    let shape = [rows.len() as i64, width as i64];
    (Tensor::from_slice(&ids).view(shape), Tensor::from_slice(&mask).view(shape))
}

impl Policy for BytePolicy {
    type Prompts = BytePrompts;

    fn load(_config: &RunConfig, _device: Device, _tokenizer: Option<&Path>) -> Result<Self, PolicyError> {
        Ok(BytePolicy::new(16))
    }

    fn train_tokenizer(_texts: &[String], _vocab_size: usize, out: &Path) -> Result<(), PolicyError> {
        std::fs::write(out, "bytes")
            .map_err(|e| PolicyError::Tokenizer { path: out.to_path_buf(), problem: e.to_string() })
    }

    fn set_trainable(&mut self, _stage: Stage, _all: bool) -> TrainableCount {
        TrainableCount { trainable: self.vs.variables().len(), frozen: 0, groups: vec!["all".into()] }
    }

    fn device(&self) -> Device {
        Device::Cpu
    }

    fn image_size(&self) -> usize {
        32
    }

    fn encode_prompts(
        &self,
        prompts: &[(String, ModalityInputs)],
        max_prompt_tokens: usize,
    ) -> Result<BytePrompts, PolicyError> {
        let questions: Vec<String> = prompts.iter().map(|(q, _)| q.clone()).collect();
        let (ids, mask) = bytes_to_ids(&questions, max_prompt_tokens, false);
        let labs: Vec<f32> = prompts
            .iter()
            .map(|(_, m)| m.lab.as_ref().map_or(0.0, |v| v.iter().sum::<f32>() / v.len().max(1) as f32))
            .collect();
        Ok(BytePrompts { ids, mask, lab: Tensor::from_slice(&labs).view([-1, 1]) })
    }

    fn repeat_prompts(&self, p: &BytePrompts, times: i64) -> BytePrompts {
        let rep = |t: &Tensor| t.repeat_interleave_self_int(times, Some(0), None);
        BytePrompts { ids: rep(&p.ids), mask: rep(&p.mask), lab: rep(&p.lab) }
    }

    fn encode_answers(&self, texts: &[String], max_tokens: usize) -> Result<(Tensor, Tensor), PolicyError> {
        Ok(bytes_to_ids(texts, max_tokens, true))
    }

    fn score(
        &self,
        prompts: &BytePrompts,
        completion_ids: &Tensor,
        _mask: &Tensor,
        temperature: f64,
        _train: bool,
    ) -> Tensor {
        let logp = (self.logits(prompts, completion_ids) / temperature).log_softmax(-1, Kind::Float);
        logp.gather(2, &completion_ids.unsqueeze(-1), false).squeeze_dim(-1)
    }

    fn sample(&self, prompts: &BytePrompts, s: &RolloutSampling) -> Result<Sampled, PolicyError> {
        tch::manual_seed(s.seed as i64);
        let b = prompts.ids.size()[0];
        let mut tokens: Vec<Vec<i64>> = vec![Vec::new(); b as usize];
        let mut logprobs: Vec<Vec<f32>> = vec![Vec::new(); b as usize];
        let mut done = vec![false; b as usize];
        tch::no_grad(|| {
            for _ in 0..s.max_new_tokens {
                let so_far: Vec<i64> = (0..b as usize).map(|i| tokens[i].last().copied().unwrap_or(EOS)).collect();
                let h = self.embed.forward(&Tensor::from_slice(&so_far)) + self.prompt_vectors(prompts);
                let logp = (self.head.forward(&h.tanh()) / s.temperature).log_softmax(-1, Kind::Float); // [b, V]
                let next = logp.exp().multinomial(1, true).squeeze_dim(-1);
                let chosen = logp.gather(1, &next.unsqueeze(-1), false).squeeze_dim(-1);
                let next = Vec::<i64>::try_from(&next).unwrap_or_default();
                let chosen = Vec::<f32>::try_from(&chosen).unwrap_or_default();
                for i in 0..b as usize {
                    if !done[i] {
                        tokens[i].push(next[i]);
                        logprobs[i].push(chosen[i]);
                        done[i] = next[i] == EOS;
                    }
                }
            }
        });
        Ok(Sampled { tokens, logprobs, finished_by_eos: done })
    }

    fn decode(&self, ids: &[i64]) -> String {
        ids.iter().filter(|&&i| (0..256).contains(&i)).map(|&i| i as u8 as char).collect()
    }

    fn all_tensors(&self) -> Vec<(String, Tensor)> {
        let mut v: Vec<(String, Tensor)> = self.vs.variables().into_iter().collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    fn trainable_tensors(&self) -> Vec<(String, Tensor)> {
        self.all_tensors()
    }

    fn copy_named_tensors(&mut self, named: &[(String, Tensor)]) -> Result<(), PolicyError> {
        let vars = self.vs.variables();
        for (name, src) in named {
            let dst = vars
                .get(name)
                .ok_or_else(|| PolicyError::Weights { name: name.clone(), problem: "no such variable".into() })?;
            tch::no_grad(|| dst.shallow_clone().copy_(src));
        }
        Ok(())
    }

    fn save(&self, dir: &Path) -> Result<(), PolicyError> {
        std::fs::create_dir_all(dir).map_err(|e| PolicyError::Model(e.to_string()))?;
        self.vs.save(dir.join("model.safetensors")).map_err(|e| PolicyError::Model(e.to_string()))
    }
}
