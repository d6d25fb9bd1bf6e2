//! Cross-process tests of the training fabric: the real `medtvt` binary as coordinator, learners
//! and rollout workers on 127.0.0.1 (ephemeral ports), a synthetic dataset and a temporary run
//! directory, the tiny model shrunk further for speed. Every child is killed when its guard
//! drops, so a failing assertion never leaves processes behind.
//!
//! (a) a PT job on two learners lowers the loss and leaves both ranks with bit-identical weights;
//! (b) a GRPO job with two workers and two learners trains every accepted prompt group exactly once
//!     and reports rewards; (c) a worker that joins mid-run receives leases.

use medtvt_proto::v1::{JobState, JobStatus, ShutdownRequest, StatusRequest, SubmitJobRequest};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A child process killed (and reaped) on drop.
struct Proc {
    name: String,
    child: Child,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn medtvt() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_medtvt"));
    cmd.env("RUST_LOG", "info");
    cmd
}

/// Starts a role with stderr (its log) captured in `log`.
fn spawn(name: &str, args: &[&str], log: &Path) -> Proc {
    let file = std::fs::File::create(log).unwrap();
    let child = medtvt().args(args).stdout(Stdio::null()).stderr(file).spawn().unwrap();
    Proc { name: name.to_string(), child }
}

/// Starts the coordinator and returns it with its URL (read from its stdout).
fn start_coordinator(run_dir: &Path, configs: &[&Path]) -> (Proc, String) {
    let mut args: Vec<String> = vec!["coordinator".into()];
    for c in configs {
        args.push("--config".into());
        args.push(c.display().to_string());
    }
    args.extend(["--listen".into(), "127.0.0.1:0".into(), "--run-dir".into(), run_dir.display().to_string()]);
    let log = std::fs::File::create(run_dir.join("coordinator.log")).unwrap();
    let mut child = medtvt().args(&args).stdout(Stdio::piped()).stderr(log).spawn().unwrap();
    let stdout = child.stdout.take().unwrap();
    let proc = Proc { name: "coordinator".into(), child };
    let mut lines = BufReader::new(stdout).lines();
    let addr = loop {
        let line = lines.next().expect("the coordinator exited before listening").unwrap();
        if let Some(addr) = line.strip_prefix("coordinator listening on ") {
            break addr.trim().to_string();
        }
    };
    // Keep draining stdout so the coordinator never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    let url = if addr.starts_with("http") { addr } else { format!("http://{addr}") };
    (proc, url)
}

fn learner(url: &str, rank: u32, world: u32, dir: &Path) -> Proc {
    let log = dir.join(format!("learner-{rank}.log"));
    spawn(&format!("learner-{rank}"), &["learner", "--coordinator", url, "--rank", &rank.to_string(), "--world-size", &world.to_string(), "--device", "cpu"], &log)
}

fn worker(url: &str, name: &str, dir: &Path) -> Proc {
    let log = dir.join(format!("{name}.log"));
    spawn(name, &["rollout-worker", "--coordinator", url, "--device", "cpu", "--name", name, "--max-prompts", "2"], &log)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

fn job_status(rt: &tokio::runtime::Runtime, url: &str, job_id: u64) -> JobStatus {
    rt.block_on(async {
        let mut client = medtvt_proto::client::connect(url, None).await.unwrap();
        let status = client.get_status(StatusRequest { job_id }).await.unwrap().into_inner();
        status.jobs.into_iter().find(|j| j.job_id == job_id).expect("the job is listed")
    })
}

/// Polls until `done(status)` or the deadline; on timeout fails with the status and the logs.
fn wait_for(rt: &tokio::runtime::Runtime, url: &str, job_id: u64, dir: &Path, limit: Duration, done: impl Fn(&JobStatus) -> bool) -> JobStatus {
    let started = Instant::now();
    loop {
        let status = job_status(rt, url, job_id);
        if done(&status) {
            return status;
        }
        let finished = [JobState::Succeeded as i32, JobState::Failed as i32, JobState::Cancelled as i32].contains(&status.state);
        if finished || started.elapsed() > limit {
            panic!("job {job_id} not as expected after {:?}: {status:#?}\n{}", started.elapsed(), logs(dir));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn logs(dir: &Path) -> String {
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

fn succeeded(s: &JobStatus) -> bool {
    s.state == JobState::Succeeded as i32
}

fn shutdown(rt: &tokio::runtime::Runtime, url: &str, procs: &mut [Proc]) {
    rt.block_on(async {
        let mut client = medtvt_proto::client::connect(url, None).await.unwrap();
        client.shutdown(ShutdownRequest { drain: false }).await.unwrap();
    });
    // Every role exits by itself once the coordinator says it is shutting down.
    let deadline = Instant::now() + Duration::from_secs(30);
    for p in procs.iter_mut() {
        loop {
            if let Some(status) = p.child.try_wait().unwrap() {
                assert!(status.success(), "{} exited with {status}", p.name);
                break;
            }
            assert!(Instant::now() < deadline, "{} did not exit after shutdown", p.name);
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// A small synthetic dataset.
fn dataset(root: &Path) -> PathBuf {
    let dir = root.join("data");
    let mut cfg = medtvt_data::synth::SynthConfig::new(12, 7);
    cfg.image_size = 32;
    medtvt_data::synth::synthesize(&dir, &cfg).unwrap();
    dir
}

/// A tiny-model run config; `extra` adds tables or keys after `[train]`.
fn config(root: &Path, name: &str, stage: &str, data: &Path, checkpoint: Option<&Path>, train: &str, extra: &str) -> PathBuf {
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
learners = 2
rollout_workers = 2
lease_timeout_s = 60.0
heartbeat_timeout_s = 20.0
{extra}"#,
        out = root.join(name).display(),
        data = data.display(),
    );
    let path = root.join(format!("{name}.toml"));
    std::fs::write(&path, text).unwrap();
    path
}

fn pt_config(root: &Path, data: &Path, steps: u64) -> PathBuf {
    let train = format!("steps = {steps}\nbatch_size = 4\nlearning_rate = 0.003\nwarmup_steps = 0\ncheckpoint_every = 4\n");
    config(root, "pt", "pt", data, None, &train, "")
}

fn grpo_config_text(root: &Path, data: &Path, checkpoint: &Path, steps: u64) -> String {
    let train = format!("steps = {steps}\nlearning_rate = 0.001\ngrad_accumulation = 1\n");
    let grpo = "\n[grpo]\ngroup_size = 2\nprompts_per_step = 2\nmax_new_tokens = 12\nbeta = 0.04\nmax_staleness = 2\n";
    let path = config(root, "grpo", "grpo", data, Some(checkpoint), &train, grpo);
    std::fs::read_to_string(path).unwrap()
}

fn metrics(path: &Path) -> Vec<medtvt_learner::metrics_log::MetricsRecord> {
    medtvt_learner::metrics_log::read_all(path).unwrap()
}

fn rank_digest(out: &Path, rank: usize) -> String {
    let text = std::fs::read_to_string(out.join("ranks").join(format!("rank-{rank}.json"))).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["weights_sha256"].as_str().unwrap().to_string()
}

#[test]
fn pt_job_on_two_learners_lowers_the_loss_with_identical_ranks() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let data = dataset(root);
    let pt = pt_config(root, &data, 8);
    let rt = runtime();
    let (_coordinator, url) = start_coordinator(root, &[&pt]);
    let mut procs = vec![learner(&url, 0, 2, root), learner(&url, 1, 2, root)];
    let status = wait_for(&rt, &url, 1, root, Duration::from_secs(150), succeeded);
    assert_eq!(status.step, 8);

    let out = root.join("pt");
    let records = metrics(&out.join("metrics.jsonl"));
    assert_eq!(records.len(), 8, "one metrics record per step");
    let loss: Vec<f64> = records.iter().map(|r| r.values["loss"]).collect();
    assert!(loss.iter().all(|l| l.is_finite()));
    let head = (loss[0] + loss[1]) / 2.0;
    let tail = (loss[6] + loss[7]) / 2.0;
    assert!(tail < head, "loss did not go down: {loss:?}");
    assert_eq!(rank_digest(&out, 0), rank_digest(&out, 1), "ranks' final weights differ");
    assert!(out.join("final").is_dir() && out.join("checkpoints").is_dir());

    shutdown(&rt, &url, &mut procs);
}

#[test]
fn grpo_job_trains_every_group_once_and_a_late_worker_gets_work() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let data = dataset(root);
    let pt = pt_config(root, &data, 2);
    let rt = runtime();
    let (_coordinator, url) = start_coordinator(root, &[&pt]);
    let mut procs = vec![learner(&url, 0, 2, root), learner(&url, 1, 2, root), worker(&url, "worker-a", root)];
    wait_for(&rt, &url, 1, root, Duration::from_secs(120), succeeded);

    // The GRPO job starts from the PT output, which exists only now.
    let steps = 6;
    let grpo_text = grpo_config_text(root, &data, &root.join("pt").join("final"), steps);
    let job_id = rt.block_on(async {
        let mut client = medtvt_proto::client::connect(&url, None).await.unwrap();
        client.submit_job(SubmitJobRequest { config_toml: grpo_text, overrides: vec![] }).await.unwrap().into_inner().job_id
    });
    wait_for(&rt, &url, job_id, root, Duration::from_secs(120), |s| s.step >= 1);
    // (c) A second worker joins mid-run.
    procs.push(worker(&url, "worker-b", root));
    let status = wait_for(&rt, &url, job_id, root, Duration::from_secs(150), succeeded);

    assert_eq!(status.step, steps);
    // prompts_per_step groups per step, each trained exactly once.
    assert_eq!(status.groups_trained, steps * 2, "{status:#?}");
    assert!(status.groups_accepted >= status.groups_trained);
    let m = &status.latest_metrics;
    assert!(m.contains_key("reward_mean") && m["reward_mean"].is_finite(), "{m:?}");
    let records = metrics(&root.join("grpo").join("metrics.jsonl"));
    assert_eq!(records.len() as u64, steps);
    assert!(records.iter().all(|r| r.values["completions"] == 4.0), "G * prompts_per_step completions per step");
    assert_eq!(rank_digest(&root.join("grpo"), 0), rank_digest(&root.join("grpo"), 1));

    let late_log = std::fs::read_to_string(root.join("worker-b.log")).unwrap();
    assert!(late_log.contains("lease rolled out"), "the late worker never got a lease:\n{late_log}");
    shutdown(&rt, &url, &mut procs);
}

#[test]
fn restarted_learners_resume_from_the_latest_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let data = dataset(root);
    let train = "steps = 10\nbatch_size = 4\nlearning_rate = 0.003\nwarmup_steps = 0\ncheckpoint_every = 3\n";
    let pt = config(root, "pt", "pt", &data, None, train, "");
    let rt = runtime();
    let (_coordinator, url) = start_coordinator(root, &[&pt]);
    let first = vec![learner(&url, 0, 2, root), learner(&url, 1, 2, root)];
    wait_for(&rt, &url, 1, root, Duration::from_secs(120), |s| s.step >= 4);
    drop(first); // both ranks die mid-job (SIGKILL)
    assert!(checkpoint_steps(&root.join("pt").join("checkpoints")).contains(&3));

    let logs_dir = root.join("restarted");
    std::fs::create_dir_all(&logs_dir).unwrap();
    let mut second = vec![learner(&url, 0, 2, &logs_dir), learner(&url, 1, 2, &logs_dir)];
    let status = wait_for(&rt, &url, 1, &logs_dir, Duration::from_secs(150), succeeded);
    assert_eq!(status.step, 10);
    let log = std::fs::read_to_string(logs_dir.join("learner-0.log")).unwrap();
    assert!(log.contains("resumed from checkpoint"), "{log}");
    let out = root.join("pt");
    assert_eq!(rank_digest(&out, 0), rank_digest(&out, 1));
    let last = metrics(&out.join("metrics.jsonl")).last().map(|r| r.step);
    assert_eq!(last, Some(9));
    shutdown(&rt, &url, &mut second);
}

/// Steps of the complete checkpoints under `dir` (`step-00000003` -> 3).
fn checkpoint_steps(dir: &Path) -> Vec<u64> {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.strip_prefix("step-")).and_then(|s| s.parse().ok()))
        .collect()
}
