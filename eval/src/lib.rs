//! Scoring answers: parsing `<think>…</think><answer>…</answer>` completions, the rewards GRPO
//! optimises (Jaccard over disease sets, format), and the evaluation metrics reported per disease
//! and overall. Pure functions over strings and label sets; no tensors.
//!
//! - [`vocabulary`]: the configurable disease list with synonyms and the exact (reference) mode;
//! - [`answer`]: the answer span, its items, and the format check;
//! - [`reward`]: Jaccard and format rewards ([`DiagnosisReward`], [`RewardBreakdown`]);
//! - [`multilabel`]: per-disease P/R/F1, macro/micro averages, sample Jaccard, subset accuracy
//!   (scikit-learn semantics, zero_division = 0);
//! - [`bleu`], [`rouge`]: corpus BLEU-4 (nltk) and ROUGE-L (rouge-score) for physiological QA;
//! - [`gates`]: the CAO gates of each evaluated answer and their mean per modality;
//! - [`report`]: the accumulators and [`EvalReport`] (JSON and Markdown).

pub mod answer;
pub mod bleu;
pub mod error;
pub mod gates;
pub mod multilabel;
pub mod report;
pub mod reward;
pub mod rouge;
pub mod vocabulary;

pub use answer::{is_well_formatted, ParsedAnswer};
pub use error::EvalError;
pub use gates::{AnswerRecord, GateMean, GateSummary, ModalityGates, GATE_MODALITIES};
pub use multilabel::{MultilabelTally, PrfScores};
pub use report::{DiseaseEvaluator, DiseaseReport, DiseaseScores, EvalReport, TextEvaluator, TextReport};
pub use reward::{format_reward, jaccard_reward, DiagnosisReward, RewardBreakdown, RewardWeights};
pub use vocabulary::{
    AnswerItem, DiseaseEntry, DiseaseId, DiseaseSet, DiseaseVocabulary, NameMatching, PAPER_DISEASES,
};
