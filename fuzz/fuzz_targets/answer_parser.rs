//! Fuzz target: the answer parser and both rewards over an arbitrary completion, scored against a
//! fixed reference and against itself, in both name-matching modes. Must never panic, and every
//! reward must stay in its documented range.
#![no_main]

use libfuzzer_sys::fuzz_target;
use medtvt_eval::vocabulary::{DiseaseVocabulary, NameMatching};
use medtvt_eval::{DiagnosisReward, RewardWeights};

fuzz_target!(|data: &[u8]| {
    let Ok(completion) = std::str::from_utf8(data) else { return };
    for matching in [NameMatching::Synonyms, NameMatching::Exact] {
        let reward = DiagnosisReward::new(DiseaseVocabulary::paper_default(matching), RewardWeights::default());
        for reference in ["<think>r</think><answer>pneumonia; sepsis</answer>", completion] {
            let r = reward.score(completion, reference);
            assert!((0.0..=1.0).contains(&r.jaccard), "jaccard {} out of range", r.jaccard);
            assert!(r.format == 0.0 || r.format == 1.0, "format {} is not 0 or 1", r.format);
        }
    }
});
