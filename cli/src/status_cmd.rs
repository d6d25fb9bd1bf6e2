//! `medtvt status`: asks a coordinator for the state of its run and prints it as a table.

use anyhow::Context;
use medtvt_proto::client::{self, ConnectOptions};
use medtvt_proto::v1::StatusRequest;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct StatusArgs {
    /// The coordinator's address.
    #[arg(long, env = "MEDTVT_COORDINATOR", default_value = "http://127.0.0.1:50051")]
    pub coordinator: String,
    /// The shared-secret token file, when the coordinator requires one.
    #[arg(long, env = "MEDTVT_AUTH_TOKEN_FILE", value_name = "FILE")]
    pub auth_token_file: Option<PathBuf>,
    /// Only this job (default: every job).
    #[arg(long)]
    pub job: Option<u64>,
}

pub fn run(args: &StatusArgs) -> anyhow::Result<()> {
    let runtime =
        tokio::runtime::Builder::new_current_thread().enable_all().build().context("cannot start the async runtime")?;
    runtime.block_on(async {
        let token = args.auth_token_file.as_deref().map(client::read_token_file).transpose()?;
        let options = ConnectOptions { attempts: 3, ..ConnectOptions::default() };
        let mut coordinator = client::connect_with(&args.coordinator, token.as_deref(), &options).await?;
        let status = coordinator
            .get_status(StatusRequest { job_id: args.job.unwrap_or(0) })
            .await
            .with_context(|| format!("status request to {} failed", args.coordinator))?
            .into_inner();
        print!("{}", medtvt_coordinator::status_table::render(&status));
        Ok(())
    })
}
