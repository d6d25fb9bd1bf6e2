//! `medtvt learner`: one learner rank (see medtvt-learner's `process`). The CLI is synchronous;
//! this command builds the process's one tokio runtime and runs the learner on it.

use anyhow::Context;
use medtvt_learner::medtvt_policy::MedTvtPolicy;
use medtvt_learner::process::LearnerArgs;

pub fn run(args: LearnerArgs) -> anyhow::Result<()> {
    crate::logging::init();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the tokio runtime")?;
    runtime.block_on(medtvt_learner::process::run::<MedTvtPolicy>(args)).context("learner")?;
    Ok(())
}
