//! MedTVT-QA data: the JSONL sample format, readers and writers for the real file formats
//! (WFDB ECG records, chest X-ray images, MIMIC-IV labevents CSV), the synthetic generator and the
//! builder that pairs a user's MIMIC copies. No tensors: this crate yields plain arrays.
