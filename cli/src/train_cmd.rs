//! `medtvt train CONFIG...`: runs one or more stage configs (e.g. PT, SFT, GRPO) in order. With
//! `--coordinator URL` the jobs go to a running cluster; without it a local cluster of separate
//! processes is started on loopback (coordinator, learners and rollout workers as the first
//! config's `[cluster]` section says) and stopped at the end. Each job is watched with a progress
//! bar until it succeeds, and a failed or cancelled job stops the sequence with its message.

use crate::cluster::{ClusterShape, LocalCluster};
use anyhow::{bail, Context};
use indicatif::{ProgressBar, ProgressStyle};
use medtvt_proto::client::{self, Client};
use medtvt_proto::v1::{JobState, ShutdownRequest, StatusRequest, SubmitJobRequest};
use std::path::PathBuf;
use std::time::Duration;

#[derive(clap::Args, Debug, Clone)]
pub struct TrainArgs {
    /// Stage configs, run one after another (each starts when the previous succeeded).
    #[arg(required = true, value_name = "CONFIG")]
    pub configs: Vec<PathBuf>,
    /// A running coordinator to submit to; without it a local cluster is started.
    #[arg(long, env = "MEDTVT_COORDINATOR")]
    pub coordinator: Option<String>,
    /// Dotted overrides applied to every config, e.g. `--set train.steps=10`.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
    #[arg(long, env = "MEDTVT_AUTH_TOKEN_FILE")]
    pub auth_token_file: Option<PathBuf>,
}

/// One stage to run: its config text (TOML) and a label for progress output.
#[derive(Debug, Clone)]
pub struct StageJob {
    pub label: String,
    pub config_toml: String,
    pub overrides: Vec<String>,
}

/// How a stage ended.
#[derive(Debug, Clone)]
pub struct StageOutcome {
    /// Optimizer steps the job trained.
    pub steps: u64,
}

pub fn run(args: &TrainArgs) -> anyhow::Result<()> {
    let mut jobs = Vec::new();
    for path in &args.configs {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        // A TOML syntax error is reported before anything starts; the full validation (which
        // needs an earlier stage's checkpoint to exist) happens when the job is submitted.
        toml::from_str::<toml::Table>(&text).with_context(|| format!("{} is not valid TOML", path.display()))?;
        jobs.push(StageJob { label: path.display().to_string(), config_toml: text, overrides: args.overrides.clone() });
    }
    let token = args.auth_token_file.as_deref().map(client::read_token_file).transpose()?;
    let runtime = tokio::runtime::Runtime::new().context("starting the tokio runtime")?;
    match &args.coordinator {
        Some(url) => runtime.block_on(async {
            let mut c = client::connect(url, token.as_deref()).await?;
            for job in &jobs {
                run_stage(&mut c, job, None).await?;
            }
            anyhow::Ok(())
        }),
        None => {
            let first = medtvt_config::parse_run_config(&jobs[0].config_toml, &args.configs[0], &args.overrides)?;
            let shape = ClusterShape {
                learners: first.cluster.learners as usize,
                rollout_workers: first.cluster.rollout_workers as usize,
                run_dir: first.run.out_dir.parent().map(PathBuf::from).unwrap_or_else(|| PathBuf::from("runs")),
                job_roots: named_paths(&jobs, &args.configs),
            };
            let mut cluster = LocalCluster::start(&shape)?;
            println!("local cluster: coordinator {} , logs in {}", cluster.url, cluster.log_dir.display());
            runtime.block_on(async {
                let mut c = client::connect(&cluster.url, None).await?;
                for job in &jobs {
                    run_stage(&mut c, job, Some(&mut cluster)).await?;
                }
                shutdown(&mut c).await
            })?;
            cluster.wait_then_kill(Duration::from_secs(20));
            Ok(())
        }
    }
}

/// Every path the stage configs name (output, data, checkpoint and weight files): the local
/// coordinator accepts jobs that point there and nowhere else. A config that does not parse adds
/// nothing; submitting it reports the problem.
fn named_paths(jobs: &[StageJob], files: &[PathBuf]) -> Vec<PathBuf> {
    let mut paths = Vec::new();
    for (job, file) in jobs.iter().zip(files) {
        if let Ok(config) = medtvt_config::parse_run_config_unvalidated(&job.config_toml, file, &job.overrides) {
            paths.extend(config.paths().into_iter().map(|(_, p)| p.to_path_buf()));
        }
    }
    paths.sort();
    paths.dedup();
    paths
}

/// Asks the coordinator to stop; the learners and workers exit when they see it.
pub async fn shutdown(c: &mut Client) -> anyhow::Result<()> {
    c.shutdown(ShutdownRequest { drain: false }).await.context("asking the coordinator to shut down")?;
    Ok(())
}

/// Submits one job and waits for it, with a progress bar over its steps. `cluster`, when local,
/// is checked for crashed processes while waiting.
pub async fn run_stage(
    c: &mut Client,
    job: &StageJob,
    mut cluster: Option<&mut LocalCluster>,
) -> anyhow::Result<StageOutcome> {
    let job_id = c
        .submit_job(SubmitJobRequest { config_toml: job.config_toml.clone(), overrides: job.overrides.clone() })
        .await
        .with_context(|| format!("submitting {}", job.label))?
        .into_inner()
        .job_id;
    let bar = ProgressBar::new(1).with_message(job.label.clone());
    bar.set_style(
        ProgressStyle::with_template("{msg} {bar:30} {pos}/{len} steps [{elapsed}] {prefix}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut last_printed = u64::MAX;
    loop {
        if let Some(cluster) = cluster.as_deref_mut() {
            cluster.check_alive()?;
        }
        let status = c.get_status(StatusRequest { job_id }).await.context("reading the job status")?.into_inner();
        let Some(js) = status.jobs.into_iter().find(|j| j.job_id == job_id) else {
            bail!("the coordinator does not know job {job_id} any more");
        };
        bar.set_length(js.total_steps.max(1));
        bar.set_position(js.step);
        let summary = metric_summary(&js.latest_metrics);
        bar.set_prefix(summary.clone());
        if bar.is_hidden() && js.step != last_printed {
            println!("{} step {}/{} {summary}", job.label, js.step, js.total_steps);
            last_printed = js.step;
        }
        match JobState::try_from(js.state).unwrap_or(JobState::Unspecified) {
            JobState::Succeeded => {
                bar.finish_and_clear();
                println!("{}: done, {} steps {summary}", job.label, js.step);
                return Ok(StageOutcome { steps: js.step });
            }
            JobState::Failed => bail!("{} failed: {}", job.label, js.message),
            JobState::Cancelled => bail!("{} was cancelled", job.label),
            _ => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
}

fn metric_summary(m: &std::collections::HashMap<String, f64>) -> String {
    ["loss", "reward_mean", "kl"]
        .iter()
        .filter_map(|k| m.get(*k).map(|v| format!("{k} {v:.4}")))
        .collect::<Vec<_>>()
        .join("  ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_local_coordinator_allows_every_path_the_configs_name() {
        let text = |stage: &str, extra: &str| {
            format!(
                "[run]\nname = \"r\"\nstage = \"{stage}\"\nout_dir = \"/srv/runs/{stage}\"\n[data]\ndir = \"/srv/data\"\n\
                 [model]\n{extra}[train]\nsteps = 1\nbatch_size = 2\nlearning_rate = 0.001\n"
            )
        };
        let job = |toml: String| StageJob { label: "c".into(), config_toml: toml, overrides: vec![] };
        let jobs = vec![
            job(text("pt", "ecg_encoder_weights = \"/models/ecg.safetensors\"\n")),
            job(text("sft", "checkpoint = \"/srv/runs/pt/final\"\n")),
            job("not toml".into()),
        ];
        let files = vec![PathBuf::from("pt.toml"), PathBuf::from("sft.toml"), PathBuf::from("bad.toml")];
        let paths: Vec<String> = named_paths(&jobs, &files).iter().map(|p| p.display().to_string()).collect();
        assert_eq!(
            paths,
            ["/models/ecg.safetensors", "/srv/data", "/srv/runs/pt", "/srv/runs/pt/final", "/srv/runs/sft"]
        );
    }
}
