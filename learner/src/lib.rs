//! The learner role: optimisation steps for GRPO, PT and SFT, the collective that averages
//! gradients across learner ranks, and checkpoints.
//!
//! Map: [`process`] (the `medtvt learner` process) -> [`job`] (one job on one rank) ->
//! [`trainer`] (one step: [`batch`] loss inputs, [`grpo`] math, [`optim`], [`collective`]) ->
//! [`checkpoint`], [`metrics_log`]. What every worker-side process shares (membership, the
//! coordinator link, devices, inputs, weights on the wire) is in `medtvt_role`; the model is
//! reached through `medtvt_model::policy::Policy`.

pub mod batch;
pub mod checkpoint;
pub mod collective;
pub mod group;
pub mod grpo;
pub mod job;
pub mod metrics_log;
pub mod nccl;
pub mod nccl_collective;
pub mod optim;
pub mod process;
pub mod trainer;

#[cfg(test)]
mod medtvt_policy_tests;
