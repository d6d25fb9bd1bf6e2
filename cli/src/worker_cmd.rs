//! `medtvt rollout-worker`: one rollout worker (see medtvt-rollout-worker). The CLI is
//! synchronous; this command builds the process's one tokio runtime and runs the worker on it.

use anyhow::Context;
use medtvt_learner::medtvt_policy::MedTvtPolicy;
use medtvt_rollout_worker::RolloutWorkerArgs;

pub fn run(args: RolloutWorkerArgs) -> anyhow::Result<()> {
    crate::logging::init();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the tokio runtime")?;
    runtime.block_on(medtvt_rollout_worker::run::<MedTvtPolicy>(args)).context("rollout worker")?;
    Ok(())
}
