//! Continuous batching for rollouts: a fixed number of decode slots that GRPO groups flow through.
//!
//! [`ContinuousBatch`] holds `slots` rows of one KV cache. A group of G completions of one prompt
//! is admitted when G slots are free: its prompt is prefilled once (with every other group admitted
//! in the same round, as one left-padded batch) and the result copied into its G rows
//! ([`KvCache::append_rows`]). Every [`ContinuousBatch::step`] then decodes one token for every
//! busy row at once; a row that emits an end token or reaches `max_new_tokens` frees its slot at
//! once, and the next waiting group takes the freed slots at the start of the next step, so the
//! batch stays full instead of waiting for its longest row. A group is returned as soon as its
//! last row ends.
//!
//! Layout: the cache's columns are shared by all rows; an admission appends the new prompts'
//! columns (masked out for every other row) and each decode step appends one column. Positions
//! come from each row's own mask (`cumsum`), so a row's prompt and tokens are where they would be
//! in a cache of its own. When the columns exceed twice what the longest row needs, the cache is
//! compacted: each row's real columns are gathered, right-aligned, into a narrower cache.
//!
//! Randomness matches [`super::generate_groups_from_embeds`]: row j of a group with seed s draws
//! from stream (s, j) at its own decode step, so a group sampled here gets the tokens it would get
//! alone (up to float noise in the logits from a different batch around it).
//!
//! The model is passed to every call rather than held, so the caller may load new weights between
//! steps (a partial rollout: the rows go on with the new policy from their next token). Each step
//! takes a tag (the policy version) that every token it samples records, so a partial rollout
//! says which version sampled which token.

use super::generate::{row_keys, GenerateError, Generation, Sampler, SamplingParams};
use super::model::{KvCache, Llama};
use std::collections::{HashMap, VecDeque};
use tch::{Device, Kind, Tensor};

/// One prompt to complete `group_size` times.
#[derive(Debug)]
pub struct GroupRequest {
    /// The caller's name for the group, returned with its completions.
    pub id: u64,
    /// The prompt's embeddings `[t, d]` (no padding).
    pub embeds: Tensor,
    pub group_size: usize,
    /// Row j of the group samples from stream (seed, j).
    pub seed: u64,
}

/// A group whose rows all ended: row j of `generation` is completion j.
#[derive(Debug)]
pub struct FinishedGroup {
    pub id: u64,
    pub generation: Generation,
    /// The tag of the step that sampled each token, row by row.
    pub tags: Vec<Vec<u64>>,
}

/// What a busy slot is generating.
#[derive(Debug)]
struct Row {
    group: u64,
    index: usize,
    tokens: Vec<i64>,
    logprobs: Vec<f32>,
    tags: Vec<u64>,
}

/// The rows of a group, filled in as they end.
#[derive(Debug)]
struct Pending {
    rows: Vec<Option<Row>>,
    eos: Vec<bool>,
    left: usize,
}

/// Decode slots that GRPO groups flow through (see the module doc).
#[derive(Debug)]
pub struct ContinuousBatch {
    params: SamplingParams,
    slots: Vec<Option<Row>>,
    waiting: VecDeque<GroupRequest>,
    pending: HashMap<u64, Pending>,
    /// Created at the first admission (it needs the model's shapes).
    cache: Option<KvCache>,
    /// `[slots, cache.len()]` i64: which columns each row attends to.
    mask: Tensor,
    /// `[slots, 1]` i64: the token each busy row feeds next.
    last: Tensor,
    /// `[slots, 1]` i64: each slot's random stream, and its next decode step.
    keys: Tensor,
    steps: Tensor,
    /// The longest prompt admitted so far (sizes the compaction threshold).
    longest_prompt: i64,
    /// The current step's tag.
    tag: u64,
    device: Device,
}

impl ContinuousBatch {
    /// `slots` rows decoded together; `params` as for `generate` (`greedy` and `seed` unused: each
    /// group brings its seed, and argmax is `top_k = 1`).
    pub fn new(slots: usize, params: &SamplingParams, device: Device) -> Result<Self, GenerateError> {
        params.validate()?;
        if slots == 0 {
            return Err(GenerateError::Params { field: "slots", value: "0".into(), why: "must be at least 1" });
        }
        let n = slots as i64;
        Ok(ContinuousBatch {
            params: params.clone(),
            slots: (0..slots).map(|_| None).collect(),
            waiting: VecDeque::new(),
            pending: HashMap::new(),
            cache: None,
            mask: Tensor::zeros([n, 0], (Kind::Int64, device)),
            last: Tensor::zeros([n, 1], (Kind::Int64, device)),
            keys: Tensor::zeros([n, 1], (Kind::Int64, device)),
            steps: Tensor::zeros([n, 1], (Kind::Int64, device)),
            longest_prompt: 0,
            tag: 0,
            device,
        })
    }

    pub fn slots(&self) -> usize {
        self.slots.len()
    }

    /// Slots neither busy nor promised to a waiting group.
    pub fn free_slots(&self) -> usize {
        let idle = self.slots.iter().filter(|s| s.is_none()).count();
        idle.saturating_sub(self.waiting.iter().map(|g| g.group_size).sum())
    }

    /// Rows being generated.
    pub fn busy_rows(&self) -> usize {
        self.slots.iter().filter(|s| s.is_some()).count()
    }

    /// Nothing waiting and nothing being generated.
    pub fn is_idle(&self) -> bool {
        self.waiting.is_empty() && self.busy_rows() == 0
    }

    /// Columns the cache holds now (for tests and metrics).
    pub fn cache_columns(&self) -> i64 {
        self.cache.as_ref().map_or(0, KvCache::len)
    }

    /// Queues a group; it is admitted at a step that finds `group_size` free slots.
    pub fn submit(&mut self, request: GroupRequest) -> Result<(), GenerateError> {
        let shape = request.embeds.size();
        if shape.len() != 2 || shape[0] == 0 {
            return Err(GenerateError::Shape {
                what: "GroupRequest.embeds",
                found: shape,
                expected: "[t > 0, hidden]".into(),
            });
        }
        if request.group_size == 0 || request.group_size > self.slots.len() {
            return Err(GenerateError::Params {
                field: "group_size",
                value: request.group_size.to_string(),
                why: "must be between 1 and the number of slots",
            });
        }
        if self.pending.contains_key(&request.id) || self.waiting.iter().any(|g| g.id == request.id) {
            return Err(GenerateError::Params {
                field: "id",
                value: request.id.to_string(),
                why: "a group with this id is already in the batch",
            });
        }
        self.waiting.push_back(request);
        Ok(())
    }

    /// Drops the groups `ids` (waiting or being generated): their slots are free at once.
    pub fn cancel(&mut self, ids: &[u64]) {
        self.waiting.retain(|g| !ids.contains(&g.id));
        for id in ids {
            self.pending.remove(id);
        }
        let dropped: Vec<i64> = (0..self.slots.len())
            .filter(|&i| self.slots[i].as_ref().is_some_and(|row| ids.contains(&row.group)))
            .map(|i| i as i64)
            .collect();
        for &i in &dropped {
            self.slots[i as usize] = None;
        }
        if !dropped.is_empty() {
            let _ = self.mask.index_fill_(0, &Tensor::from_slice(&dropped).to_device(self.device), 0);
        }
    }

    /// Admits what fits, decodes one token for every busy row, and returns the groups that ended.
    /// Every token sampled in this step records `tag`.
    pub fn step(&mut self, model: &Llama, tag: u64) -> Result<Vec<FinishedGroup>, GenerateError> {
        let _no_grad = tch::no_grad_guard();
        self.tag = tag;
        let mut finished = Vec::new();
        self.admit(model, &mut finished)?;
        // Rows admitted now drew their first token from the prefill; every busy row (those too)
        // now decodes its next one.
        if self.busy_rows() > 0 {
            self.decode(model, &mut finished)?;
        }
        Ok(finished)
    }

    fn max_new(&self) -> i64 {
        self.params.max_new_tokens as i64
    }

    /// Prefills every waiting group that fits (in order) and samples its rows' first tokens.
    fn admit(&mut self, model: &Llama, finished: &mut Vec<FinishedGroup>) -> Result<(), GenerateError> {
        let mut free: Vec<usize> = (0..self.slots.len()).filter(|&i| self.slots[i].is_none()).collect();
        let mut groups = Vec::new();
        while self.waiting.front().is_some_and(|g| g.group_size <= free.len()) {
            let Some(group) = self.waiting.pop_front() else { break };
            let rows: Vec<usize> = free.drain(..group.group_size).collect();
            groups.push((group, rows));
        }
        if groups.is_empty() {
            return Ok(());
        }
        if self.max_new() == 0 {
            for (group, _) in groups {
                let g = group.group_size;
                let generation =
                    Generation { tokens: vec![vec![]; g], logprobs: vec![vec![]; g], finished_by_eos: vec![false; g] };
                finished.push(FinishedGroup { id: group.id, generation, tags: vec![vec![]; g] });
            }
            return Ok(());
        }
        // One left-padded prefill of the new prompts.
        let lengths: Vec<i64> = groups.iter().map(|(g, _)| g.embeds.size()[0]).collect();
        let width = lengths.iter().copied().max().unwrap_or(1);
        let d = model.config().hidden_size;
        let kind = model.kind();
        let embeds = Tensor::zeros([groups.len() as i64, width, d], (kind, self.device));
        let mask = Tensor::zeros([groups.len() as i64, width], (Kind::Int64, self.device));
        for (i, ((group, _), &len)) in groups.iter().zip(&lengths).enumerate() {
            let i = i as i64;
            embeds.get(i).narrow(0, width - len, len).copy_(&group.embeds.to_device(self.device).to_kind(kind));
            let _ = mask.get(i).narrow(0, width - len, len).fill_(1);
        }
        let mut prefill = model.new_cache(groups.len() as i64, width);
        let hidden = model.forward_hidden(&embeds, &mask, Some(&mut prefill));
        let logits = model.logits(&hidden.narrow(1, width - 1, 1)).squeeze_dim(1); // [n, vocab]

        let cache = self.cache.get_or_insert_with(|| model.new_cache(self.slots.len() as i64, 2 * (width + 1)));
        let placement: Vec<(i64, i64)> = groups
            .iter()
            .enumerate()
            .flat_map(|(i, (_, rows))| rows.iter().map(move |&r| (i as i64, r as i64)))
            .collect();
        cache.append_rows(&prefill, &placement);
        // The new rows see only their own prompt columns; everyone else none of them.
        let dst = Tensor::from_slice(&placement.iter().map(|p| p.1).collect::<Vec<_>>()).to_device(self.device);
        let src = Tensor::from_slice(&placement.iter().map(|p| p.0).collect::<Vec<_>>()).to_device(self.device);
        let _ = self.mask.index_fill_(0, &dst, 0);
        let mut new_columns = Tensor::zeros([self.slots.len() as i64, width], (Kind::Int64, self.device));
        let _ = new_columns.index_copy_(0, &dst, &mask.index_select(0, &src));
        self.mask = Tensor::cat(&[&self.mask, &new_columns], 1);
        self.longest_prompt = self.longest_prompt.max(width);

        let mut keys = Vec::with_capacity(placement.len());
        for (group, rows) in &groups {
            for (j, &slot) in rows.iter().enumerate() {
                self.slots[slot] =
                    Some(Row { group: group.id, index: j, tokens: Vec::new(), logprobs: Vec::new(), tags: Vec::new() });
                keys.push((group.seed, j as i64));
            }
            let rows = (0..group.group_size).map(|_| None).collect();
            self.pending.insert(group.id, Pending { rows, eos: vec![false; group.group_size], left: group.group_size });
        }
        let seeds: Vec<Tensor> = keys
            .iter()
            .map(|&(seed, j)| row_keys(seed, &Tensor::from_slice(&[j]).view([1, 1]).to_device(self.device)))
            .collect();
        let new_keys = Tensor::cat(&seeds, 0); // [rows, 1]
        let _ = self.keys.index_copy_(0, &dst, &new_keys);
        let _ = self.steps.index_fill_(0, &dst, 0);
        let row_logits = logits.index_select(0, &src);
        self.sample(&row_logits, &dst, finished)
    }

    /// One decode forward over every slot and a token for every busy row.
    fn decode(&mut self, model: &Llama, finished: &mut Vec<FinishedGroup>) -> Result<(), GenerateError> {
        self.compact_if_wide();
        let Some(cache) = self.cache.as_mut() else { return Ok(()) };
        let n = self.slots.len() as i64;
        // An idle slot attends to its newest column only: never to nothing (a fully masked row
        // would compute NaN into the cache), and never to a column a later group would inherit.
        let idle: Vec<i64> = (0..n).filter(|&i| self.slots[i as usize].is_none()).collect();
        if !idle.is_empty() {
            let _ = self.mask.index_fill_(0, &Tensor::from_slice(&idle).to_device(self.device), 0);
        }
        self.mask = Tensor::cat(&[&self.mask, &Tensor::ones([n, 1], (Kind::Int64, self.device))], 1);
        let hidden = model.forward_hidden(&model.embed_tokens(&self.last), &self.mask, Some(cache));
        let logits = model.logits(&hidden).squeeze_dim(1); // [slots, vocab]
        let busy: Vec<i64> = (0..n).filter(|&i| self.slots[i as usize].is_some()).collect();
        let rows = Tensor::from_slice(&busy).to_device(self.device);
        self.sample(&logits.index_select(0, &rows), &rows, finished)
    }

    /// Samples the next token of slots `rows` from their logits, records it, frees ended rows.
    fn sample(
        &mut self,
        logits: &Tensor,
        rows: &Tensor,
        finished: &mut Vec<FinishedGroup>,
    ) -> Result<(), GenerateError> {
        let sampler = Sampler::with_keys(&self.params, self.keys.index_select(0, rows));
        let steps = self.steps.index_select(0, rows);
        let next = sampler.choose_rows(logits, &steps); // [r]
        let logprob =
            (logits / self.params.temperature).log_softmax(-1, Kind::Float).gather(1, &next.unsqueeze(1), false);
        let _ = self.last.index_copy_(0, rows, &next.unsqueeze(1));
        let _ = self.steps.index_add_(0, rows, &steps.ones_like());
        // The one read-back of the loop: the tokens, to see which rows ended.
        let slots = Vec::<i64>::try_from(rows.to_device(Device::Cpu))?;
        let tokens = Vec::<i64>::try_from(next.to_device(Device::Cpu))?;
        let logprobs = Vec::<f32>::try_from(logprob.view([-1]).to_device(Device::Cpu))?;
        for ((slot, token), logprob) in slots.into_iter().zip(tokens).zip(logprobs) {
            let slot = slot as usize;
            let Some(row) = self.slots[slot].as_mut() else { continue };
            row.tokens.push(token);
            row.logprobs.push(logprob);
            row.tags.push(self.tag);
            let eos = self.params.eos_token_ids.contains(&token);
            if !eos && row.tokens.len() < self.params.max_new_tokens {
                continue;
            }
            let Some(row) = self.slots[slot].take() else { continue };
            let Some(pending) = self.pending.get_mut(&row.group) else { continue };
            let (group, index) = (row.group, row.index);
            pending.eos[index] = eos;
            pending.rows[index] = Some(row);
            pending.left -= 1;
            if pending.left == 0 {
                if let Some(done) = self.pending.remove(&group) {
                    finished.push(collect_group(group, done));
                }
            }
        }
        Ok(())
    }

    /// When the shared columns exceed twice what a row can need, gathers each row's real columns
    /// (right-aligned) into a cache of just that width.
    fn compact_if_wide(&mut self) {
        let need = self.longest_prompt + self.max_new() + 1;
        let Some(cache) = self.cache.as_mut() else { return };
        if cache.len() < 2 * need {
            return;
        }
        let real = self.mask.sum_dim_intlist(1, false, Kind::Int64); // [slots]
        let width = i64::try_from(real.max()).unwrap_or(0).max(1);
        // Column order per row: padding (0) first, then real columns in order; a stable sort on
        // the mask puts the real ones last, keeping their order.
        let (_, order) = self.mask.sort_stable(true, 1, false);
        let keep = order.narrow(1, order.size()[1] - width, width); // [slots, width]
        cache.gather_columns(&keep, need.max(width + 1));
        self.mask = self.mask.gather(1, &keep, false);
    }
}

/// A finished group's rows as one [`Generation`], with their tags.
fn collect_group(id: u64, done: Pending) -> FinishedGroup {
    let mut generation = Generation { tokens: Vec::new(), logprobs: Vec::new(), finished_by_eos: done.eos };
    let mut tags = Vec::new();
    for row in done.rows.into_iter().flatten() {
        generation.tokens.push(row.tokens);
        generation.logprobs.push(row.logprobs);
        tags.push(row.tags);
    }
    FinishedGroup { id, generation, tags }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::llama::{generate_groups_from_embeds, left_pad, LlamaConfig};

    fn tiny() -> (tch::nn::VarStore, Llama) {
        tch::manual_seed(11);
        let vs = tch::nn::VarStore::new(Device::Cpu);
        let model = Llama::new(&vs.root(), &LlamaConfig::tiny(40, 32, 64, 2, 4, 2));
        (vs, model)
    }

    fn embeds(model: &Llama, ids: &[i64]) -> Tensor {
        model.embed_tokens(&Tensor::from_slice(ids))
    }

    /// Each group as `generate_groups_from_embeds` samples it alone, with its seed.
    fn alone(model: &Llama, ids: &[i64], g: i64, seed: u64, params: &SamplingParams) -> Generation {
        let (tokens, mask) = left_pad(&[ids.to_vec()], 0, Device::Cpu).unwrap();
        let params = SamplingParams { seed, ..params.clone() };
        generate_groups_from_embeds(model, &model.embed_tokens(&tokens), &mask, g, &params).unwrap()
    }

    /// Groups of different prompt lengths flow through fewer slots than they have rows in all:
    /// each comes out as it would alone, and the slots are reused (the cache is compacted).
    #[test]
    fn groups_flowing_through_shared_slots_sample_what_they_would_alone() {
        let (_vs, model) = tiny();
        let params = SamplingParams { max_new_tokens: 10, eos_token_ids: vec![7, 11], ..Default::default() };
        let prompts: Vec<Vec<i64>> =
            vec![vec![3, 9, 4, 7, 1], vec![8, 2], vec![5, 5, 6], vec![1, 2, 3, 4, 5, 6, 7, 8], vec![30]];
        let g = 3;
        let mut batch = ContinuousBatch::new(7, &params, Device::Cpu).unwrap();
        for (i, p) in prompts.iter().enumerate() {
            let request = GroupRequest { id: i as u64, embeds: embeds(&model, p), group_size: g, seed: 100 + i as u64 };
            batch.submit(request).unwrap();
        }
        assert_eq!(batch.free_slots(), 0, "7 slots, 15 rows promised");
        let mut done = HashMap::new();
        let mut steps = 0;
        let mut widest = 0;
        while !batch.is_idle() {
            for group in batch.step(&model, steps).unwrap() {
                // A row's first two tokens come from the step that admitted it (prefill, then
                // its first decode), then one per step.
                for (row, tags) in group.generation.tokens.iter().zip(&group.tags) {
                    assert_eq!(row.len(), tags.len());
                    assert!(tags.len() < 2 || tags[0] == tags[1], "{tags:?}");
                    assert!(tags.windows(2).skip(1).all(|w| w[1] == w[0] + 1), "{tags:?}");
                }
                done.insert(group.id, group.generation);
            }
            widest = widest.max(batch.cache_columns());
            steps += 1;
            assert!(steps < 200, "the batch does not drain");
        }
        assert_eq!(done.len(), prompts.len());
        for (i, p) in prompts.iter().enumerate() {
            let want = alone(&model, p, g as i64, 100 + i as u64, &params);
            let got = &done[&(i as u64)];
            assert_eq!(got.tokens, want.tokens, "group {i}");
            assert_eq!(got.finished_by_eos, want.finished_by_eos, "group {i}");
            for (a, b) in got.logprobs.iter().flatten().zip(want.logprobs.iter().flatten()) {
                assert!((a - b).abs() < 1e-4, "group {i}: log-prob {a} vs {b}");
            }
        }
        let need = 8 + 10 + 1;
        assert!(widest <= 2 * need + 8, "the cache was never compacted: {widest} columns");
    }

    #[test]
    fn a_slot_frees_as_soon_as_its_row_ends() {
        let (_vs, model) = tiny();
        // Every token ends a row: each group takes one step.
        let params = SamplingParams { max_new_tokens: 5, eos_token_ids: (0..40).collect(), ..Default::default() };
        let mut batch = ContinuousBatch::new(2, &params, Device::Cpu).unwrap();
        batch.submit(GroupRequest { id: 1, embeds: embeds(&model, &[1, 2]), group_size: 2, seed: 0 }).unwrap();
        batch.submit(GroupRequest { id: 2, embeds: embeds(&model, &[3]), group_size: 2, seed: 0 }).unwrap();
        let first = batch.step(&model, 0).unwrap();
        assert_eq!(first.len(), 1);
        assert_eq!(first[0].generation.tokens.iter().map(Vec::len).collect::<Vec<_>>(), [1, 1]);
        assert_eq!(batch.step(&model, 0).unwrap()[0].id, 2);
        assert!(batch.is_idle());
    }

    #[test]
    fn cancelled_groups_free_their_slots_and_never_come_back() {
        let (_vs, model) = tiny();
        let params = SamplingParams { max_new_tokens: 4, ..Default::default() };
        let mut batch = ContinuousBatch::new(4, &params, Device::Cpu).unwrap();
        for id in 0..3 {
            batch.submit(GroupRequest { id, embeds: embeds(&model, &[1, 2, 3]), group_size: 2, seed: id }).unwrap();
        }
        assert!(batch.step(&model, 0).unwrap().is_empty());
        batch.cancel(&[0, 2]);
        assert_eq!((batch.busy_rows(), batch.free_slots()), (2, 2));
        let mut ids = Vec::new();
        while !batch.is_idle() {
            ids.extend(batch.step(&model, 1).unwrap().into_iter().map(|g| g.id));
        }
        assert_eq!(ids, [1]);
    }

    #[test]
    fn bad_requests_are_refused() {
        let (_vs, model) = tiny();
        let params = SamplingParams { max_new_tokens: 3, ..Default::default() };
        let mut batch = ContinuousBatch::new(2, &params, Device::Cpu).unwrap();
        let request = |id, g| GroupRequest { id, embeds: embeds(&model, &[1]), group_size: g, seed: 0 };
        assert!(batch.submit(request(1, 3)).is_err(), "more rows than slots");
        assert!(batch.submit(request(1, 0)).is_err());
        batch.submit(request(1, 2)).unwrap();
        assert!(batch.submit(request(1, 1)).is_err(), "duplicate id");
        assert!(ContinuousBatch::new(0, &params, Device::Cpu).is_err());
    }
}
