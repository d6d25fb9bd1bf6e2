//! MedTVT-QA data: the JSONL sample format, readers and writers for the real file formats
//! (WFDB ECG records, chest X-ray images, MIMIC-IV labevents CSV), the synthetic generator and the
//! builder that pairs a user's MIMIC copies. No tensors: this crate yields plain arrays.
//!
//! The model-facing contract is [`inputs::ModalityInputs`] / [`inputs::load_inputs`]; the dataset
//! layout and text formats are described in `docs/data.md`.

pub mod dataset;
pub mod disease;
pub mod error;
pub mod image;
pub mod inputs;
pub mod inspect;
pub mod jpeg;
pub mod labs;
pub mod mimic;
pub mod qa_text;
pub mod rhythm;
pub mod sample;
pub mod synth;
pub mod time;
pub mod wfdb;

pub use dataset::Dataset;
pub use error::DataError;
pub use inputs::{check_files, load_inputs, ModalityFiles, ModalityInputs};
pub use labs::{lab_vector, LabEvent, LabPercentiles};
pub use sample::{read_jsonl, write_jsonl, QaKind, QaSample, Split};
