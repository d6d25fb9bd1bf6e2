//! `medtvt coordinator`: runs the control plane of a run (see the medtvt-coordinator crate).
//! The flags, runtime and logging / OpenTelemetry set-up live with the crate
//! (`CoordinatorArgs`, `run_process`), shared with the `medtvt-coordinator` binary.

pub fn run(args: medtvt_coordinator::CoordinatorArgs) -> anyhow::Result<()> {
    medtvt_coordinator::run_process(args)
}
