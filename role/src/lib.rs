//! What every worker-side process of a run shares, whatever its role (learner or rollout worker).
//!
//! Map: [`args`] (the role flags every such process takes, one struct for `#[command(flatten)]`) ->
//! [`membership`] (register, heartbeat, wait for the next job, leave) with [`registration`] (the
//! worker id, renewed after a coordinator restart) -> [`rpc`] (calling the coordinator from the
//! blocking job threads, with retry and re-registration) -> [`device`] (which device a job runs
//! on), [`inputs`] (a batch's modality files) and [`weights`] (policy versions on the wire).
//!
//! A role's crate never reaches into another role's: the learner and the rollout worker both
//! build on this crate and on the `Policy` trait beside the model (`medtvt_model::policy`). This
//! crate links libtorch (devices, weight tensors) but never the optimiser or NCCL.

pub mod args;
pub mod device;
pub mod inputs;
pub mod membership;
pub mod registration;
pub mod rpc;
pub mod weights;

pub use args::RoleArgs;
