//! The crate's error type: what can be wrong with a configured disease vocabulary or a report.

use thiserror::Error;

#[derive(Debug, Error)]
pub enum EvalError {
    #[error("disease vocabulary: entry {index} has an empty name; give every disease a name")]
    EmptyDiseaseName { index: usize },

    #[error("disease vocabulary: \"{name}\" is listed twice (entries {first} and {second}); list each disease once")]
    DuplicateDisease { name: String, first: usize, second: usize },

    #[error(
        "disease vocabulary: the name \"{name}\" would mean both \"{first}\" and \"{second}\"; \
         remove it from one of the two synonym lists"
    )]
    AmbiguousName { name: String, first: String, second: String },

    #[error("disease vocabulary is empty; list at least one disease")]
    EmptyVocabulary,

    #[error("evaluation report could not be serialised to JSON: {0}")]
    Json(#[from] serde_json::Error),
}
