//! Agreement with the Python packages the metrics promise to match: scikit-learn (multilabel
//! P/R/F1, sample Jaccard, subset accuracy), nltk (corpus BLEU-4), rouge-score (ROUGE-L), and the
//! reference reward semantics in exact mode. Values come from tests/fixtures/metrics.json, written
//! by scripts/make_metric_fixtures.py.

use medtvt_eval::bleu::BleuTally;
use medtvt_eval::rouge::rouge_l_f;
use medtvt_eval::{
    DiagnosisReward, DiseaseId, DiseaseSet, DiseaseVocabulary, MultilabelTally, NameMatching, RewardWeights,
};
use serde::Deserialize;

#[derive(Deserialize)]
struct Fixture {
    multilabel: Vec<MultilabelCase>,
    text: Vec<TextCase>,
    exact_mode_rewards: Vec<RewardCase>,
}

#[derive(Deserialize)]
struct MultilabelCase {
    name: String,
    n_labels: usize,
    pairs: Vec<SetPair>,
    per_label: Vec<LabelScores>,
    #[serde(rename = "macro")]
    macro_avg: Prf,
    #[serde(rename = "micro")]
    micro_avg: Prf,
    sample_jaccard: f64,
    subset_accuracy: f64,
}

#[derive(Deserialize)]
struct SetPair {
    predicted: Vec<usize>,
    truth: Vec<usize>,
}

#[derive(Deserialize)]
struct Prf {
    precision: f64,
    recall: f64,
    f1: f64,
}

#[derive(Deserialize)]
struct LabelScores {
    precision: f64,
    recall: f64,
    f1: f64,
    support: u64,
}

#[derive(Deserialize)]
struct TextCase {
    name: String,
    pairs: Vec<TextPair>,
    bleu4: f64,
    rouge_l_f: f64,
    rouge_l_f_per_sample: Vec<f64>,
}

#[derive(Deserialize)]
struct TextPair {
    hypothesis: String,
    reference: String,
}

#[derive(Deserialize)]
struct RewardCase {
    completion: String,
    reference: String,
    jaccard: f64,
    format: f64,
}

fn fixture() -> Fixture {
    serde_json::from_str(include_str!("fixtures/metrics.json")).expect("committed fixture parses")
}

fn ids(labels: &[usize]) -> DiseaseSet {
    labels.iter().map(|&l| DiseaseId(l)).collect()
}

fn assert_close(got: f64, want: f64, tolerance: f64, what: &str) {
    assert!((got - want).abs() <= tolerance, "{what}: got {got}, sklearn/nltk/rouge-score gave {want}");
}

#[test]
fn multilabel_metrics_match_scikit_learn() {
    let cases = fixture().multilabel;
    assert!(cases.len() >= 10);
    for case in cases {
        let mut tally = MultilabelTally::new(case.n_labels);
        case.pairs.iter().for_each(|p| tally.add(&ids(&p.predicted), &ids(&p.truth)));
        for (index, (counts, want)) in tally.label_counts().iter().zip(&case.per_label).enumerate() {
            let got = counts.scores();
            let what = format!("{} label {index}", case.name);
            assert_close(got.precision, want.precision, 1e-9, &format!("{what} precision"));
            assert_close(got.recall, want.recall, 1e-9, &format!("{what} recall"));
            assert_close(got.f1, want.f1, 1e-9, &format!("{what} f1"));
            assert_eq!(counts.support(), want.support, "{what} support");
        }
        for (got, want, kind) in
            [(tally.macro_average(), &case.macro_avg, "macro"), (tally.micro_average(), &case.micro_avg, "micro")]
        {
            assert_close(got.precision, want.precision, 1e-9, &format!("{} {kind} precision", case.name));
            assert_close(got.recall, want.recall, 1e-9, &format!("{} {kind} recall", case.name));
            assert_close(got.f1, want.f1, 1e-9, &format!("{} {kind} f1", case.name));
        }
        assert_close(tally.sample_jaccard(), case.sample_jaccard, 1e-9, &format!("{} sample jaccard", case.name));
        assert_close(tally.subset_accuracy(), case.subset_accuracy, 1e-9, &format!("{} subset accuracy", case.name));
    }
}

#[test]
fn bleu_and_rouge_match_nltk_and_rouge_score() {
    let cases = fixture().text;
    assert!(cases.len() >= 10);
    for case in cases {
        let mut bleu = BleuTally::default();
        for (pair, want) in case.pairs.iter().zip(&case.rouge_l_f_per_sample) {
            bleu.add(&pair.hypothesis, &pair.reference);
            let got = rouge_l_f(&pair.hypothesis, &pair.reference);
            assert_close(got, *want, 1e-6, &format!("{} rouge-L of {:?}", case.name, pair.hypothesis));
        }
        let rouge_mean =
            case.pairs.iter().map(|p| rouge_l_f(&p.hypothesis, &p.reference)).sum::<f64>() / case.pairs.len() as f64;
        assert_close(rouge_mean, case.rouge_l_f, 1e-6, &format!("{} mean rouge-L", case.name));
        assert_close(bleu.score(), case.bleu4, 1e-6, &format!("{} BLEU-4", case.name));
        // The tiny nltk values (a zero-match order) must be reproduced to relative precision too.
        if case.bleu4 > 0.0 && case.bleu4 < 1e-6 {
            assert_close(bleu.score() / case.bleu4, 1.0, 1e-9, &format!("{} BLEU-4 relative", case.name));
        }
    }
}

#[test]
fn exact_mode_rewards_match_the_reference_semantics() {
    let cases = fixture().exact_mode_rewards;
    assert!(cases.len() >= 100);
    let reward = DiagnosisReward::new(DiseaseVocabulary::paper_default(NameMatching::Exact), RewardWeights::default());
    for case in &cases {
        let got = reward.score(&case.completion, &case.reference);
        assert_close(
            got.jaccard,
            case.jaccard,
            1e-12,
            &format!("jaccard of {:?} vs {:?}", case.completion, case.reference),
        );
        assert_eq!(got.format, case.format, "format of {:?}", case.completion);
    }
    // The fixture exercises both outcomes of each term.
    assert!(cases.iter().any(|c| c.format == 1.0) && cases.iter().any(|c| c.format == 0.0));
    assert!(cases.iter().any(|c| c.jaccard > 0.0 && c.jaccard < 1.0));
}
