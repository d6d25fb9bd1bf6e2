//! `medtvt-coordinator`: the control plane as a binary of its own, for a coordinator image
//! without torch. It links no libtorch (`tests/no_libtorch.rs` checks its dynamic libraries) and
//! takes exactly the flags of `medtvt coordinator`, which stays as a convenience.

use clap::Parser;

#[derive(Parser)]
#[command(
    name = "medtvt-coordinator",
    version,
    about = "The MedTVT coordinator: schedules jobs, leases prompts, assembles training batches and relays weights"
)]
struct Cli {
    #[command(flatten)]
    args: medtvt_coordinator::CoordinatorArgs,
}

fn main() -> anyhow::Result<()> {
    medtvt_coordinator::run_process(Cli::parse().args)
}
