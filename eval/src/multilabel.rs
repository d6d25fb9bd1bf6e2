//! Multilabel classification metrics over (predicted set, true set) pairs, defined exactly as
//! scikit-learn computes them with `labels=range(n_labels)` and `zero_division=0`:
//!
//! - per disease: precision = tp / (tp + fp), recall = tp / (tp + fn),
//!   F1 = 2 tp / (2 tp + fp + fn), each 0 when its denominator is 0; support = tp + fn;
//! - macro average: the unweighted mean of the per-disease values over *all* diseases, including
//!   those with no support (they contribute 0 recall and 0 F1, as in sklearn);
//! - micro average: the same formulas over the summed tp / fp / fn;
//! - sample-wise Jaccard (`jaccard_score(average="samples", zero_division=0)`): the mean over
//!   samples of |P ∩ T| / |P ∪ T|, where a sample with both sets empty scores 0 (zero_division=0;
//!   this matches the reward, which also gives 0 on an empty union);
//! - subset accuracy (`accuracy_score` on indicator matrices): the fraction of samples whose
//!   predicted set equals the true set exactly (two empty sets are equal and count).
//!
//! Disease ids at or beyond `n_labels` are ignored, as sklearn ignores columns outside `labels`.

use crate::reward::set_jaccard;
use crate::vocabulary::{DiseaseId, DiseaseSet};
use serde::Serialize;

/// Confusion counts of one disease.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct LabelCounts {
    pub true_positives: u64,
    pub false_positives: u64,
    pub false_negatives: u64,
}

/// Precision, recall and F1.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize)]
pub struct PrfScores {
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
}

impl LabelCounts {
    /// P/R/F1 with zero_division = 0.
    pub fn scores(&self) -> PrfScores {
        let (tp, fp, fn_) = (self.true_positives as f64, self.false_positives as f64, self.false_negatives as f64);
        PrfScores {
            precision: ratio(tp, tp + fp),
            recall: ratio(tp, tp + fn_),
            f1: ratio(2.0 * tp, 2.0 * tp + fp + fn_),
        }
    }

    /// Samples that truly have the disease.
    pub fn support(&self) -> u64 {
        self.true_positives + self.false_negatives
    }

    fn add(&mut self, other: &LabelCounts) {
        self.true_positives += other.true_positives;
        self.false_positives += other.false_positives;
        self.false_negatives += other.false_negatives;
    }
}

fn ratio(numerator: f64, denominator: f64) -> f64 {
    if denominator == 0.0 {
        0.0
    } else {
        numerator / denominator
    }
}

/// Running counts over samples; read the metrics at any time.
#[derive(Debug, Clone)]
pub struct MultilabelTally {
    counts: Vec<LabelCounts>,
    samples: u64,
    jaccard_sum: f64,
    exact_matches: u64,
}

impl MultilabelTally {
    pub fn new(n_labels: usize) -> Self {
        MultilabelTally {
            counts: vec![LabelCounts::default(); n_labels],
            samples: 0,
            jaccard_sum: 0.0,
            exact_matches: 0,
        }
    }

    /// Count one sample.
    pub fn add(&mut self, predicted: &DiseaseSet, truth: &DiseaseSet) {
        let n_labels = self.counts.len();
        let in_range = |set: &DiseaseSet| -> DiseaseSet { set.iter().copied().filter(|id| id.0 < n_labels).collect() };
        let (predicted, truth) = (in_range(predicted), in_range(truth));
        for (index, counts) in self.counts.iter_mut().enumerate() {
            let id = DiseaseId(index);
            match (predicted.contains(&id), truth.contains(&id)) {
                (true, true) => counts.true_positives += 1,
                (true, false) => counts.false_positives += 1,
                (false, true) => counts.false_negatives += 1,
                (false, false) => {}
            }
        }
        self.samples += 1;
        self.jaccard_sum += set_jaccard(&predicted, &truth);
        self.exact_matches += u64::from(predicted == truth);
    }

    pub fn samples(&self) -> u64 {
        self.samples
    }

    pub fn label_counts(&self) -> &[LabelCounts] {
        &self.counts
    }

    /// Unweighted mean of the per-label scores (0 for an empty label list).
    pub fn macro_average(&self) -> PrfScores {
        let n = self.counts.len() as f64;
        let sum = self.counts.iter().map(LabelCounts::scores).fold(PrfScores::default(), |acc, s| PrfScores {
            precision: acc.precision + s.precision,
            recall: acc.recall + s.recall,
            f1: acc.f1 + s.f1,
        });
        PrfScores { precision: ratio(sum.precision, n), recall: ratio(sum.recall, n), f1: ratio(sum.f1, n) }
    }

    /// Scores of the counts summed over labels.
    pub fn micro_average(&self) -> PrfScores {
        let mut total = LabelCounts::default();
        self.counts.iter().for_each(|c| total.add(c));
        total.scores()
    }

    /// Mean per-sample Jaccard (0 with no samples).
    pub fn sample_jaccard(&self) -> f64 {
        ratio(self.jaccard_sum, self.samples as f64)
    }

    /// Fraction of samples predicted exactly (0 with no samples).
    pub fn subset_accuracy(&self) -> f64 {
        ratio(self.exact_matches as f64, self.samples as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(ids: &[usize]) -> DiseaseSet {
        ids.iter().map(|&i| DiseaseId(i)).collect()
    }

    #[test]
    fn hand_computed_three_label_case() {
        let mut tally = MultilabelTally::new(3);
        tally.add(&set(&[0, 1]), &set(&[0])); // label 0 tp, label 1 fp; jaccard 1/2
        tally.add(&set(&[0]), &set(&[0, 2])); // label 0 tp, label 2 fn; jaccard 1/2
        tally.add(&set(&[]), &set(&[])); //     nothing; jaccard 0 (zero_division), exact match
        tally.add(&set(&[1]), &set(&[1])); //   label 1 tp; jaccard 1, exact match
        let scores: Vec<PrfScores> = tally.label_counts().iter().map(LabelCounts::scores).collect();
        assert_eq!(scores[0], PrfScores { precision: 1.0, recall: 1.0, f1: 1.0 });
        // label 1: tp 1, fp 1, fn 0 -> P 1/2, R 1, F1 2/3.
        assert_eq!(scores[1].precision, 0.5);
        assert_eq!(scores[1].recall, 1.0);
        assert!((scores[1].f1 - 2.0 / 3.0).abs() < 1e-15);
        // label 2: tp 0, fp 0, fn 1 -> all 0 (precision's 0/0 resolved by zero_division).
        assert_eq!(scores[2], PrfScores::default());
        assert_eq!(tally.label_counts()[2].support(), 1);
        let macro_avg = tally.macro_average();
        assert!((macro_avg.precision - 0.5).abs() < 1e-15); // (1 + 1/2 + 0) / 3
        assert!((macro_avg.recall - 2.0 / 3.0).abs() < 1e-15); // (1 + 1 + 0) / 3
                                                               // micro: tp 3, fp 1, fn 1 -> P 3/4, R 3/4, F1 6/8.
        assert_eq!(tally.micro_average(), PrfScores { precision: 0.75, recall: 0.75, f1: 0.75 });
        assert_eq!(tally.sample_jaccard(), 0.5); // (1/2 + 1/2 + 0 + 1) / 4
        assert_eq!(tally.subset_accuracy(), 0.5);
    }

    #[test]
    fn ids_outside_the_label_list_are_ignored() {
        let mut tally = MultilabelTally::new(2);
        tally.add(&set(&[0, 5]), &set(&[0]));
        assert_eq!(tally.micro_average().precision, 1.0);
        assert_eq!(tally.subset_accuracy(), 1.0);
    }

    #[test]
    fn empty_tally_reports_zeros() {
        let tally = MultilabelTally::new(7);
        assert_eq!(tally.sample_jaccard(), 0.0);
        assert_eq!(tally.subset_accuracy(), 0.0);
        assert_eq!(tally.macro_average(), PrfScores::default());
    }
}
