//! Teacher-forced scoring of completions for the learner: one differentiable forward over
//! prompt + completion, returning each completion token's `log_softmax(logits / T)` — the same
//! quantity `generate` reports, so old and new policy log-probs are comparable in GRPO's ratio.

use super::model::Llama;
use tch::{Kind, Tensor};

/// Log-probs `[b, tc]` of `completion_ids` `[b, tc]` (right-padded; `completion_mask` `[b, tc]`
/// 1 real / 0 pad) after left-padded prompt embeddings `[b, tp, d]` with `prompt_mask` `[b, tp]`,
/// at temperature `temperature`. Padded completion positions are 0. Differentiable with respect
/// to the model's weights and `prompt_embeds`.
///
/// Panics on inconsistent shapes or a non-positive temperature (caller bugs).
pub fn score_completions(
    model: &Llama,
    prompt_embeds: &Tensor,
    prompt_mask: &Tensor,
    completion_ids: &Tensor,
    completion_mask: &Tensor,
    temperature: f64,
) -> Tensor {
    assert!(temperature.is_finite() && temperature > 0.0, "temperature must be finite and > 0, got {temperature}");
    let (b, tp) = (prompt_embeds.size()[0], prompt_embeds.size()[1]);
    let tc = completion_ids.size()[1];
    assert!(
        completion_ids.size() == [b, tc] && completion_mask.size() == [b, tc] && prompt_mask.size() == [b, tp],
        "score_completions: shapes disagree: prompt_embeds {:?}, prompt_mask {:?}, completion_ids {:?}, completion_mask {:?}",
        prompt_embeds.size(),
        prompt_mask.size(),
        completion_ids.size(),
        completion_mask.size()
    );
    let completion_embeds = model.embed_tokens(completion_ids).to_kind(prompt_embeds.kind()); // [b, tc, d]
    let embeds = Tensor::cat(&[prompt_embeds, &completion_embeds], 1); // [b, tp + tc, d]
    let mask = Tensor::cat(&[prompt_mask.to_kind(Kind::Int64), completion_mask.to_kind(Kind::Int64)], 1);
    let hidden = model.forward_hidden(&embeds, &mask, None);
    // The state at position i predicts token i + 1: completion token j comes from tp - 1 + j.
    let logits = model.logits(&hidden.narrow(1, tp - 1, tc)) / temperature; // [b, tc, vocab]
    let logprobs = logits.log_softmax(-1, Kind::Float).gather(2, &completion_ids.unsqueeze(2), false).squeeze_dim(2);
    logprobs * completion_mask.to_kind(Kind::Float)
}

/// `score_completions` for left-padded prompt ids `[b, tp]` with `prompt_mask` `[b, tp]`.
pub fn score_ids(
    model: &Llama,
    prompt_ids: &Tensor,
    prompt_mask: &Tensor,
    completion_ids: &Tensor,
    completion_mask: &Tensor,
    temperature: f64,
) -> Tensor {
    score_completions(model, &model.embed_tokens(prompt_ids), prompt_mask, completion_ids, completion_mask, temperature)
}
