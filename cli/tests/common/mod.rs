//! Helpers shared by the cross-process tests (`distributed.rs`, `chaos.rs`): the real `medtvt`
//! binary started as coordinator, learners and rollout workers on 127.0.0.1 with ephemeral ports,
//! each child killed (SIGKILL) and reaped when its guard drops so a failing assertion never leaves
//! processes behind; status polling with the processes' logs on failure; a small synthetic
//! dataset, tiny-model run configs, and the files a run leaves (metrics, rank digests,
//! checkpoints).
#![allow(dead_code)]

use medtvt_proto::v1::{JobState, JobStatus, RunStatus, ShutdownRequest, StatusRequest};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// A child process killed (and reaped) on drop.
pub struct Proc {
    pub name: String,
    pub child: Child,
}

impl Proc {
    /// SIGKILL now and reap.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits up to `limit` for the process to exit by itself.
    pub fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "{} did not exit within {limit:?}", self.name);
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn medtvt() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_medtvt"));
    cmd.env("RUST_LOG", "info").env_remove("MEDTVT_AUTH_TOKEN_FILE");
    cmd
}

/// Starts a role with stderr (its log) appended to `log`.
pub fn spawn(name: &str, args: &[&str], log: &Path) -> Proc {
    let file = std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
    let child = medtvt().args(args).stdout(Stdio::null()).stderr(file).spawn().unwrap();
    Proc { name: name.to_string(), child }
}

/// Starts the coordinator and returns it with its URL (read from its stdout).
pub fn start_coordinator(run_dir: &Path, configs: &[&Path]) -> (Proc, String) {
    start_coordinator_with(run_dir, configs, "127.0.0.1:0", &[])
}

/// [`start_coordinator`] listening on `listen`, with `extra` flags. Jobs submitted to it may use
/// paths under `run_dir` (`--job-root`). Its log (stderr) is appended to
/// `run_dir/coordinator.log`, so a restarted coordinator adds to the first one's.
pub fn start_coordinator_with(run_dir: &Path, configs: &[&Path], listen: &str, extra: &[&str]) -> (Proc, String) {
    let mut args: Vec<String> = vec!["coordinator".into()];
    for c in configs {
        args.push("--config".into());
        args.push(c.display().to_string());
    }
    args.extend(["--listen".into(), listen.into(), "--run-dir".into(), run_dir.display().to_string()]);
    args.extend(["--job-root".into(), run_dir.display().to_string()]);
    args.extend(extra.iter().map(|s| s.to_string()));
    let log = std::fs::OpenOptions::new().create(true).append(true).open(run_dir.join("coordinator.log")).unwrap();
    let mut child = medtvt().args(&args).stdout(Stdio::piped()).stderr(log).spawn().unwrap();
    let stdout = child.stdout.take().unwrap();
    let proc = Proc { name: "coordinator".into(), child };
    let mut lines = BufReader::new(stdout).lines();
    let addr = loop {
        let line = match lines.next() {
            Some(line) => line.unwrap(),
            None => panic!("the coordinator exited before listening:\n{}", logs(run_dir)),
        };
        if let Some(addr) = line.strip_prefix("coordinator listening on ") {
            break addr.trim().to_string();
        }
    };
    // Keep draining stdout so the coordinator never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    let url = if addr.starts_with("http") { addr } else { format!("http://{addr}") };
    (proc, url)
}

/// `host:port` of a coordinator URL.
pub fn host_port(url: &str) -> &str {
    url.trim_start_matches("http://").trim_start_matches("https://")
}

pub fn learner(url: &str, rank: u32, world: u32, dir: &Path) -> Proc {
    let log = dir.join(format!("learner-{rank}.log"));
    spawn(
        &format!("learner-{rank}"),
        &[
            "learner",
            "--coordinator",
            url,
            "--rank",
            &rank.to_string(),
            "--world-size",
            &world.to_string(),
            "--device",
            "cpu",
        ],
        &log,
    )
}

pub fn worker(url: &str, name: &str, dir: &Path) -> Proc {
    worker_with(url, name, dir, &[])
}

/// A rollout worker with `extra` flags (e.g. `--auth-token-file`).
pub fn worker_with(url: &str, name: &str, dir: &Path, extra: &[&str]) -> Proc {
    let log = dir.join(format!("{name}.log"));
    let mut args =
        vec!["rollout-worker", "--coordinator", url, "--device", "cpu", "--name", name, "--max-prompts", "2"];
    args.extend_from_slice(extra);
    spawn(name, &args, &log)
}

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

/// The coordinator's whole status, with a bearer token when it needs one.
pub fn run_status(rt: &tokio::runtime::Runtime, url: &str, token: Option<&str>) -> RunStatus {
    rt.block_on(async {
        let mut client = medtvt_proto::client::connect(url, token).await.unwrap();
        client.get_status(StatusRequest::default()).await.unwrap().into_inner()
    })
}

pub fn job_status(rt: &tokio::runtime::Runtime, url: &str, job_id: u64) -> JobStatus {
    rt.block_on(async {
        let mut client = medtvt_proto::client::connect(url, None).await.unwrap();
        let status = client.get_status(StatusRequest { job_id }).await.unwrap().into_inner();
        status.jobs.into_iter().find(|j| j.job_id == job_id).expect("the job is listed")
    })
}

/// Polls until `done(status)` or the deadline; on timeout fails with the status and the logs.
pub fn wait_for(
    rt: &tokio::runtime::Runtime,
    url: &str,
    job_id: u64,
    dir: &Path,
    limit: Duration,
    done: impl Fn(&JobStatus) -> bool,
) -> JobStatus {
    wait_for_every(rt, url, job_id, dir, limit, Duration::from_millis(200), done)
}

/// [`wait_for`] polling every `every`.
pub fn wait_for_every(
    rt: &tokio::runtime::Runtime,
    url: &str,
    job_id: u64,
    dir: &Path,
    limit: Duration,
    every: Duration,
    done: impl Fn(&JobStatus) -> bool,
) -> JobStatus {
    let started = Instant::now();
    loop {
        let status = job_status(rt, url, job_id);
        if done(&status) {
            return status;
        }
        let finished =
            [JobState::Succeeded as i32, JobState::Failed as i32, JobState::Cancelled as i32].contains(&status.state);
        if finished || started.elapsed() > limit {
            panic!("job {job_id} not as expected after {:?}: {status:#?}\n{}", started.elapsed(), logs(dir));
        }
        std::thread::sleep(every);
    }
}

/// The last lines of every `.log` file in `dir`.
pub fn logs(dir: &Path) -> String {
    let mut out = String::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.extension().is_some_and(|e| e == "log") {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(25).collect();
            out.push_str(&format!("--- {} (last lines)\n", path.display()));
            for line in tail.into_iter().rev() {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    out
}

pub fn succeeded(s: &JobStatus) -> bool {
    s.state == JobState::Succeeded as i32
}

pub fn shutdown(rt: &tokio::runtime::Runtime, url: &str, procs: &mut [Proc]) {
    rt.block_on(async {
        let mut client = medtvt_proto::client::connect(url, None).await.unwrap();
        client.shutdown(ShutdownRequest { drain: false }).await.unwrap();
    });
    // Every role exits by itself once the coordinator says it is shutting down.
    for p in procs.iter_mut() {
        let status = p.wait_exit(Duration::from_secs(30));
        assert!(status.success(), "{} exited with {status}", p.name);
    }
}

/// A small synthetic dataset of `n` encounters under `root/data`.
pub fn dataset_of(root: &Path, n: usize) -> PathBuf {
    let dir = root.join("data");
    let mut cfg = medtvt_data::synth::SynthConfig::new(n, 7);
    cfg.image_size = 32;
    medtvt_data::synth::synthesize(&dir, &cfg).unwrap();
    dir
}

/// The 12-encounter dataset most tests use.
pub fn dataset(root: &Path) -> PathBuf {
    dataset_of(root, 12)
}

/// The `[cluster]` keys of most tests: two learners, two workers, long timeouts.
pub const TWO_LEARNERS: &str =
    "learners = 2\nrollout_workers = 2\nlease_timeout_s = 60.0\nheartbeat_timeout_s = 20.0\n";

/// A tiny-model run config with [`TWO_LEARNERS`]; `extra` adds tables or keys after `[cluster]`.
pub fn config(
    root: &Path,
    name: &str,
    stage: &str,
    data: &Path,
    checkpoint: Option<&Path>,
    train: &str,
    extra: &str,
) -> PathBuf {
    config_with_cluster(root, name, stage, data, checkpoint, train, TWO_LEARNERS, extra)
}

/// A tiny-model run config written to `root/<name>.toml`, its output in `root/<name>`.
#[allow(clippy::too_many_arguments)]
pub fn config_with_cluster(
    root: &Path,
    name: &str,
    stage: &str,
    data: &Path,
    checkpoint: Option<&Path>,
    train: &str,
    cluster: &str,
    extra: &str,
) -> PathBuf {
    let checkpoint = checkpoint.map(|c| format!("checkpoint = \"{}\"\n", c.display())).unwrap_or_default();
    let text = format!(
        r#"[run]
name = "{name}"
stage = "{stage}"
out_dir = "{out}"
seed = 11

[data]
dir = "{data}"
max_prompt_tokens = 96

[model]
{checkpoint}train_all = true

[model.tiny]
vocab_size = 384
hidden_size = 32
intermediate_size = 64
num_layers = 1
num_heads = 2
num_kv_heads = 1
image_size = 32
vit_patch_size = 16
vit_depth = 1
ecg_resnet_blocks = 1

[train]
{train}

[cluster]
{cluster}{extra}"#,
        out = root.join(name).display(),
        data = data.display(),
    );
    let path = root.join(format!("{name}.toml"));
    std::fs::write(&path, text).unwrap();
    path
}

pub fn pt_config(root: &Path, data: &Path, steps: u64) -> PathBuf {
    let train =
        format!("steps = {steps}\nbatch_size = 4\nlearning_rate = 0.003\nwarmup_steps = 0\ncheckpoint_every = 4\n");
    config(root, "pt", "pt", data, None, &train, "")
}

pub fn grpo_config_text(root: &Path, data: &Path, checkpoint: &Path, steps: u64) -> String {
    let train = format!("steps = {steps}\nlearning_rate = 0.001\ngrad_accumulation = 1\n");
    let grpo = "\n[grpo]\ngroup_size = 2\nprompts_per_step = 2\nmax_new_tokens = 12\nbeta = 0.04\nmax_staleness = 2\n";
    let path = config(root, "grpo", "grpo", data, Some(checkpoint), &train, grpo);
    std::fs::read_to_string(path).unwrap()
}

pub fn metrics(path: &Path) -> Vec<medtvt_learner::metrics_log::MetricsRecord> {
    medtvt_learner::metrics_log::read_all(path).unwrap()
}

pub fn rank_digest(out: &Path, rank: usize) -> String {
    let text = std::fs::read_to_string(out.join("ranks").join(format!("rank-{rank}.json"))).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["weights_sha256"].as_str().unwrap().to_string()
}

/// Steps of the complete checkpoints under `dir` (`step-00000003` -> 3), ascending.
pub fn checkpoint_steps(dir: &Path) -> Vec<u64> {
    let mut steps: Vec<u64> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.strip_prefix("step-")).and_then(|s| s.parse().ok()))
        .collect();
    steps.sort();
    steps
}
