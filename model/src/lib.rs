//! MedTVT-R1's networks on tch (libtorch).
//!
//! This crate owns every tensor computation of the system and nothing else: it has no notion of
//! processes, RPCs or runs. `runtime` reports what the linked libtorch can do.

pub mod adapter;
pub mod encoders;
pub mod perception;
pub mod runtime;
