//! The learner role: optimisation steps for GRPO, PT and SFT, and the collective that averages
//! gradients across learner ranks; plus what every role process shares (membership in a run,
//! calling the coordinator from blocking threads, weights on the wire, loading modality inputs).
//!
//! Map: [`process`] (the `medtvt learner` process) -> [`job`] (one job on one rank) ->
//! [`trainer`] (one step: [`batch`] loss inputs, [`grpo`] math, [`optim`], [`collective`]) ->
//! [`checkpoint`], [`metrics_log`], [`weights`]. The network side is [`membership`], [`registration`] and [`rpc`];
//! the model is reached through [`policy::Policy`].

pub mod batch;
pub mod checkpoint;
pub mod collective;
pub mod grpo;
pub mod inputs;
pub mod job;
pub mod medtvt_policy;
pub mod membership;
pub mod metrics_log;
pub mod nccl;
pub mod nccl_collective;
pub mod optim;
pub mod policy;
pub mod process;
pub mod registration;
pub mod rpc;
pub mod trainer;
pub mod weights;

#[cfg(any(test, feature = "test-policy"))]
pub mod test_policy;
