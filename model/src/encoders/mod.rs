//! The three modality encoders of MedTVT-R1. Each maps one modality of a batch to one feature
//! vector per sample ([batch, feature_dim]); projection into the LLM's width happens afterwards in
//! `crate::adapter`. [`pretrained`] loads an encoder's weights from a safetensors file.

pub mod cxr;
pub mod ecg;
pub mod lab;
pub mod pretrained;

pub use cxr::{CxrEncoder, VitConfig};
pub use ecg::{EcgEncoder, XResNet1dConfig};
pub use lab::{LabEncoder, LabEncoderConfig};
pub use pretrained::{Encoder, EncoderWeightsError};
