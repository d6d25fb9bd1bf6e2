//! Batched autoregressive generation over ragged (left-padded) prompts with a preallocated KV
//! cache: greedy or temperature / top-k / top-p sampling, per-row EOS, seeded and reproducible.
//!
//! Log-probabilities: each returned log-prob is `log_softmax(logits / T)[token]` over the full
//! vocabulary at the call's temperature T — the policy's log-prob at temperature T that GRPO's
//! ratio uses (as in TRL and verl) and exactly what `score::score_completions` recomputes with the
//! same T. Top-k / top-p only restrict which token is drawn; they do not renormalise the reported
//! log-prob, since the learner cannot reproduce a truncation. Greedy decoding reports the same
//! quantity for the argmax token.
//!
//! Randomness: sampling inverts each row's cumulative distribution (the softmax of the filtered
//! logits, accumulated in f64) at one uniform number per row and step. The uniform comes from a
//! counter-based hash (SplitMix64) of (seed, row, step) computed on the model's device, with 52
//! random bits placed strictly inside (0, 1). No global torch RNG state is read or changed, so a
//! call is reproducible from its seed alone and concurrent calls do not disturb each other.
//!
//! Why not Gumbel-max: it needs one uniform per vocabulary lane, and a uniform that rounds to 0
//! or 1 (a 2^-24 chance per lane with 24 bits in f32, i.e. most decode steps at a 128k vocabulary
//! once in a while) gives infinite noise that picks an arbitrary token, filtered ones included.
//! Inversion draws one number per row, and a token that top-k / top-p removed has zero width in
//! the cumulative distribution, so no uniform can land on it.

use super::model::Llama;
use tch::{Device, Kind, Tensor};

/// How tokens are chosen and when generation stops.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    pub max_new_tokens: usize,
    /// Softmax temperature T > 0 (also the temperature of the returned log-probs when greedy).
    pub temperature: f64,
    /// Nucleus mass in (0, 1]; 1 disables.
    pub top_p: f64,
    /// Keep only the k most likely tokens; 0 disables.
    pub top_k: usize,
    /// Argmax decoding (temperature, top_p, top_k and seed do not change the tokens).
    pub greedy: bool,
    pub seed: u64,
    /// A row stops after emitting any of these; empty means rows run to `max_new_tokens`.
    pub eos_token_ids: Vec<i64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            max_new_tokens: 256,
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            greedy: false,
            seed: 0,
            eos_token_ids: Vec::new(),
        }
    }
}

/// What each row generated. Rows stop at (and include) their first EOS token.
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    pub tokens: Vec<Vec<i64>>,
    /// `log_softmax(logits / T)` of each generated token (see the module doc).
    pub logprobs: Vec<Vec<f32>>,
    pub finished_by_eos: Vec<bool>,
}

/// Why generation refused its inputs.
#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    #[error("sampling parameter `{field}` = {value} is invalid: {why}")]
    Params { field: &'static str, value: String, why: &'static str },
    #[error("{what} has shape {found:?}, expected {expected}")]
    Shape { what: &'static str, found: Vec<i64>, expected: String },
    #[error("prompt row {row} is empty")]
    EmptyPrompt { row: usize },
    #[error("prompt_mask must be left-padded: the last column is padding in row {row}")]
    NotLeftPadded { row: usize },
    #[error("generation needs at least one prompt")]
    NoPrompts,
    #[error("torch error during generation: {0}")]
    Torch(#[from] tch::TchError),
}

impl SamplingParams {
    pub(crate) fn validate(&self) -> Result<(), GenerateError> {
        let bad = |field, value: f64, why| Err(GenerateError::Params { field, value: value.to_string(), why });
        if !(self.temperature.is_finite() && self.temperature > 0.0) {
            return bad("temperature", self.temperature, "must be finite and > 0");
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad("top_p", self.top_p, "must be in (0, 1]");
        }
        Ok(())
    }
}

/// Left-pads `prompts` with `pad_id`: ids and mask (1 real, 0 pad), both `[b, longest]` i64.
pub fn left_pad(prompts: &[Vec<i64>], pad_id: i64, device: Device) -> Result<(Tensor, Tensor), GenerateError> {
    if prompts.is_empty() {
        return Err(GenerateError::NoPrompts);
    }
    if let Some(row) = prompts.iter().position(Vec::is_empty) {
        return Err(GenerateError::EmptyPrompt { row });
    }
    let width = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let mut ids = Vec::with_capacity(prompts.len() * width);
    let mut mask = Vec::with_capacity(prompts.len() * width);
    for prompt in prompts {
        let pad = width - prompt.len();
        ids.extend(std::iter::repeat_n(pad_id, pad).chain(prompt.iter().copied()));
        mask.extend(std::iter::repeat_n(0i64, pad).chain(std::iter::repeat_n(1, prompt.len())));
    }
    let shape = [prompts.len() as i64, width as i64];
    Ok((
        Tensor::from_slice(&ids).view(shape).to_device(device),
        Tensor::from_slice(&mask).view(shape).to_device(device),
    ))
}

/// Generates from token-id prompts: left-pads them with `pad_id` and calls `generate_from_embeds`.
pub fn generate(
    model: &Llama,
    prompts: &[Vec<i64>],
    pad_id: i64,
    params: &SamplingParams,
) -> Result<Generation, GenerateError> {
    let (ids, mask) = left_pad(prompts, pad_id, model.device())?;
    let embeds = tch::no_grad(|| model.embed_tokens(&ids));
    generate_from_embeds(model, &embeds, &mask, params)
}

/// Generates continuations of left-padded prompt embeddings `[b, t, d]` with mask `[b, t]`.
///
/// One prefill pass fills the KV cache, then one token per step for every row; rows that hit an
/// EOS keep stepping (their tokens are discarded) until all rows are done or `max_new_tokens`.
pub fn generate_from_embeds(
    model: &Llama,
    prompt_embeds: &Tensor,
    prompt_mask: &Tensor,
    params: &SamplingParams,
) -> Result<Generation, GenerateError> {
    generate_groups_from_embeds(model, prompt_embeds, prompt_mask, 1, params)
}

/// Generates `group_size` continuations of each of `n` left-padded prompts (`[n, t, d]`, mask
/// `[n, t]`): rows `i * group_size .. (i + 1) * group_size` of the result continue prompt `i`.
///
/// Each prompt is prefilled once and its KV cache copied to its group's rows
/// ([`super::KvCache::repeat_rows`]), so the prefill costs what one completion's would. The rows
/// then sample exactly as the same prompts repeated `group_size` times in place would through
/// [`generate_from_embeds`]: the same per-row random streams, the same decode steps.
pub fn generate_groups_from_embeds(
    model: &Llama,
    prompt_embeds: &Tensor,
    prompt_mask: &Tensor,
    group_size: i64,
    params: &SamplingParams,
) -> Result<Generation, GenerateError> {
    let _no_grad = tch::no_grad_guard();
    params.validate()?;
    if group_size < 1 {
        return Err(GenerateError::Params {
            field: "group_size",
            value: group_size.to_string(),
            why: "must be at least 1",
        });
    }
    let (n, t) = check_prompt(model, prompt_embeds, prompt_mask)?;
    let b = n * group_size;
    let device = model.device();
    let max_new = params.max_new_tokens as i64;
    if max_new == 0 {
        return Ok(Generation {
            tokens: vec![vec![]; b as usize],
            logprobs: vec![vec![]; b as usize],
            finished_by_eos: vec![false; b as usize],
        });
    }
    let prompt_mask = prompt_mask.to_kind(Kind::Int64);
    let (mut cache, mut logits) = if group_size == 1 {
        let mut cache = model.new_cache(b, t + max_new);
        let hidden = model.forward_hidden(prompt_embeds, &prompt_mask, Some(&mut cache));
        (cache, model.logits(&hidden.narrow(1, t - 1, 1)).squeeze_dim(1))
    } else {
        let mut shared = model.new_cache(n, t);
        let hidden = model.forward_hidden(prompt_embeds, &prompt_mask, Some(&mut shared));
        let logits = model.logits(&hidden.narrow(1, t - 1, 1)).squeeze_dim(1);
        (shared.repeat_rows(group_size, t + max_new), logits.repeat_interleave_self_int(group_size, 0, None::<i64>))
    }; // logits: [b, vocab]
    let mask = Tensor::ones([b, t + max_new], (Kind::Int64, device)); // generated tokens are real
    mask.narrow(1, 0, t).copy_(&prompt_mask.repeat_interleave_self_int(group_size, 0, None::<i64>));

    let sampler = Sampler::new(params, b, device);
    let eos = Tensor::from_slice(&params.eos_token_ids).to_device(device).unsqueeze(0); // [1, n_eos]
    let tokens = Tensor::zeros([b, max_new], (Kind::Int64, device));
    let logprobs = Tensor::zeros([b, max_new], (Kind::Float, device));
    let mut finished = Tensor::zeros([b], (Kind::Bool, device));
    let mut steps = 0;
    while steps < max_new {
        let next = sampler.choose(&logits, steps); // [b]
        let logprob = (&logits / params.temperature).log_softmax(-1, Kind::Float).gather(1, &next.unsqueeze(1), false);
        tokens.narrow(1, steps, 1).copy_(&next.unsqueeze(1));
        logprobs.narrow(1, steps, 1).copy_(&logprob);
        steps += 1;
        if !params.eos_token_ids.is_empty() {
            finished = finished.logical_or(&next.unsqueeze(1).eq_tensor(&eos).any_dim(1, false));
            if finished.all().int64_value(&[]) != 0 {
                break;
            }
        }
        if steps == max_new {
            break;
        }
        let step_embeds = model.embed_tokens(&next.unsqueeze(1)); // [b, 1, d]
        let hidden = model.forward_hidden(&step_embeds, &mask.narrow(1, 0, t + steps), Some(&mut cache));
        logits = model.logits(&hidden).squeeze_dim(1);
    }
    Ok(collect_rows(&tokens.narrow(1, 0, steps), &logprobs.narrow(1, 0, steps), &params.eos_token_ids)?)
}

/// Checks embeddings `[b, t, d]` against the model and a left-padded mask `[b, t]`.
fn check_prompt(model: &Llama, embeds: &Tensor, mask: &Tensor) -> Result<(i64, i64), GenerateError> {
    let d = model.config().hidden_size;
    let shape = embeds.size();
    let [b, t, width] = shape[..] else {
        return Err(GenerateError::Shape {
            what: "prompt_embeds",
            found: shape,
            expected: format!("[batch, time, {d}]"),
        });
    };
    if width != d || b == 0 || t == 0 {
        return Err(GenerateError::Shape {
            what: "prompt_embeds",
            found: shape,
            expected: format!("[batch > 0, time > 0, {d}]"),
        });
    }
    if mask.size() != [b, t] {
        return Err(GenerateError::Shape { what: "prompt_mask", found: mask.size(), expected: format!("[{b}, {t}]") });
    }
    let last = Vec::<i64>::try_from(mask.select(1, t - 1).to_kind(Kind::Int64).to_device(Device::Cpu))?;
    if let Some(row) = last.iter().position(|&m| m == 0) {
        return Err(GenerateError::NotLeftPadded { row });
    }
    Ok((b, t))
}

/// Host copies of the generated rows, each cut after its first EOS.
fn collect_rows(tokens: &Tensor, logprobs: &Tensor, eos: &[i64]) -> Result<Generation, tch::TchError> {
    let width = tokens.size()[1] as usize;
    let flat_tokens = Vec::<i64>::try_from(tokens.to_device(Device::Cpu).reshape([-1]))?;
    let flat_logprobs = Vec::<f32>::try_from(logprobs.to_device(Device::Cpu).reshape([-1]))?;
    let mut generation = Generation { tokens: Vec::new(), logprobs: Vec::new(), finished_by_eos: Vec::new() };
    for (row_tokens, row_logprobs) in flat_tokens.chunks(width.max(1)).zip(flat_logprobs.chunks(width.max(1))) {
        let stop = row_tokens.iter().position(|id| eos.contains(id));
        let len = stop.map_or(width, |i| i + 1);
        generation.tokens.push(row_tokens[..len].to_vec());
        generation.logprobs.push(row_logprobs[..len].to_vec());
        generation.finished_by_eos.push(stop.is_some());
    }
    Ok(generation)
}

/// Chooses the next token of every row from its logits `[b, vocab]`.
pub(crate) struct Sampler {
    greedy: bool,
    temperature: f64,
    top_k: i64,
    top_p: f64,
    /// `[b, 1]` per-row stream keys derived from the seed.
    row_keys: Tensor,
}

impl Sampler {
    fn new(params: &SamplingParams, batch: i64, device: Device) -> Self {
        let rows = Tensor::arange(batch, (Kind::Int64, device)).unsqueeze(1);
        Self::with_keys(params, row_keys(params.seed, &rows))
    }

    /// A sampler whose rows draw from the given streams ([`row_keys`]).
    pub(crate) fn with_keys(params: &SamplingParams, row_keys: Tensor) -> Self {
        Sampler {
            greedy: params.greedy,
            temperature: params.temperature,
            top_k: params.top_k as i64,
            top_p: params.top_p,
            row_keys,
        }
    }

    fn choose(&self, logits: &Tensor, step: i64) -> Tensor {
        if self.greedy {
            return logits.argmax(-1, false);
        }
        invert_cdf(&self.cdf(logits), &self.uniforms(step)).squeeze_dim(1)
    }

    /// One uniform number per row for decode step `step`: `[b, 1]` f64, strictly inside (0, 1).
    fn uniforms(&self, step: i64) -> Tensor {
        stream_uniforms(&(&self.row_keys + step.wrapping_mul(STEP_STRIDE)))
    }

    /// The next token of every row, row r at its own decode step `steps[r]` (`[b, 1]` i64): the
    /// token [`Sampler::choose`] would draw for that row at that step.
    pub(crate) fn choose_rows(&self, logits: &Tensor, steps: &Tensor) -> Tensor {
        if self.greedy {
            return logits.argmax(-1, false);
        }
        let u = stream_uniforms(&(&self.row_keys + steps * STEP_STRIDE));
        invert_cdf(&self.cdf(logits), &u).squeeze_dim(1)
    }

    /// Each row's cumulative distribution `[b, vocab]` (f64) over the tokens the filters keep.
    fn cdf(&self, logits: &Tensor) -> Tensor {
        let filtered = filter_logits(&(logits / self.temperature), self.top_k, self.top_p);
        filtered.to_kind(Kind::Double).softmax(-1, Kind::Double).cumsum(-1, Kind::Double)
    }
}

/// The random stream key of each row `[b, 1]` (row indices `rows`, `[b, 1]` i64) under `seed`.
pub(crate) fn row_keys(seed: u64, rows: &Tensor) -> Tensor {
    splitmix64(&(rows * ROW_STRIDE + seed as i64))
}

/// One uniform number per row strictly inside (0, 1), `[b, 1]` f64, for stream positions
/// `keys + step * STEP_STRIDE`.
fn stream_uniforms(positions: &Tensor) -> Tensor {
    unit_interval(&splitmix64(&splitmix64(positions)))
}

/// Inverse-CDF sampling: for cumulative distributions `cdf` `[b, vocab]` and uniforms `u`
/// `[b, n]` in (0, 1), the first token whose cumulative mass reaches `u * total` (`[b, n]`
/// token ids). A token with zero probability adds zero width, so it is never chosen unless no
/// token before it has mass (impossible: the most likely token is always kept and has mass).
/// The index is clamped to the vocabulary, so a non-finite row cannot index past it.
fn invert_cdf(cdf: &Tensor, u: &Tensor) -> Tensor {
    let vocab = cdf.size()[1];
    let total = cdf.narrow(1, vocab - 1, 1); // [b, 1]
    let target = u * total;
    target.searchsorted(cdf, false, false, "left", None::<Tensor>).clamp_max(vocab - 1)
}

const ROW_STRIDE: i64 = 0x632B_E59B_D9B4_E019;
const STEP_STRIDE: i64 = 0x1F83_D9AB_FB41_BD6B;

/// Masks (to -inf) tokens outside the top `k` (if k > 0) and outside the smallest set of most
/// likely tokens whose probability reaches `top_p` (if top_p < 1). `logits` `[b, vocab]` are
/// already divided by the temperature; the most likely token is always kept.
pub fn filter_logits(logits: &Tensor, top_k: i64, top_p: f64) -> Tensor {
    let vocab = logits.size()[1];
    let mut out = logits.shallow_clone();
    if top_k > 0 && top_k < vocab {
        let kth = out.topk(top_k, -1, true, true).0.narrow(1, top_k - 1, 1); // [b, 1]
        out = out.masked_fill(&out.lt_tensor(&kth), f64::NEG_INFINITY);
    }
    if top_p < 1.0 {
        let (sorted, order) = out.sort(-1, true);
        let probs = sorted.softmax(-1, Kind::Float);
        let mass_before = probs.cumsum(-1, Kind::Float) - &probs;
        let drop_sorted = mass_before.ge(top_p);
        let drop = drop_sorted.scatter(1, &order, &drop_sorted);
        out = out.masked_fill(&drop, f64::NEG_INFINITY);
    }
    out
}

/// Logical right shift of i64 lanes (torch's shift is arithmetic on signed integers).
fn shr(x: &Tensor, bits: i64) -> Tensor {
    x.bitwise_right_shift_tensor_scalar(bits).bitwise_and((1i64 << (64 - bits)) - 1)
}

/// SplitMix64's finaliser on every i64 lane (wrapping arithmetic): a counter-based generator
/// whose outputs for distinct inputs are independent-looking 64-bit words.
fn splitmix64(x: &Tensor) -> Tensor {
    let z = x + 0x9E37_79B9_7F4A_7C15u64 as i64;
    let z = z.bitwise_xor_tensor(&shr(&z, 30)) * 0xBF58_476D_1CE4_E5B9u64 as i64;
    let z = z.bitwise_xor_tensor(&shr(&z, 27)) * 0x94D0_49BB_1331_11EBu64 as i64;
    z.bitwise_xor_tensor(&shr(&z, 31))
}

/// Maps hashed 64-bit words to f64 uniforms strictly inside (0, 1): the top 52 bits k give
/// (k + 0.5) / 2^52, which f64 holds exactly (k + 0.5 needs 53 significant bits), so the values
/// run from 2^-53 to 1 - 2^-53 and never round to 0 or 1.
fn unit_interval(words: &Tensor) -> Tensor {
    (shr(words, 12).to_kind(Kind::Double) + 0.5) / (1u64 << 52) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(seed: u64) -> SamplingParams {
        SamplingParams { max_new_tokens: 4, seed, ..Default::default() }
    }

    #[test]
    fn sampling_draws_the_softmax_and_fresh_numbers_each_step() {
        let rows = 20_000;
        let probs = [0.6f32, 0.3, 0.1];
        let logits = Tensor::from_slice(&probs).log().unsqueeze(0).expand([rows, 3], true);
        let sampler = Sampler::new(&params(11), rows, Device::Cpu);
        let picks = sampler.choose(&logits, 0).bincount(None::<Tensor>, 3).to_kind(Kind::Double) / rows as f64;
        let freq = Vec::<f64>::try_from(&picks).unwrap_or_default();
        for (f, p) in freq.iter().zip(probs) {
            assert!((f - p as f64).abs() < 0.015, "frequencies {freq:?} vs {probs:?}");
        }
        let other_step = sampler.choose(&logits, 1);
        assert!(!sampler.choose(&logits, 0).equal(&other_step), "steps must draw fresh numbers");
    }

    /// The uniforms never reach 0 or 1, for the extreme hash words and over 2^22 draws (more
    /// than a Llama-3 vocabulary's worth of lanes 32 times over).
    #[test]
    fn uniforms_stay_strictly_inside_the_unit_interval() {
        let extremes = Tensor::from_slice(&[0i64, -1, i64::MAX, i64::MIN, 1 << 12, -(1 << 12)]);
        let u = Vec::<f64>::try_from(unit_interval(&extremes)).unwrap();
        assert!(u.iter().all(|&x| x > 0.0 && x < 1.0), "{u:?}");
        assert_eq!(u[0], 0.5 / (1u64 << 52) as f64);
        assert_eq!(u[1], 1.0 - 0.5 / (1u64 << 52) as f64);
        let sampler = Sampler::new(&params(3), 1 << 22, Device::Cpu);
        for step in [0, 1, 1 << 40] {
            let u = sampler.uniforms(step);
            assert!(bool::try_from(u.gt(0.0).all()).unwrap() && bool::try_from(u.lt(1.0).all()).unwrap());
            assert!(bool::try_from(u.isfinite().all()).unwrap());
            let mean = u.mean(Kind::Double).double_value(&[]);
            assert!((mean - 0.5).abs() < 1e-3, "mean of 2^22 uniforms {mean}");
        }
    }

    /// A fixed logit vector over Llama-3's 128,256 tokens: ten likely tokens and a long tail.
    fn llama3_logits() -> Tensor {
        let vocab = 128_256;
        let words = splitmix64(&Tensor::arange(vocab, (Kind::Int64, Device::Cpu)));
        let tail = unit_interval(&words).to_kind(Kind::Float) * 8.0;
        let head = Tensor::from_slice(&[15.0f32, 14.5, 14.0, 13.5, 13.0, 12.5, 12.0, 11.0, 10.0, 9.0]);
        tail.narrow(0, 0, 10).copy_(&head);
        tail.unsqueeze(0) // [1, vocab]
    }

    /// Draws `n` tokens for one row of logits with the sampler's own CDF and uniforms (one
    /// uniform per sampler row, all inverted against the same row).
    fn draw_many(sampling: &SamplingParams, logits: &Tensor, n: i64) -> Tensor {
        let sampler = Sampler::new(sampling, n, Device::Cpu);
        let cdf = sampler.cdf(logits); // [1, vocab]
        invert_cdf(&cdf, &sampler.uniforms(0).view([1, n])).view([n])
    }

    /// Pearson's chi-square of `counts` against `probs` over bins of at least `min_expected`
    /// expected draws (tokens sorted by probability, the tail pooled), against the
    /// Wilson-Hilferty approximation of the chi-square quantile at p = 1e-6 (z = 4.75).
    fn chi_square_passes(counts: &Tensor, probs: &Tensor, draws: f64, min_expected: f64) -> (f64, f64) {
        let (sorted, order) = probs.sort(0, true);
        let expected = Vec::<f64>::try_from(sorted * draws).unwrap();
        let observed = Vec::<f64>::try_from(counts.to_kind(Kind::Double).index_select(0, &order)).unwrap();
        let (mut bins, mut e_acc, mut o_acc) = (Vec::new(), 0.0, 0.0);
        for (e, o) in expected.iter().zip(&observed) {
            e_acc += e;
            o_acc += o;
            if e_acc >= min_expected {
                bins.push((e_acc, o_acc));
                (e_acc, o_acc) = (0.0, 0.0);
            }
        }
        if let Some(last) = bins.last_mut() {
            last.0 += e_acc;
            last.1 += o_acc;
        }
        let stat: f64 = bins.iter().map(|(e, o)| (o - e).powi(2) / e).sum();
        let k = (bins.len() - 1) as f64;
        let quantile = k * (1.0 - 2.0 / (9.0 * k) + 4.75 * (2.0 / (9.0 * k)).sqrt()).powi(3);
        (stat, quantile)
    }

    #[test]
    fn a_million_draws_at_a_llama3_vocabulary_follow_the_softmax() {
        let logits = llama3_logits();
        let n = 1_000_000;
        let sampling = params(5);
        let tokens = draw_many(&sampling, &logits, n);
        let counts = tokens.bincount(None::<Tensor>, 128_256);
        let probs = logits.squeeze_dim(0).to_kind(Kind::Double).softmax(0, Kind::Double);
        let (stat, quantile) = chi_square_passes(&counts, &probs, n as f64, 2_000.0);
        assert!(stat < quantile, "chi-square {stat:.1} above its 1e-6 quantile {quantile:.1}");
        // A sampler that replaced even 0.5% of draws with uniformly random tokens fails it.
        let noise = Tensor::arange(5_000, (Kind::Int64, Device::Cpu)) * 25;
        let corrupted = Tensor::cat(&[tokens.narrow(0, 5_000, n - 5_000), noise], 0).bincount(None::<Tensor>, 128_256);
        let (bad, _) = chi_square_passes(&corrupted, &probs, n as f64, 2_000.0);
        assert!(bad > quantile, "the test must catch injected tokens: {bad:.1} vs {quantile:.1}");
    }

    #[test]
    fn filtered_tokens_never_appear_in_a_million_draws() {
        let logits = llama3_logits();
        let n = 1_000_000;
        for (top_k, top_p) in [(50, 1.0), (0, 0.9), (1_000, 0.95)] {
            let sampling = SamplingParams { top_k, top_p, ..params(8) };
            let tokens = draw_many(&sampling, &logits, n);
            let kept = filter_logits(&logits, top_k as i64, top_p).squeeze_dim(0);
            let drawn_filtered = kept.index_select(0, &tokens).isinf().sum(Kind::Int64).int64_value(&[]);
            assert_eq!(drawn_filtered, 0, "top_k {top_k}, top_p {top_p}: filtered tokens drawn");
            let probs = kept.to_kind(Kind::Double).softmax(0, Kind::Double);
            let counts = tokens.bincount(None::<Tensor>, 128_256);
            let (stat, quantile) = chi_square_passes(&counts, &probs, n as f64, 2_000.0);
            assert!(stat < quantile, "top_k {top_k}, top_p {top_p}: chi-square {stat:.1} above {quantile:.1}");
        }
    }

    #[test]
    fn filter_keeps_top_k_and_nucleus() {
        let logits = Tensor::from_slice(&[0.5f32, 0.1, 0.25, 0.15]).log().unsqueeze(0);
        let kept = |t: Tensor| Vec::<bool>::try_from(t.isfinite().squeeze_dim(0)).unwrap_or_default();
        assert_eq!(kept(filter_logits(&logits, 2, 1.0)), [true, false, true, false]);
        assert_eq!(kept(filter_logits(&logits, 0, 0.7)), [true, false, true, false]);
        assert_eq!(kept(filter_logits(&logits, 0, 0.75)), [true, false, true, false]);
        assert_eq!(kept(filter_logits(&logits, 0, 0.76)), [true, false, true, true]);
        assert_eq!(kept(filter_logits(&logits, 0, 0.01)), [true, false, false, false]);
        assert_eq!(kept(filter_logits(&logits, 0, 1.0)), [true; 4]);
    }

    #[test]
    fn left_pad_and_collect_rows() {
        let (ids, mask) = left_pad(&[vec![5, 6, 7], vec![8]], 0, Device::Cpu).unwrap();
        assert_eq!(Vec::<i64>::try_from(ids.reshape([-1])).unwrap(), [5, 6, 7, 0, 0, 8]);
        assert_eq!(Vec::<i64>::try_from(mask.reshape([-1])).unwrap(), [1, 1, 1, 0, 0, 1]);
        assert!(matches!(left_pad(&[vec![1], vec![]], 0, Device::Cpu), Err(GenerateError::EmptyPrompt { row: 1 })));
        let tokens = Tensor::from_slice(&[4i64, 2, 9, 3, 3, 3]).view([2, 3]);
        let logprobs = Tensor::from_slice(&[-1f32, -2., -3., -4., -5., -6.]).view([2, 3]);
        let g = collect_rows(&tokens, &logprobs, &[2]).unwrap();
        assert_eq!(g.tokens, vec![vec![4, 2], vec![3, 3, 3]]);
        assert_eq!(g.logprobs, vec![vec![-1., -2.], vec![-4., -5., -6.]]);
        assert_eq!(g.finished_by_eos, vec![true, false]);
    }

    /// A group's rows continue one prefill of their prompt and sample what the prompt repeated in
    /// place would: same tokens, log-probs within float noise, for ragged prompts and EOS.
    #[test]
    fn one_prefill_per_group_samples_what_repeated_prompts_sample() {
        tch::manual_seed(11);
        let vs = tch::nn::VarStore::new(Device::Cpu);
        let model = Llama::new(&vs.root(), &crate::llama::LlamaConfig::tiny(40, 32, 64, 2, 4, 2));
        let prompts = vec![vec![3, 9, 4, 7, 1], vec![8, 2], vec![5, 5, 6]];
        let (ids, mask) = left_pad(&prompts, 0, Device::Cpu).unwrap();
        let embeds = model.embed_tokens(&ids);
        let g = 4;
        let repeat = |t: &Tensor| t.repeat_interleave_self_int(g, 0, None::<i64>);
        for params in [
            SamplingParams { max_new_tokens: 12, seed: 5, eos_token_ids: vec![7], ..Default::default() },
            SamplingParams { max_new_tokens: 6, seed: 9, top_k: 5, top_p: 0.8, ..Default::default() },
            SamplingParams { max_new_tokens: 6, greedy: true, ..Default::default() },
        ] {
            let grouped = generate_groups_from_embeds(&model, &embeds, &mask, g, &params).unwrap();
            let repeated = generate_from_embeds(&model, &repeat(&embeds), &repeat(&mask), &params).unwrap();
            assert_eq!(grouped.tokens.len(), 12);
            assert_eq!(grouped.tokens, repeated.tokens, "{params:?}");
            assert_eq!(grouped.finished_by_eos, repeated.finished_by_eos);
            for (a, b) in grouped.logprobs.iter().flatten().zip(repeated.logprobs.iter().flatten()) {
                assert!((a - b).abs() < 1e-5, "log-probs {a} vs {b}");
            }
        }
        let distinct: std::collections::HashSet<_> = generate_groups_from_embeds(&model, &embeds, &mask, g, &params(3))
            .unwrap()
            .tokens
            .into_iter()
            .take(g as usize)
            .collect();
        assert!(distinct.len() > 1, "a group's rows draw their own tokens");
        assert!(generate_groups_from_embeds(&model, &embeds, &mask, 0, &params(0)).is_err());
    }

    #[test]
    fn rejects_bad_params() {
        assert!(SamplingParams { temperature: 0.0, ..params(0) }.validate().is_err());
        assert!(SamplingParams { top_p: 1.5, ..params(0) }.validate().is_err());
        assert!(params(0).validate().is_ok());
    }
}
