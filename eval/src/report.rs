//! The evaluation report: accumulators that take one sample at a time (disease-level completions,
//! physiological-level texts) and the [`EvalReport`] they produce, as JSON (serde) or Markdown.

use crate::answer::ParsedAnswer;
use crate::bleu::{BleuTally, BLEU_ORDER};
use crate::error::EvalError;
use crate::gates::{AnswerRecord, GateSummary};
use crate::multilabel::{LabelCounts, MultilabelTally, PrfScores};
use crate::reward::{DiagnosisReward, RewardBreakdown};
use crate::rouge::rouge_l_f;
use crate::vocabulary::DiseaseSet;
use serde::Serialize;
use std::fmt::Write;

/// One disease's row of the report.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DiseaseScores {
    pub disease: String,
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
    /// Samples that truly have the disease.
    pub support: u64,
    /// Samples predicted to have it.
    pub predicted: u64,
}

/// Disease-level results over a set of completions.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DiseaseReport {
    pub samples: u64,
    pub per_disease: Vec<DiseaseScores>,
    pub macro_avg: PrfScores,
    pub micro_avg: PrfScores,
    /// sklearn jaccard_score(average="samples", zero_division=0) over the disease list.
    pub sample_jaccard: f64,
    /// Fraction of samples whose disease set is exactly right.
    pub subset_accuracy: f64,
    /// Fraction of completions with the `<think>…</think><answer>…</answer>` format.
    pub valid_format_rate: f64,
    /// Fraction of completions with an `<answer>…</answer>` span at all.
    pub answer_tag_rate: f64,
    /// Fraction of distinct answer items that are not in the disease vocabulary.
    pub unknown_item_rate: f64,
    /// Mean reward terms (as GRPO would have scored these completions).
    pub mean_reward: RewardBreakdown,
}

/// Physiological-level text results.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TextReport {
    pub samples: u64,
    /// nltk corpus_bleu, default weights, lowercased whitespace tokens.
    pub bleu4: f64,
    /// Modified n-gram precisions p_1..p_4 behind BLEU.
    pub bleu_precisions: [f64; BLEU_ORDER],
    pub brevity_penalty: f64,
    /// Mean over samples of rouge-score's ROUGE-L F-measure (no stemming).
    pub rouge_l_f: f64,
}

/// Everything `medtvt eval` reports; a part is absent when no samples of its kind were given.
#[derive(Debug, Clone, PartialEq, Serialize, Default)]
pub struct EvalReport {
    pub disease: Option<DiseaseReport>,
    pub text: Option<TextReport>,
    /// Mean CAO gate per modality over `answers` (absent when no answer carries gates).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cao_gates: Option<GateSummary>,
    /// Every evaluated answer with its sample id and CAO gates.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub answers: Vec<AnswerRecord>,
}

/// Accumulates disease-level completions.
#[derive(Debug, Clone)]
pub struct DiseaseEvaluator {
    reward: DiagnosisReward,
    tally: MultilabelTally,
    well_formatted: u64,
    with_answer: u64,
    distinct_items: u64,
    unknown_items: u64,
    reward_sum: RewardBreakdown,
}

impl DiseaseEvaluator {
    pub fn new(reward: DiagnosisReward) -> Self {
        let tally = MultilabelTally::new(reward.vocabulary().len());
        DiseaseEvaluator {
            reward,
            tally,
            well_formatted: 0,
            with_answer: 0,
            distinct_items: 0,
            unknown_items: 0,
            reward_sum: RewardBreakdown::default(),
        }
    }

    /// Add a completion scored against a reference completion (its `<answer>` gives the truth; a
    /// reference without one counts as no disease for the metrics and 0 Jaccard reward).
    pub fn add_with_reference(&mut self, completion: &str, reference: &str) {
        let truth = self.reward.parse(reference);
        self.add_parsed(completion, truth.as_ref());
    }

    /// Add a completion scored against a ground-truth disease set.
    pub fn add_with_truth(&mut self, completion: &str, truth: &DiseaseSet) {
        self.add_parsed(completion, Some(&ParsedAnswer::from_diseases(truth)));
    }

    fn add_parsed(&mut self, completion: &str, truth: Option<&ParsedAnswer>) {
        let predicted = self.reward.parse(completion);
        let breakdown = self.reward.score_parsed(completion, truth);
        self.reward_sum.jaccard += breakdown.jaccard;
        self.reward_sum.format += breakdown.format;
        self.reward_sum.total += breakdown.total;
        self.well_formatted += u64::from(breakdown.format > 0.0);
        if let Some(answer) = &predicted {
            self.with_answer += 1;
            self.distinct_items += answer.items.len() as u64;
            self.unknown_items += answer.unknown_count() as u64;
        }
        let predicted_set = predicted.map(|a| a.diseases()).unwrap_or_default();
        let true_set = truth.map(ParsedAnswer::diseases).unwrap_or_default();
        self.tally.add(&predicted_set, &true_set);
    }

    pub fn finish(&self) -> DiseaseReport {
        let samples = self.tally.samples();
        let per_sample = |count: f64| if samples == 0 { 0.0 } else { count / samples as f64 };
        DiseaseReport {
            samples,
            per_disease: self.per_disease(),
            macro_avg: self.tally.macro_average(),
            micro_avg: self.tally.micro_average(),
            sample_jaccard: self.tally.sample_jaccard(),
            subset_accuracy: self.tally.subset_accuracy(),
            valid_format_rate: per_sample(self.well_formatted as f64),
            answer_tag_rate: per_sample(self.with_answer as f64),
            unknown_item_rate: if self.distinct_items == 0 {
                0.0
            } else {
                self.unknown_items as f64 / self.distinct_items as f64
            },
            mean_reward: RewardBreakdown {
                jaccard: per_sample(self.reward_sum.jaccard),
                format: per_sample(self.reward_sum.format),
                total: per_sample(self.reward_sum.total),
            },
        }
    }

    fn per_disease(&self) -> Vec<DiseaseScores> {
        let entries = self.reward.vocabulary().entries();
        entries
            .iter()
            .zip(self.tally.label_counts())
            .map(|(entry, counts): (_, &LabelCounts)| {
                let scores = counts.scores();
                DiseaseScores {
                    disease: entry.name.clone(),
                    precision: scores.precision,
                    recall: scores.recall,
                    f1: scores.f1,
                    support: counts.support(),
                    predicted: counts.true_positives + counts.false_positives,
                }
            })
            .collect()
    }
}

/// Accumulates physiological-level (hypothesis, reference) texts.
#[derive(Debug, Clone, Default)]
pub struct TextEvaluator {
    bleu: BleuTally,
    rouge_sum: f64,
    samples: u64,
}

impl TextEvaluator {
    pub fn add(&mut self, hypothesis: &str, reference: &str) {
        self.bleu.add(hypothesis, reference);
        self.rouge_sum += rouge_l_f(hypothesis, reference);
        self.samples += 1;
    }

    pub fn finish(&self) -> TextReport {
        TextReport {
            samples: self.samples,
            bleu4: self.bleu.score(),
            bleu_precisions: self.bleu.precisions(),
            brevity_penalty: self.bleu.brevity_penalty(),
            rouge_l_f: if self.samples == 0 { 0.0 } else { self.rouge_sum / self.samples as f64 },
        }
    }
}

impl EvalReport {
    pub fn to_json(&self) -> Result<String, EvalError> {
        Ok(serde_json::to_string_pretty(self)?)
    }

    /// Records the evaluated answers and summarises their gates into `cao_gates`.
    pub fn set_answers(&mut self, answers: Vec<AnswerRecord>) {
        self.cao_gates = (!answers.is_empty()).then(|| GateSummary::from_gates(answers.iter().map(|a| &a.cao_gates)));
        self.answers = answers;
    }

    /// Markdown tables: per-disease rows, then the averages, then the overall rates and text
    /// scores, then the mean CAO gates.
    pub fn to_markdown(&self) -> String {
        let mut out = String::new();
        if let Some(disease) = &self.disease {
            disease_markdown(&mut out, disease);
        }
        if let Some(text) = &self.text {
            text_markdown(&mut out, text);
        }
        if let Some(gates) = &self.cao_gates {
            out.push_str(&gates.to_markdown());
        }
        if out.is_empty() {
            out.push_str("No samples were evaluated.\n");
        }
        out
    }
}

fn disease_markdown(out: &mut String, report: &DiseaseReport) {
    // Writing to a String cannot fail.
    let _ = writeln!(out, "## Disease-level ({} samples)\n", report.samples);
    let _ = writeln!(out, "| Disease | Precision | Recall | F1 | Support | Predicted |");
    let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|");
    for row in &report.per_disease {
        let _ = writeln!(
            out,
            "| {} | {:.4} | {:.4} | {:.4} | {} | {} |",
            row.disease, row.precision, row.recall, row.f1, row.support, row.predicted
        );
    }
    for (name, avg) in [("**macro average**", &report.macro_avg), ("**micro average**", &report.micro_avg)] {
        let _ = writeln!(out, "| {name} | {:.4} | {:.4} | {:.4} | | |", avg.precision, avg.recall, avg.f1);
    }
    let _ = writeln!(out, "\n| Overall | Value |\n|---|---:|");
    let rows = [
        ("Sample-wise Jaccard", report.sample_jaccard),
        ("Exact-set accuracy", report.subset_accuracy),
        ("Valid format rate", report.valid_format_rate),
        ("Answer tag rate", report.answer_tag_rate),
        ("Unknown item rate", report.unknown_item_rate),
        ("Mean Jaccard reward", report.mean_reward.jaccard),
        ("Mean format reward", report.mean_reward.format),
        ("Mean total reward", report.mean_reward.total),
    ];
    for (name, value) in rows {
        let _ = writeln!(out, "| {name} | {value:.4} |");
    }
    out.push('\n');
}

fn text_markdown(out: &mut String, report: &TextReport) {
    let _ = writeln!(out, "## Physiological-level text ({} samples)\n", report.samples);
    let _ = writeln!(out, "| Metric | Value |\n|---|---:|");
    let _ = writeln!(out, "| BLEU-4 (corpus) | {:.4} |", report.bleu4);
    let p = report.bleu_precisions;
    let _ = writeln!(out, "| BLEU p1/p2/p3/p4 | {:.4} / {:.4} / {:.4} / {:.4} |", p[0], p[1], p[2], p[3]);
    let _ = writeln!(out, "| BLEU brevity penalty | {:.4} |", report.brevity_penalty);
    let _ = writeln!(out, "| ROUGE-L F (mean) | {:.4} |", report.rouge_l_f);
    out.push('\n');
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gates::ModalityGates;
    use crate::reward::RewardWeights;
    use crate::vocabulary::{DiseaseId, DiseaseVocabulary, NameMatching};

    fn evaluator() -> DiseaseEvaluator {
        let vocab = DiseaseVocabulary::paper_default(NameMatching::Synonyms);
        DiseaseEvaluator::new(DiagnosisReward::new(vocab, RewardWeights::default()))
    }

    #[test]
    fn disease_report_counts_formats_rewards_and_unknowns() {
        let mut eval = evaluator();
        let reference = "<think>r</think><answer>pneumonia; sepsis</answer>";
        eval.add_with_reference("<think>a</think><answer>Pneumonia; gout</answer>", reference);
        eval.add_with_reference("pneumonia; sepsis", reference);
        eval.add_with_truth("<think>a</think><answer>HTN</answer>", &DiseaseSet::from([DiseaseId(2)]));
        let report = eval.finish();
        assert_eq!(report.samples, 3);
        assert!((report.valid_format_rate - 2.0 / 3.0).abs() < 1e-15);
        assert!((report.answer_tag_rate - 2.0 / 3.0).abs() < 1e-15);
        assert_eq!(report.unknown_item_rate, 1.0 / 3.0); // gout among {pneumonia, gout, HTN}
                                                         // Jaccard rewards 1/3, 0, 1 (mean 4/9); format rewards 1, 0, 1 (mean 2/3).
        assert!((report.mean_reward.jaccard - 4.0 / 9.0).abs() < 1e-15);
        assert!((report.mean_reward.total - (4.0 / 9.0 + 2.0 / 3.0)).abs() < 1e-15);
        let pneumonia = &report.per_disease[4];
        assert_eq!((pneumonia.support, pneumonia.predicted, pneumonia.recall), (2, 1, 0.5));
        assert_eq!(report.per_disease[2].f1, 1.0);
        assert!((report.subset_accuracy - 1.0 / 3.0).abs() < 1e-15);
    }

    #[test]
    fn markdown_has_a_row_per_disease_and_the_overall_rows() {
        let mut eval = evaluator();
        eval.add_with_reference("<think>a</think><answer>sepsis</answer>", "<answer>sepsis</answer>");
        let mut text = TextEvaluator::default();
        text.add("sinus rhythm", "sinus rhythm");
        let report = EvalReport { disease: Some(eval.finish()), text: Some(text.finish()), ..EvalReport::default() };
        let markdown = report.to_markdown();
        assert!(markdown.contains("| sepsis | 1.0000 | 1.0000 | 1.0000 | 1 | 1 |"), "{markdown}");
        assert!(markdown.contains("| pneumonia | 0.0000 | 0.0000 | 0.0000 | 0 | 0 |"));
        assert!(markdown.contains("| **macro average** | 0.1429 |"));
        assert!(markdown.contains("| Valid format rate | 1.0000 |"));
        assert!(markdown.contains("| ROUGE-L F (mean) | 1.0000 |"));
        // BLEU-4 of a 2-token pair: no 3- and 4-grams, so tiny rather than 1 (nltk semantics).
        assert!(markdown.contains("| BLEU-4 (corpus) | 0.0000 |"));
        assert_eq!(EvalReport::default().to_markdown(), "No samples were evaluated.\n");
    }

    #[test]
    fn json_round_trips_the_numbers() {
        let mut text = TextEvaluator::default();
        text.add("the cat on mat", "the cat sat on the mat");
        let mut report = EvalReport { disease: None, text: Some(text.finish()), ..EvalReport::default() };
        let value: serde_json::Value = serde_json::from_str(&report.to_json().unwrap()).unwrap();
        assert_eq!(value["disease"], serde_json::Value::Null);
        assert!((value["text"]["rouge_l_f"].as_f64().unwrap() - 0.8).abs() < 1e-15);
        assert_eq!(value["text"]["samples"], 1);
        assert!(value.get("answers").is_none() && value.get("cao_gates").is_none(), "no answers, no gate keys");
        report.set_answers(vec![AnswerRecord {
            id: "s1".into(),
            kind: "physiological".into(),
            answer: "the cat on mat".into(),
            cao_gates: ModalityGates::from_ordered([Some(0.5), None, Some(0.25)]),
        }]);
        let value: serde_json::Value = serde_json::from_str(&report.to_json().unwrap()).unwrap();
        assert_eq!(value["answers"][0]["id"], "s1");
        assert_eq!(value["answers"][0]["cao_gates"]["cxr"], serde_json::Value::Null);
        assert_eq!(value["cao_gates"]["per_modality"][2]["mean"], 0.25);
        assert!(report.to_markdown().contains("| lab | 0.2500 | 1 | 0 |"));
    }
}
