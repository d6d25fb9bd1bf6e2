//! The learner role: optimisation steps for GRPO, PT and SFT, and the collective that averages
//! gradients across learner ranks.

pub mod checkpoint;
pub mod collective;
pub mod grpo;
pub mod metrics_log;
pub mod nccl;
pub mod optim;
