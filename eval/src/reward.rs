//! The rewards GRPO optimises: Jaccard over the answer sets of a completion and its reference,
//! and the format reward; total = w_jaccard * jaccard + w_format * format.
//!
//! Jaccard = |P ∩ T| / |P ∪ T| over the distinct resolved items (unknown names included, so a
//! made-up name lowers the score); 0 when the union is empty (so a correct "none" earns 0, as
//! the specification says) and 0 when either side has no answer tag. Never panics on any input.

use crate::answer::{is_well_formatted, ParsedAnswer};
use crate::vocabulary::DiseaseVocabulary;
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;

/// Weights of the two reward terms (the specification's default: 1 and 1).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RewardWeights {
    pub jaccard: f64,
    pub format: f64,
}

impl Default for RewardWeights {
    fn default() -> Self {
        RewardWeights { jaccard: 1.0, format: 1.0 }
    }
}

/// The reward of one completion, term by term.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize)]
pub struct RewardBreakdown {
    /// Jaccard over answer sets, in [0, 1].
    pub jaccard: f64,
    /// 1 when well formatted, else 0.
    pub format: f64,
    /// weights.jaccard * jaccard + weights.format * format.
    pub total: f64,
}

/// |a ∩ b| / |a ∪ b|, 0 when both are empty.
pub fn set_jaccard<T: Ord>(a: &BTreeSet<T>, b: &BTreeSet<T>) -> f64 {
    let intersection = a.intersection(b).count();
    let union = a.len() + b.len() - intersection;
    if union == 0 {
        0.0
    } else {
        intersection as f64 / union as f64
    }
}

/// The Jaccard reward of a parsed completion against a parsed reference (`None`: no answer tag).
pub fn jaccard_reward(completion: Option<&ParsedAnswer>, reference: Option<&ParsedAnswer>) -> f64 {
    match (completion, reference) {
        (Some(predicted), Some(truth)) => set_jaccard(&predicted.items, &truth.items),
        _ => 0.0,
    }
}

/// 1 when the completion is `<think>…</think><answer>…</answer>` (see [`is_well_formatted`]).
pub fn format_reward(completion: &str) -> f64 {
    if is_well_formatted(completion) {
        1.0
    } else {
        0.0
    }
}

/// The reward for disease-level answers: a vocabulary and the term weights.
#[derive(Debug, Clone)]
pub struct DiagnosisReward {
    vocabulary: DiseaseVocabulary,
    weights: RewardWeights,
}

impl DiagnosisReward {
    pub fn new(vocabulary: DiseaseVocabulary, weights: RewardWeights) -> Self {
        DiagnosisReward { vocabulary, weights }
    }

    pub fn vocabulary(&self) -> &DiseaseVocabulary {
        &self.vocabulary
    }

    pub fn weights(&self) -> RewardWeights {
        self.weights
    }

    /// Parse a reference once to score a whole group against it.
    pub fn parse(&self, text: &str) -> Option<ParsedAnswer> {
        ParsedAnswer::from_completion(text, &self.vocabulary)
    }

    /// Score a completion against a reference completion (both raw text).
    pub fn score(&self, completion: &str, reference: &str) -> RewardBreakdown {
        self.score_parsed(completion, self.parse(reference).as_ref())
    }

    /// Score a completion against an already parsed reference answer.
    pub fn score_parsed(&self, completion: &str, reference: Option<&ParsedAnswer>) -> RewardBreakdown {
        let jaccard = jaccard_reward(self.parse(completion).as_ref(), reference);
        let format = format_reward(completion);
        self.combine(jaccard, format)
    }

    fn combine(&self, jaccard: f64, format: f64) -> RewardBreakdown {
        let total = self.weights.jaccard * jaccard + self.weights.format * format;
        RewardBreakdown { jaccard, format, total }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vocabulary::NameMatching;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn reward(matching: NameMatching) -> DiagnosisReward {
        DiagnosisReward::new(DiseaseVocabulary::paper_default(matching), RewardWeights::default())
    }

    const REFERENCE: &str = "<think>r</think><answer> pneumonia; sepsis; hypertension </answer>";

    #[test]
    fn jaccard_is_intersection_over_union_of_answer_sets() {
        let r = reward(NameMatching::Synonyms);
        // P = {pneumonia, sepsis, gout}, T = {pneumonia, sepsis, hypertension}: 2 / 4.
        let got = r.score("<think>t</think><answer>Pneumonia; septicemia; gout</answer>", REFERENCE);
        assert_eq!(got, RewardBreakdown { jaccard: 0.5, format: 1.0, total: 1.5 });
        // Exact mode: "Pneumonia", "septicemia", "gout" are all unknown strings: 0 / 6.
        let exact = reward(NameMatching::Exact)
            .score("<think>t</think><answer>Pneumonia; septicemia; gout</answer>", REFERENCE);
        assert_eq!(exact.jaccard, 0.0);
        let exact = reward(NameMatching::Exact).score("<think>t</think><answer>pneumonia;x</answer>", REFERENCE);
        // {pneumonia, x} vs {pneumonia, sepsis, hypertension}: 1 / 4.
        assert_eq!(exact.jaccard, 0.25);
    }

    #[test]
    fn missing_tag_or_empty_union_gives_zero() {
        let r = reward(NameMatching::Synonyms);
        assert_eq!(r.score("pneumonia; sepsis", REFERENCE).jaccard, 0.0);
        assert_eq!(r.score("<answer>pneumonia</answer>", "no tag").jaccard, 0.0);
        let none = "<think>t</think><answer> none </answer>";
        assert_eq!(r.score(none, none), RewardBreakdown { jaccard: 0.0, format: 1.0, total: 1.0 });
        // Exact mode keeps "none" as a string, like the reference: {none} vs {none} = 1.
        assert_eq!(reward(NameMatching::Exact).score(none, none).jaccard, 1.0);
    }

    #[test]
    fn weights_scale_the_terms() {
        let r = DiagnosisReward::new(
            DiseaseVocabulary::paper_default(NameMatching::Synonyms),
            RewardWeights { jaccard: 2.0, format: 0.5 },
        );
        let got = r.score("<answer>pneumonia</answer>", REFERENCE);
        // jaccard 1/3, format 0 (no think block): total = 2 * 1/3.
        assert_eq!(got.format, 0.0);
        assert!((got.total - 2.0 / 3.0).abs() < 1e-15);
    }

    fn garbage(rng: &mut ChaCha8Rng) -> String {
        const PIECES: &[&str] = &[
            "<think>",
            "</think>",
            "<answer>",
            "</answer>",
            "<answer",
            "</",
            ";",
            " ",
            "\n",
            "\t",
            "none",
            "pneumonia",
            "AKI",
            "é",
            "∩",
            "\u{0}",
            "\u{feff}",
            "\u{2028}",
            "🩺",
            "İ",
            ".",
            "<",
            ">",
        ];
        let len = rng.random_range(0..40);
        (0..len)
            .map(|_| {
                if rng.random_bool(0.2) {
                    // Arbitrary scalar values, including surrogate-adjacent and private-use ones.
                    char::from_u32(rng.random_range(0..0x11_0000)).unwrap_or('\u{fffd}').to_string()
                } else {
                    PIECES[rng.random_range(0..PIECES.len())].to_string()
                }
            })
            .collect()
    }

    #[test]
    fn rewards_never_panic_and_stay_in_range_on_garbage() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        for matching in [NameMatching::Synonyms, NameMatching::Exact] {
            let r = reward(matching);
            for _ in 0..3000 {
                let (completion, reference) = (garbage(&mut rng), garbage(&mut rng));
                let got = r.score(&completion, &reference);
                assert!((0.0..=1.0).contains(&got.jaccard), "{completion:?} {reference:?}");
                assert!(got.format == 0.0 || got.format == 1.0);
                assert_eq!(got.total, got.jaccard + got.format);
                // A completion scored against itself: 1 whenever its answer has an item.
                let own = r.score(&completion, &completion).jaccard;
                let nonempty = r.parse(&completion).is_some_and(|a| !a.items.is_empty());
                assert_eq!(own, if nonempty { 1.0 } else { 0.0 }, "{completion:?}");
            }
        }
    }
}
