//! The three modality encoders of MedTVT-R1. Each maps one modality of a batch to one feature
//! vector per sample ([batch, feature_dim]); projection into the LLM's width happens afterwards in
//! `crate::adapter`.

pub mod cxr;
pub mod ecg;
pub mod lab;

pub use cxr::{CxrEncoder, VitConfig};
pub use ecg::{EcgEncoder, XResNet1dConfig};
pub use lab::{LabEncoder, LabEncoderConfig};
