//! `medtvt`: the one binary of MedTVT-R1. Each role (coordinator, rollout worker, learner) and each
//! tool (data, eval, doctor, ...) is a subcommand, so one container image serves every role.

mod broken_pipe;
mod cluster;
mod coordinator_cmd;
mod data_cmd;
mod demo;
mod doctor;
mod eval_cmd;
mod learner_cmd;
mod plot;
mod status_cmd;
mod train_cmd;
mod worker_cmd;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "medtvt", version, about = "MedTVT-R1: multimodal medical reasoning trained with distributed GRPO")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Report what this machine offers: libtorch, CUDA devices, NCCL, build features.
    Doctor(doctor::DoctorArgs),
    /// Run the end-to-end demo on the tiny CPU default.
    Demo(demo::DemoArgs),
    /// Evaluate a checkpoint on a split: per-disease P/R/F1, Jaccard, format rate, BLEU/ROUGE-L.
    Eval(eval_cmd::EvalArgs),
    /// Draw PNG charts (reward, loss, KL, per-disease F1) from a run's metrics.jsonl.
    Plot(plot::PlotArgs),
    /// Data tools: synthetic MedTVT-QA, file inspection, the MIMIC builder.
    Data(data_cmd::DataArgs),
    /// One learner rank: trains the jobs the coordinator runs (PT/SFT/GRPO), all-reducing with its peers.
    Learner(medtvt_learner::process::LearnerArgs),
    /// One rollout worker: samples and rewards groups of completions for GRPO jobs.
    RolloutWorker(medtvt_rollout_worker::RolloutWorkerArgs),
    /// Run the coordinator: the gRPC control plane that schedules jobs, leases prompts,
    /// assembles training batches and relays weights.
    Coordinator(medtvt_coordinator::CoordinatorArgs),
    /// Run stage configs in order, on a running coordinator or on a local cluster it starts.
    Train(train_cmd::TrainArgs),
    /// Show the jobs and processes of a running coordinator.
    Status(status_cmd::StatusArgs),
}

fn main() -> std::process::ExitCode {
    broken_pipe::install_panic_hook();
    let cli = Cli::parse();
    broken_pipe::run(std::panic::AssertUnwindSafe(move || run(cli)))
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Doctor(args) => doctor::run(&args),
        Command::Demo(args) => demo::run(&args),
        Command::Eval(args) => eval_cmd::run(&args),
        Command::Plot(args) => plot::run(&args),
        Command::Data(args) => data_cmd::run(&args),
        Command::Learner(args) => learner_cmd::run(args),
        Command::RolloutWorker(args) => worker_cmd::run(args),
        Command::Coordinator(args) => coordinator_cmd::run(args),
        Command::Train(args) => train_cmd::run(&args),
        Command::Status(args) => status_cmd::run(&args),
    }
}
