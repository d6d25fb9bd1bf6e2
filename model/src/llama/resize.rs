//! Growing the vocabulary of a stored decoder: the rows of `model.embed_tokens.weight` (and of an
//! untied `lm_head.weight`) for tokens added to the tokenizer, e.g. MedTVT's `<ecg>`, `<cxr>`,
//! `<lab>` on a base whose tokenizer already fills its vocabulary (Llama-3.2: 128,256 ids).
//!
//! Initialisation as transformers' `resize_token_embeddings` by default (`mean_resizing=True`,
//! checked in transformers 5.24 `modeling_utils.py`, `_init_added_embeddings_weights_with_mean`):
//! the old rows' mean `mu` and covariance `S` are computed in f32 over all stored rows, and each
//! new row is drawn from N(mu, 1e-9 * S) when that covariance is positive definite, else set to
//! `mu`. We set every new row to `mu`, the distribution's mean: the noise of transformers' draw
//! has a standard deviation of sqrt(1e-9) = 3.2e-5 times the rows' own per coordinate (measured on
//! the ChatML test fixture: at most 1.3e-4 of it over 3 new rows), below bf16's resolution, and
//! the exact mean needs no random draw, so every rank and every restart builds bit-identical
//! rows. The same rule applies to an untied `lm_head` (transformers'
//! `_init_added_lm_head_weights_with_mean`).

use tch::{Kind, Tensor};

/// The tensors whose first dimension is the vocabulary.
pub const VOCAB_TENSORS: [&str; 2] = ["model.embed_tokens.weight", "lm_head.weight"];

/// `stored` `[old, d]` grown to `[rows, d]`: the stored rows first, then `rows - old` copies of
/// their mean (computed in f32, returned in `stored`'s kind). `rows` must be at least `old`.
pub fn grow_rows_with_mean(stored: &Tensor, rows: i64) -> Tensor {
    let size = stored.size();
    let (old, d) = (size[0], size[1]);
    assert!(rows >= old, "growing {old} rows to {rows}: the vocabulary only grows");
    if rows == old {
        return stored.shallow_clone();
    }
    let mean = stored.to_kind(Kind::Float).mean_dim(0, true, Kind::Float); // [1, d]
    let added = mean.expand([rows - old, d], false).to_kind(stored.kind()); // [rows - old, d]
    Tensor::cat(&[stored.shallow_clone(), added], 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_rows_are_the_mean_of_the_stored_ones() {
        let stored = Tensor::from_slice(&[1.0f32, 2.0, 3.0, 6.0, 5.0, 10.0]).view([3, 2]);
        let grown = grow_rows_with_mean(&stored, 5);
        assert_eq!(grown.size(), vec![5, 2]);
        let values: Vec<f32> = Vec::try_from(grown.view([-1])).unwrap();
        assert_eq!(values, vec![1.0, 2.0, 3.0, 6.0, 5.0, 10.0, 3.0, 6.0, 3.0, 6.0]);
        let bf16 = grow_rows_with_mean(&stored.to_kind(Kind::BFloat16), 4);
        assert_eq!(bf16.kind(), Kind::BFloat16);
        assert!(grow_rows_with_mean(&stored, 3).equal(&stored));
    }
}
