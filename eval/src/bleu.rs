//! Corpus BLEU-4, computed exactly as `nltk.translate.bleu_score.corpus_bleu` with its defaults
//! (weights 0.25 x 4, no smoothing, i.e. `SmoothingFunction().method0`), one reference per
//! hypothesis, over tokens from lowercasing and splitting on whitespace.
//!
//! Per n = 1..4 the clipped n-gram matches and the hypothesis n-gram counts are summed over the
//! corpus (each hypothesis adds at least 1 to the denominator, as nltk's `max(1, …)` does); then
//! BLEU = BP * exp(sum_n 0.25 * ln p_n), with BP = 1 if c > r, 0 if c = 0, else exp(1 - r / c)
//! over total hypothesis length c and reference length r. If no unigram matches anywhere BLEU is
//! 0; an order with zero matches uses p_n = f64::MIN_POSITIVE (Python's `sys.float_info.min`),
//! which makes the score tiny but, as in nltk, not exactly 0.
//!
//! We chose the corpus-level score (the metric papers report) over a smoothed sentence average.
//! Tokenisation note: Rust's `split_whitespace` and Python's `str.split` differ only on the
//! control characters U+001C..U+001F, which Python also treats as separators.

use serde::Serialize;
use std::collections::HashMap;

/// The n-gram orders BLEU-4 uses.
pub const BLEU_ORDER: usize = 4;

/// Lowercase and split on whitespace.
pub fn bleu_tokens(text: &str) -> Vec<String> {
    text.to_lowercase().split_whitespace().map(str::to_string).collect()
}

/// Summed BLEU statistics over a corpus; add pairs, then read [`BleuTally::score`].
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct BleuTally {
    /// Clipped n-gram matches per order (index 0 = unigrams).
    pub matches: [u64; BLEU_ORDER],
    /// Hypothesis n-gram counts per order, at least 1 per hypothesis.
    pub totals: [u64; BLEU_ORDER],
    pub hypothesis_length: u64,
    pub reference_length: u64,
}

impl BleuTally {
    /// Add one hypothesis with its single reference (both raw text).
    pub fn add(&mut self, hypothesis: &str, reference: &str) {
        let (hyp, reference) = (bleu_tokens(hypothesis), bleu_tokens(reference));
        for n in 1..=BLEU_ORDER {
            let (matched, total) = clipped_matches(&hyp, &reference, n);
            self.matches[n - 1] += matched;
            self.totals[n - 1] += total.max(1);
        }
        self.hypothesis_length += hyp.len() as u64;
        self.reference_length += reference.len() as u64;
    }

    /// Brevity penalty over the summed lengths.
    pub fn brevity_penalty(&self) -> f64 {
        let (c, r) = (self.hypothesis_length, self.reference_length);
        if c > r {
            1.0
        } else if c == 0 {
            0.0
        } else {
            (1.0 - r as f64 / c as f64).exp()
        }
    }

    /// The modified n-gram precisions p_1..p_4 (matches / totals; 0 with no hypotheses).
    pub fn precisions(&self) -> [f64; BLEU_ORDER] {
        std::array::from_fn(|i| if self.totals[i] == 0 { 0.0 } else { self.matches[i] as f64 / self.totals[i] as f64 })
    }

    /// Corpus BLEU-4 in [0, 1].
    pub fn score(&self) -> f64 {
        if self.matches[0] == 0 {
            return 0.0;
        }
        let log_sum: f64 = (0..BLEU_ORDER)
            .map(|i| {
                let p = if self.matches[i] == 0 {
                    f64::MIN_POSITIVE
                } else {
                    self.matches[i] as f64 / self.totals[i] as f64
                };
                0.25 * p.ln()
            })
            .sum();
        self.brevity_penalty() * log_sum.exp()
    }
}

/// (matches clipped by the reference's counts, number of hypothesis n-grams).
fn clipped_matches(hypothesis: &[String], reference: &[String], n: usize) -> (u64, u64) {
    let hyp_counts = ngram_counts(hypothesis, n);
    let ref_counts = ngram_counts(reference, n);
    let matched = hyp_counts.iter().map(|(gram, &count)| count.min(ref_counts.get(gram).copied().unwrap_or(0))).sum();
    (matched, hyp_counts.values().sum())
}

fn ngram_counts(tokens: &[String], n: usize) -> HashMap<&[String], u64> {
    let mut counts = HashMap::new();
    if tokens.len() >= n {
        for gram in tokens.windows(n) {
            *counts.entry(gram).or_insert(0) += 1;
        }
    }
    counts
}

#[cfg(test)]
mod tests {
    use super::*;

    fn corpus(pairs: &[(&str, &str)]) -> BleuTally {
        let mut tally = BleuTally::default();
        pairs.iter().for_each(|(h, r)| tally.add(h, r));
        tally
    }

    #[test]
    fn identical_text_scores_one_regardless_of_case() {
        assert_eq!(corpus(&[("The ECG is normal today", "the ecg is NORMAL today")]).score(), 1.0);
    }

    #[test]
    fn hand_computed_clipping_and_brevity() {
        // hyp "the the the the" vs ref "the cat is here": unigram matches clipped to 1 of 4.
        let tally = corpus(&[("the the the the", "the cat is here")]);
        assert_eq!(tally.matches, [1, 0, 0, 0]);
        assert_eq!(tally.totals, [4, 3, 2, 1]);
        // Equal lengths: BP = exp(0) = 1. Zero higher-order matches use MIN_POSITIVE.
        let expected = (0.25 * 0.25f64.ln() + 0.75 * f64::MIN_POSITIVE.ln()).exp();
        assert!((tally.score() / expected - 1.0).abs() < 1e-12, "{} vs {expected}", tally.score());
        assert!(tally.score() > 0.0 && tally.score() < 1e-150);
    }

    #[test]
    fn short_hypothesis_is_penalised() {
        // hyp "a b c d" (4) vs ref "a b c d e f g h" (8): all precisions 1, BP = exp(1 - 8/4).
        let tally = corpus(&[("a b c d", "a b c d e f g h")]);
        assert!((tally.score() - (-1.0f64).exp()).abs() < 1e-15);
    }

    #[test]
    fn no_unigram_match_and_empty_corpus_score_zero() {
        assert_eq!(corpus(&[("x y", "a b")]).score(), 0.0);
        assert_eq!(corpus(&[]).score(), 0.0);
        assert_eq!(corpus(&[("", "a b")]).brevity_penalty(), 0.0);
    }
}
