//! The `medtvt coordinator` entry point in-process: configs given on the command line become
//! jobs in order, the bound address is announced, the event log is written, and the stop
//! signal ends it cleanly; started again on the same run directory it resumes the run.

mod common;

use clap::Parser;
use common::*;
use medtvt_coordinator::{run_until, CoordinatorArgs};
use medtvt_proto::v1 as pb;
use std::net::SocketAddr;
use tokio::sync::oneshot;

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    args: CoordinatorArgs,
}

type Running = tokio::task::JoinHandle<anyhow::Result<()>>;

/// Runs the entry point until the returned sender fires; returns the announced address.
async fn start(args: CoordinatorArgs) -> (SocketAddr, oneshot::Sender<()>, Running) {
    let (addr_tx, addr_rx) = oneshot::channel();
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let running = tokio::spawn(run_until(
        args,
        async move {
            let _ = stop_rx.await;
        },
        move |addr| {
            let _ = addr_tx.send(addr);
            Ok(())
        },
    ));
    (addr_rx.await.unwrap(), stop_tx, running)
}

#[tokio::test]
async fn command_line_configs_become_jobs_and_the_address_is_announced() {
    let dir = tempfile::tempdir().unwrap();
    write_dataset(dir.path(), 4);
    let pt = dir.path().join("pt.toml");
    let sft = dir.path().join("sft.toml");
    std::fs::write(&pt, config_text(dir.path(), "pt", "")).unwrap();
    std::fs::write(&sft, config_text(dir.path(), "sft", "")).unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "tok-123\n").unwrap();
    let run_dir = dir.path().join("run");
    let cli = Cli::try_parse_from([
        "medtvt".as_ref(),
        "--listen".as_ref(),
        "127.0.0.1:0".as_ref(),
        "--config".as_ref(),
        pt.as_os_str(),
        "--config".as_ref(),
        sft.as_os_str(),
        "--set".as_ref(),
        "train.steps=7".as_ref(),
        "--run-dir".as_ref(),
        run_dir.as_os_str(),
        "--auth-token-file".as_ref(),
        token.as_os_str(),
    ])
    .unwrap();

    let (addr, stop_tx, running) = start(cli.args.clone()).await;
    assert_ne!(addr.port(), 0, "the real port is announced");
    let mut c = medtvt_proto::client::connect(&format!("http://{addr}"), Some("tok-123")).await.unwrap();
    let status = c.get_status(pb::StatusRequest::default()).await.unwrap().into_inner();
    let jobs: Vec<_> = status.jobs.iter().map(|j| (j.name.as_str(), j.state, j.total_steps)).collect();
    assert_eq!(jobs, vec![("test-pt", pb::JobState::Running as i32, 7), ("test-sft", pb::JobState::Queued as i32, 7)]);
    stop_tx.send(()).unwrap();
    running.await.unwrap().unwrap();
    let events = std::fs::read_to_string(run_dir.join("events.jsonl")).unwrap();
    assert!(events.lines().count() >= 3, "{events}");
    assert!(events.contains("\"event\":\"job_started\""), "{events}");

    // Started again on the same run directory, it resumes the run instead of submitting the
    // --config files a second time.
    let (addr, stop_tx, running) = start(cli.args).await;
    let mut c = medtvt_proto::client::connect(&format!("http://{addr}"), Some("tok-123")).await.unwrap();
    let status = c.get_status(pb::StatusRequest::default()).await.unwrap().into_inner();
    let resumed: Vec<_> = status.jobs.iter().map(|j| (j.name.as_str(), j.state, j.total_steps)).collect();
    assert_eq!(resumed, jobs);
    stop_tx.send(()).unwrap();
    running.await.unwrap().unwrap();
}

#[tokio::test]
async fn an_invalid_command_line_config_is_an_error_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[run]\n").unwrap();
    let cli = Cli::try_parse_from([
        "medtvt".as_ref(),
        "--listen".as_ref(),
        "127.0.0.1:0".as_ref(),
        "--config".as_ref(),
        bad.as_os_str(),
    ])
    .unwrap();
    let err = run_until(cli.args, async {}, |_| Ok(())).await.unwrap_err();
    assert!(format!("{err:#}").contains("bad.toml"), "{err:#}");
}

#[tokio::test]
async fn beyond_loopback_the_coordinator_needs_a_token_or_insecure() {
    let cli = Cli::try_parse_from(["medtvt", "--listen", "0.0.0.0:0"]).unwrap();
    let err = run_until(cli.args, async {}, |_| Ok(())).await.unwrap_err();
    let message = format!("{err:#}");
    assert!(
        message.contains("0.0.0.0:0") && message.contains("--auth-token-file") && message.contains("--insecure"),
        "{message}"
    );

    let cli = Cli::try_parse_from(["medtvt", "--listen", "0.0.0.0:0", "--insecure"]).unwrap();
    let (addr, stop_tx, running) = start(cli.args).await;
    assert!(addr.ip().is_unspecified() && addr.port() != 0, "{addr}");
    stop_tx.send(()).unwrap();
    running.await.unwrap().unwrap();
}

#[tokio::test]
async fn jobs_submitted_over_the_network_stay_under_the_job_roots() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    write_dataset(&data, 4);
    let outside = dir.path().join("elsewhere/out");
    let text =
        config_text(&data, "pt", "").replace("out_dir = \"out\"", &format!("out_dir = \"{}\"", outside.display()));
    let root = data.display().to_string();
    let cli = Cli::try_parse_from(["medtvt", "--listen", "127.0.0.1:0", "--job-root", &root]).unwrap();
    let (addr, stop_tx, running) = start(cli.args).await;
    let mut c = medtvt_proto::client::connect(&format!("http://{addr}"), None).await.unwrap();
    let refused =
        c.submit_job(pb::SubmitJobRequest { config_toml: text.clone(), overrides: vec![] }).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    assert!(
        refused.message().contains("run.out_dir") && refused.message().contains(&outside.display().to_string()),
        "{}",
        refused.message()
    );
    // An override is checked too, and nothing was queued.
    let inside = data.join("out").display().to_string();
    let req = pb::SubmitJobRequest {
        config_toml: text.clone(),
        overrides: vec![format!("run.out_dir={inside}"), "model.lab_encoder_weights=/etc/passwd".into()],
    };
    let refused = c.submit_job(req).await.unwrap_err();
    assert!(
        refused.message().contains("model.lab_encoder_weights") && refused.message().contains("/etc/passwd"),
        "{}",
        refused.message()
    );
    assert!(c.get_status(pb::StatusRequest::default()).await.unwrap().into_inner().jobs.is_empty());
    let req = pb::SubmitJobRequest { config_toml: text.clone(), overrides: vec![format!("run.out_dir={inside}")] };
    c.submit_job(req).await.unwrap();
    stop_tx.send(()).unwrap();
    running.await.unwrap().unwrap();

    // A root that holds every path: accepted as written.
    let root = dir.path().display().to_string();
    let cli = Cli::try_parse_from(["medtvt", "--listen", "127.0.0.1:0", "--job-root", &root]).unwrap();
    let (addr, stop_tx, running) = start(cli.args).await;
    let mut c = medtvt_proto::client::connect(&format!("http://{addr}"), None).await.unwrap();
    c.submit_job(pb::SubmitJobRequest { config_toml: text, overrides: vec![] }).await.unwrap();
    stop_tx.send(()).unwrap();
    running.await.unwrap().unwrap();
}
