//! `medtvt coordinator`: runs the control plane of a run (see the medtvt-coordinator crate).
//! The flags live with the crate (`CoordinatorArgs`); this file only gives it its runtime.

use anyhow::Context;

pub fn run(args: medtvt_coordinator::CoordinatorArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(medtvt_coordinator::run(args))
}
