//! Fault injection with real processes on 127.0.0.1: the `medtvt` binary as coordinator,
//! learner and rollout workers, the tiny model shrunk further, CPU only, a few steps each. Every
//! test injects one fault and checks that the run survives it as designed:
//!
//! (a) a rollout worker killed (SIGKILL) while it holds a lease: its prompts are re-leased once
//!     the lease expires and every group is trained exactly once;
//! (b) a learner killed mid-run and restarted with the same arguments: it resumes from its last
//!     checkpoint and the run ends after exactly the planned optimizer steps;
//! (c) the coordinator killed mid-run and restarted on the same port and run directory: learner
//!     and worker register again on their own and the job finishes;
//! (d) a rollout worker with a wrong token is refused (UNAUTHENTICATED) and exits non-zero;
//! (e) the newest checkpoint's weights corrupted: a restarted learner detects it by checksum and
//!     resumes from the previous one;
//! (f) 5 % of a dataset's files broken in four ways: the coordinator skips exactly the samples
//!     that name them (reported by id, file and problem, counted in the job status), and with
//!     `data.strict` refuses the job at the first one;
//! (g)-(l) a learner rank of two lost mid-run under `cluster.on_learner_loss` = `shrink` or
//!     `wait` (kill -9 rank 1 while a rollout worker keeps sampling, SIGSTOP rank 1, kill -9
//!     rank 0, a replacement started 5 s after the kill under `wait` and under `shrink`, and a
//!     PT job): the survivors re-form the group and the run keeps the invariants
//!     [`learner_loss_invariants`] checks.
//!
//! Each test is one row of the reliability table: it prints `| fault | expected | observed |
//! pass/fail |` and, when `MEDTVT_CHAOS_REPORT` names a file, appends the row there (`make chaos`
//! collects them; docs/reliability.md keeps a copy).

mod common;

use common::*;
use medtvt_model::policy::medtvt::MedTvtPolicy;
use medtvt_model::policy::Policy;
use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Runs one fault scenario: `body` returns the observed outcome; a panic makes a `fail` row and
/// is re-raised so the test fails.
fn scenario(fault: &str, expected: &str, body: impl FnOnce() -> String) {
    let started = Instant::now();
    let outcome = std::panic::catch_unwind(AssertUnwindSafe(body));
    let (observed, verdict) = match &outcome {
        Ok(observed) => (observed.clone(), "pass"),
        Err(panic) => {
            let text = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            (format!("FAILED: {}", text.lines().next().unwrap_or("panic")), "fail")
        }
    };
    let cell = |s: &str| s.replace('|', "/").replace('\n', " ");
    let row = format!(
        "| {} | {} | {} ({:.0} s) | {verdict} |",
        cell(fault),
        cell(expected),
        cell(&observed),
        started.elapsed().as_secs_f64()
    );
    println!("{row}");
    if let Some(path) = std::env::var_os("MEDTVT_CHAOS_REPORT") {
        let mut file = std::fs::OpenOptions::new().create(true).append(true).open(path).unwrap();
        writeln!(file, "{row}").unwrap();
    }
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

/// One learner, one worker slot, and the given lease timeout.
fn one_learner(lease_timeout_s: f64) -> String {
    format!("learners = 1\nrollout_workers = 1\nlease_timeout_s = {lease_timeout_s:.1}\nheartbeat_timeout_s = 20.0\n")
}

/// A from-scratch tiny MedTVT saved as a checkpoint, built in this process: the policy a GRPO
/// job starts from, without running PT and SFT jobs first.
fn initial_checkpoint(root: &Path, data: &Path) -> PathBuf {
    let path = config_with_cluster(
        root,
        "init",
        "pt",
        data,
        None,
        "steps = 1\nbatch_size = 4\nlearning_rate = 0.001\n",
        &one_learner(60.0),
        "",
    );
    let cfg = medtvt_config::load_run_config(&path, &[]).unwrap();
    let samples = medtvt_data::read_jsonl(&data.join("qa.jsonl")).unwrap();
    let texts: Vec<String> = samples.into_iter().flat_map(|s| [s.question, s.answer]).collect();
    let tokenizer = root.join("init-tokenizer.json");
    MedTvtPolicy::train_tokenizer(&texts, cfg.model.tiny.vocab_size, &tokenizer).unwrap();
    tch::manual_seed(5);
    let policy = MedTvtPolicy::load(&cfg, tch::Device::Cpu, Some(&tokenizer)).unwrap();
    let dir = root.join("init");
    policy.save(&dir).unwrap();
    dir
}

/// A GRPO job for one learner: 2 prompts x 2 completions per step, no reference model.
fn grpo_config(
    root: &Path,
    data: &Path,
    checkpoint: &Path,
    steps: u64,
    checkpoint_every: u64,
    lease_timeout_s: f64,
) -> PathBuf {
    let train = format!(
        "steps = {steps}\nlearning_rate = 0.001\ngrad_accumulation = 1\ncheckpoint_every = {checkpoint_every}\n"
    );
    let grpo = "\n[grpo]\ngroup_size = 2\nprompts_per_step = 2\nmax_new_tokens = 8\nbeta = 0.0\nmax_staleness = 2\n";
    config_with_cluster(root, "grpo", "grpo", data, Some(checkpoint), &train, &one_learner(lease_timeout_s), grpo)
}

fn trainer_state(checkpoint: &Path) -> medtvt_learner::checkpoint::TrainerState {
    serde_json::from_str(&std::fs::read_to_string(checkpoint.join("trainer_state.json")).unwrap()).unwrap()
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

#[test]
fn a_killed_rollout_worker_loses_no_prompt() {
    scenario(
        "(a) kill -9 a rollout worker while it holds a lease",
        "its prompts are re-leased after the lease expires; each step's groups trained exactly once; job succeeds",
        || {
            let tmp = tempfile::tempdir().unwrap();
            let root = tmp.path();
            let data = dataset(root);
            let steps = 3;
            let cfg = grpo_config(root, &data, &initial_checkpoint(root, &data), steps, 0, 5.0);
            let rt = runtime();
            let (_coordinator, url) = start_coordinator(root, &[&cfg]);
            let _learner = learner(&url, 0, 1, root);
            let victim = worker(&url, "worker-a", root);
            let every = Duration::from_millis(20);
            let held = wait_for_every(&rt, &url, 1, root, Duration::from_secs(120), every, |s| {
                s.leased_prompts_outstanding > 0
            });
            victim.kill();
            // Nobody works on the job until the lease expires and a second worker joins.
            wait_for(&rt, &url, 1, root, Duration::from_secs(30), |s| s.leases_expired >= 1);
            let _rescuer = worker(&url, "worker-b", root);
            let status = wait_for(&rt, &url, 1, root, Duration::from_secs(180), succeeded);
            assert_eq!(status.step, steps);
            assert_eq!(status.groups_trained, steps * 2, "{status:#?}");
            assert!(read(&root.join("worker-b.log")).contains("groups submitted"));
            format!(
                "{} prompt(s) held by the killed worker; {} lease(s) expired; {} prompts leased in all; {} groups trained in {} steps (2 per step); SUCCEEDED",
                held.leased_prompts_outstanding, status.leases_expired, status.prompts_leased, status.groups_trained, status.step
            )
        },
    );
}

#[test]
fn a_killed_learner_resumes_and_trains_exactly_the_planned_steps() {
    scenario(
        "(b) kill -9 the learner mid-run, restart it with the same arguments",
        "it resumes from its last checkpoint; the run ends after exactly train.steps optimizer steps",
        || {
            let tmp = tempfile::tempdir().unwrap();
            let root = tmp.path();
            let data = dataset(root);
            let steps = 5;
            let cfg = grpo_config(root, &data, &initial_checkpoint(root, &data), steps, 2, 60.0);
            let rt = runtime();
            let (_coordinator, url) = start_coordinator(root, &[&cfg]);
            let first = learner(&url, 0, 1, root);
            let _worker = worker(&url, "worker-a", root);
            let killed_at = wait_for(&rt, &url, 1, root, Duration::from_secs(150), |s| s.step >= 3).step;
            first.kill();
            let checkpoints = root.join("grpo").join("checkpoints");
            let before = checkpoint_steps(&checkpoints);
            let resume_from = *before.last().expect("a checkpoint before the kill");

            let again = root.join("restarted");
            std::fs::create_dir_all(&again).unwrap();
            let _second = learner(&url, 0, 1, &again);
            let status = wait_for(&rt, &url, 1, &again, Duration::from_secs(180), succeeded);
            let log = read(&again.join("learner-0.log"));
            assert!(
                log.contains("resumed from checkpoint") && log.contains(&format!("step-{resume_from:08}")),
                "{log}"
            );
            let last = trainer_state(&medtvt_learner::checkpoint::step_dir(&checkpoints, steps));
            assert_eq!((status.step, last.step, last.adam_steps), (steps, steps, steps), "{status:#?}");
            assert_eq!(status.groups_trained, steps * 2);
            let records = metrics(&root.join("grpo").join("metrics.jsonl"));
            assert_eq!(records.last().map(|r| r.step), Some(steps - 1));
            format!(
                "killed at step {killed_at}; resumed from checkpoint step {resume_from}; final checkpoint: step {} with {} AdamW steps; {} groups trained; SUCCEEDED",
                last.step, last.adam_steps, status.groups_trained
            )
        },
    );
}

#[test]
fn a_killed_coordinator_restarts_and_its_processes_reconnect() {
    scenario(
        "(c) kill -9 the coordinator mid-run, restart it (same --run-dir and port)",
        "learner and worker register again on their own; the job resumes and finishes",
        || {
            let tmp = tempfile::tempdir().unwrap();
            let root = tmp.path();
            let data = dataset(root);
            let steps = 4;
            let cfg = grpo_config(root, &data, &initial_checkpoint(root, &data), steps, 0, 30.0);
            let rt = runtime();
            let (first, url) = start_coordinator(root, &[&cfg]);
            let _learner = learner(&url, 0, 1, root);
            let _worker = worker(&url, "worker-a", root);
            let killed_at = wait_for(&rt, &url, 1, root, Duration::from_secs(150), |s| s.step >= 1).step;
            first.kill();
            std::thread::sleep(Duration::from_secs(1));
            let (_second, url_again) = start_coordinator_with(root, &[&cfg], host_port(&url), &[]);
            assert_eq!(url_again, url);
            let status = wait_for(&rt, &url, 1, root, Duration::from_secs(180), succeeded);
            assert_eq!((status.step, status.groups_trained), (steps, steps * 2), "{status:#?}");
            let coordinator_log = read(&root.join("coordinator.log"));
            assert!(coordinator_log.contains("resum"), "the second coordinator resumed the run:\n{coordinator_log}");
            // The learner's training calls carry no worker id: its heartbeat (every 5 s here)
            // is what registers it again, possibly after the job ended.
            let deadline = Instant::now() + Duration::from_secs(20);
            let workers = loop {
                let workers = run_status(&rt, &url, None).workers;
                if workers.len() >= 2 || Instant::now() > deadline {
                    break workers;
                }
                std::thread::sleep(Duration::from_millis(200));
            };
            let mut names: Vec<&str> = workers.iter().map(|w| w.name.as_str()).collect();
            names.sort();
            assert_eq!(names.len(), 2, "exactly the two processes, registered once each: {workers:?}");
            let again: Vec<&str> = ["learner-0", "worker-a"]
                .into_iter()
                .filter(|name| read(&root.join(format!("{name}.log"))).contains("registered again"))
                .collect();
            assert_eq!(again, ["learner-0", "worker-a"], "{}", logs(root));
            format!(
                "killed at step {killed_at}; learner and worker registered again ({} members after the restart); {} steps, {} groups trained; SUCCEEDED",
                workers.len(), status.step, status.groups_trained
            )
        },
    );
}

#[test]
fn a_worker_with_a_wrong_token_is_refused() {
    scenario(
        "(d) a rollout worker starts with a wrong auth token",
        "refused with UNAUTHENTICATED, exits non-zero, never counted as a worker",
        || {
            let tmp = tempfile::tempdir().unwrap();
            let root = tmp.path();
            let (right, wrong) = (root.join("token"), root.join("wrong-token"));
            std::fs::write(&right, "chaos-secret-1\n").unwrap();
            std::fs::write(&wrong, "not-the-secret\n").unwrap();
            let token_flag = ["--auth-token-file", right.to_str().unwrap()];
            let (_coordinator, url) = start_coordinator_with(root, &[], "127.0.0.1:0", &token_flag);
            let mut intruder = worker_with(&url, "intruder", root, &["--auth-token-file", wrong.to_str().unwrap()]);
            let exit = intruder.wait_exit(Duration::from_secs(60));
            assert!(!exit.success(), "the intruder exited with {exit}");
            let log = read(&root.join("intruder.log"));
            assert!(log.contains("UNAUTHENTICATED") && log.contains("refused"), "{log}");
            assert!(!log.contains("not-the-secret"), "the token never reaches a log");

            // The same worker with the right token is let in: the refusal was the token's doing.
            let _member = worker_with(&url, "member", root, &token_flag);
            let rt = runtime();
            let deadline = Instant::now() + Duration::from_secs(60);
            let names = loop {
                let names: Vec<String> =
                    run_status(&rt, &url, Some("chaos-secret-1")).workers.into_iter().map(|w| w.name).collect();
                if !names.is_empty() || Instant::now() > deadline {
                    break names;
                }
                std::thread::sleep(Duration::from_millis(100));
            };
            assert_eq!(names, ["member"]);
            format!(
                "intruder exited with code {} saying it was refused (UNAUTHENTICATED); workers known: {names:?}",
                exit.code().unwrap_or(-1)
            )
        },
    );
}

#[test]
fn a_corrupt_checkpoint_is_detected_and_the_previous_one_used() {
    scenario(
        "(e) flip bytes in the newest checkpoint's weights, restart the learner",
        "the checksum mismatch is reported; it resumes from the previous checkpoint and finishes",
        || {
            let tmp = tempfile::tempdir().unwrap();
            let root = tmp.path();
            let data = dataset(root);
            let steps = 8;
            let train = format!(
                "steps = {steps}\nbatch_size = 4\nlearning_rate = 0.003\nwarmup_steps = 0\ncheckpoint_every = 2\n"
            );
            let cfg = config_with_cluster(root, "pt", "pt", &data, None, &train, &one_learner(60.0), "");
            let rt = runtime();
            let (_coordinator, url) = start_coordinator(root, &[&cfg]);
            let first = learner(&url, 0, 1, root);
            wait_for(&rt, &url, 1, root, Duration::from_secs(150), |s| s.step >= 5);
            first.kill();
            let checkpoints = root.join("pt").join("checkpoints");
            let saved = checkpoint_steps(&checkpoints);
            assert!(saved.len() >= 2, "two checkpoints before the kill: {saved:?}");
            let (previous, newest) = (saved[saved.len() - 2], saved[saved.len() - 1]);
            let victim = medtvt_learner::checkpoint::step_dir(&checkpoints, newest).join("weights.safetensors");
            let mut bytes = std::fs::read(&victim).unwrap();
            let middle = bytes.len() / 2;
            for b in &mut bytes[middle..middle + 16] {
                *b ^= 0xa5;
            }
            std::fs::write(&victim, bytes).unwrap();

            let again = root.join("restarted");
            std::fs::create_dir_all(&again).unwrap();
            let _second = learner(&url, 0, 1, &again);
            let status = wait_for(&rt, &url, 1, &again, Duration::from_secs(150), succeeded);
            let log = read(&again.join("learner-0.log"));
            assert!(
                log.contains("skipping an unusable checkpoint") && log.contains("weights.safetensors is corrupt"),
                "{log}"
            );
            assert!(log.contains(&format!("step-{previous:08}")) && log.contains("resumed from checkpoint"), "{log}");
            let last = trainer_state(&medtvt_learner::checkpoint::step_dir(&checkpoints, steps));
            assert_eq!((status.step, last.step), (steps, steps));
            format!("checkpoint step {newest} reported corrupt (sha256 mismatch); resumed from step {previous}; finished at step {}; SUCCEEDED", last.step)
        },
    );
}

/// How a file is broken.
#[derive(Debug, Clone, Copy)]
enum Damage {
    TruncatedDat,
    GarbageHea,
    CorruptPng,
    BadLabRow,
}

/// Breaks one referenced file (`rel` is the sample's field value) and returns the path that a
/// report must name.
fn damage(data: &Path, rel: &str, how: Damage) -> PathBuf {
    match how {
        Damage::TruncatedDat => {
            let path = data.join(format!("{rel}.dat"));
            let bytes = std::fs::read(&path).unwrap();
            std::fs::write(&path, &bytes[..bytes.len() / 3]).unwrap();
            path
        }
        Damage::GarbageHea => {
            let path = data.join(format!("{rel}.hea"));
            std::fs::write(&path, "this is not a WFDB header\n12 x y z\n").unwrap();
            path
        }
        Damage::CorruptPng => {
            let path = data.join(rel);
            let mut bytes = std::fs::read(&path).unwrap();
            // Keep the signature, scramble the chunks.
            for b in &mut bytes[8..] {
                *b = b.wrapping_mul(31).wrapping_add(7);
            }
            std::fs::write(&path, bytes).unwrap();
            path
        }
        Damage::BadLabRow => {
            let path = data.join(rel);
            let text = std::fs::read_to_string(&path).unwrap();
            let mut lines: Vec<&str> = text.lines().collect();
            let fields = lines[0].split(',').count();
            let bad = vec!["not-a-number"; fields].join(",");
            lines.insert(1, &bad);
            std::fs::write(&path, lines.join("\n") + "\n").unwrap();
            path
        }
    }
}

#[test]
fn a_dataset_with_five_percent_broken_files_skips_exactly_their_samples() {
    scenario(
        "(f) 5 % of a dataset's files broken (truncated .dat, garbage .hea, corrupt PNG, bad lab row)",
        "exactly the samples naming them are skipped and reported (id, file, problem) and counted; the job trains; data.strict refuses it",
        || {
            let tmp = tempfile::tempdir().unwrap();
            let root = tmp.path();
            let data = dataset_of(root, 40);
            let samples = medtvt_data::read_jsonl(&data.join("qa.jsonl")).unwrap();
            // Every referenced file (an ECG record counts once), and those the PT job reads.
            let mut referenced = BTreeSet::new();
            let mut trained: BTreeMap<&str, Vec<String>> = BTreeMap::new();
            for s in &samples {
                for (kind, file) in [("ecg", &s.ecg), ("cxr", &s.cxr), ("lab", &s.lab)] {
                    if let Some(file) = file {
                        referenced.insert(file.clone());
                        if s.split == medtvt_data::Split::Train {
                            trained.entry(kind).or_default().push(file.clone());
                        }
                    }
                }
            }
            let broken_count = referenced.len() / 20;
            assert!(broken_count >= 4, "{} files referenced", referenced.len());
            let plan = [(Damage::TruncatedDat, "ecg"), (Damage::CorruptPng, "cxr"), (Damage::BadLabRow, "lab"), (Damage::GarbageHea, "ecg")];
            let encounter_of: BTreeMap<&str, &str> = samples
                .iter()
                .flat_map(|s| [&s.ecg, &s.cxr, &s.lab].into_iter().flatten().map(|f| (f.as_str(), s.encounter_id.as_str())))
                .collect();
            let mut broken: BTreeMap<String, PathBuf> = BTreeMap::new();
            let mut hit_encounters = BTreeSet::new();
            for i in 0..broken_count {
                let (how, kind) = plan[i % plan.len()];
                let pool = &trained[kind];
                // Spread the victims over the set, one per encounter.
                let rel = (0..pool.len())
                    .map(|k| &pool[(k * 7 + 3 * i + 1) % pool.len()])
                    .find(|f| !hit_encounters.contains(encounter_of[f.as_str()]))
                    .expect("an encounter not hit yet")
                    .clone();
                hit_encounters.insert(encounter_of[rel.as_str()]);
                broken.insert(rel.clone(), damage(&data, &rel, how));
            }
            assert_eq!(broken.len() * 20, referenced.len() - referenced.len() % 20);
            let expected: BTreeMap<String, &PathBuf> = samples
                .iter()
                .filter(|s| s.split == medtvt_data::Split::Train && s.kind == medtvt_data::QaKind::Physiological)
                .filter_map(|s| {
                    [&s.ecg, &s.cxr, &s.lab].into_iter().flatten().find_map(|f| broken.get(f)).map(|path| (s.id.clone(), path))
                })
                .collect();
            assert_eq!(expected.len(), broken.len(), "one physiological train sample per broken file");

            let train = "steps = 2\nbatch_size = 4\nlearning_rate = 0.003\nwarmup_steps = 0\n";
            let cfg = config_with_cluster(root, "pt", "pt", &data, None, train, &one_learner(60.0), "");
            // Strict: the coordinator refuses the job at the first broken sample and exits.
            let strict_dir = root.join("strict");
            std::fs::create_dir_all(&strict_dir).unwrap();
            let log = strict_dir.join("coordinator.log");
            let cfg_arg = cfg.display().to_string();
            let mut strict = spawn("strict-coordinator", &["coordinator", "--listen", "127.0.0.1:0", "--config", &cfg_arg, "--set", "data.strict=true"], &log);
            let exit = strict.wait_exit(Duration::from_secs(60));
            let text = read(&log);
            let first = samples.iter().find(|s| expected.contains_key(&s.id)).map(|s| s.id.clone()).unwrap_or_default();
            assert!(!exit.success() && text.contains(&format!("sample {first}:")) && text.contains("data.strict"), "{exit}: {text}");
            assert!(text.contains(expected[&first].to_str().unwrap()), "{text}");

            // Default: skip and count, and the job trains on the rest.
            let rt = runtime();
            let (_coordinator, url) = start_coordinator(root, &[&cfg]);
            let _learner = learner(&url, 0, 1, root);
            let status = wait_for(&rt, &url, 1, root, Duration::from_secs(150), succeeded);
            assert_eq!(status.samples_skipped, expected.len() as u64, "{status:#?}");
            let events = read(&root.join("events.jsonl"));
            let mut reported: BTreeMap<String, String> = BTreeMap::new();
            for line in events.lines() {
                let v: serde_json::Value = serde_json::from_str(line).unwrap();
                let record = &v["record"];
                if record["event"] == "sample_skipped" {
                    reported.insert(record["sample"].as_str().unwrap().to_string(), record["problem"].as_str().unwrap().to_string());
                }
            }
            assert_eq!(reported.keys().collect::<Vec<_>>(), expected.keys().collect::<Vec<_>>());
            for (id, problem) in &reported {
                assert!(problem.contains(expected[id].to_str().unwrap()), "{id}: {problem}");
            }
            format!(
                "{} of {} files broken; {} PT samples named them, all {} reported by id with file and problem; job SUCCEEDED; the strict run refused the job at sample {first} and exited with code {}",
                broken.len(),
                referenced.len(),
                expected.len(),
                reported.len(),
                exit.code().unwrap_or(-1)
            )
        },
    );
}

// ───────────── Losing a learner rank (issue #15) ─────────────

const LOSS_STEPS: u64 = 6;
/// `cluster.collective_timeout_s` of the learner-loss scenarios.
const COLLECTIVE_TIMEOUT_S: f64 = 4.0;

/// A GRPO job for two learners and one rollout worker that survives losing a learner under
/// `policy`: 2 prompts x 2 completions per step, a checkpoint every 2 steps.
fn two_learner_grpo(root: &Path, data: &Path, checkpoint: &Path, policy: &str) -> PathBuf {
    let train = format!("steps = {LOSS_STEPS}\nlearning_rate = 0.001\ngrad_accumulation = 1\ncheckpoint_every = 2\n");
    let cluster = format!(
        "learners = 2\nrollout_workers = 1\nlease_timeout_s = 30.0\nheartbeat_timeout_s = 4.0\n\
         collective_timeout_s = {COLLECTIVE_TIMEOUT_S:.1}\non_learner_loss = \"{policy}\"\nreplacement_timeout_s = 30.0\n"
    );
    let grpo = "\n[grpo]\ngroup_size = 2\nprompts_per_step = 2\nmax_new_tokens = 8\nbeta = 0.0\nmax_staleness = 2\n";
    config_with_cluster(root, "grpo", "grpo", data, Some(checkpoint), &train, &cluster, grpo)
}

/// The coordinator's events (`events.jsonl`) of one kind, as JSON records.
fn events_of(root: &Path, kind: &str) -> Vec<serde_json::Value> {
    read(&root.join("events.jsonl"))
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .map(|v| v["record"].clone())
        .filter(|r| r["event"] == kind)
        .collect()
}

/// Waits until `path` contains `needle`; the time it first did (polled every 20 ms).
fn wait_log(path: &Path, needle: &str, limit: Duration) -> Instant {
    let deadline = Instant::now() + limit;
    loop {
        if read(path).contains(needle) {
            return Instant::now();
        }
        assert!(Instant::now() < deadline, "{} never said `{needle}`:\n{}", path.display(), read(path));
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The invariants of issue #15 after a run that lost a learner: the job succeeded after exactly
/// train.steps optimizer steps (coordinator, final checkpoint, AdamW count); every step completed
/// once, so each of its sealed groups was trained in exactly one completed step (2 per step); the
/// policy versions the steps completed with never went down; the learner group re-formed. Returns
/// a summary for the table.
fn learner_loss_invariants(root: &Path, status: &medtvt_proto::v1::JobStatus) -> String {
    assert!(succeeded(status), "{status:#?}");
    let checkpoints = root.join("grpo").join("checkpoints");
    let last = trainer_state(&medtvt_learner::checkpoint::step_dir(&checkpoints, LOSS_STEPS));
    assert_eq!((status.step, last.step, last.adam_steps), (LOSS_STEPS, LOSS_STEPS, LOSS_STEPS), "{status:#?}");
    assert_eq!(status.groups_trained, LOSS_STEPS * 2, "{status:#?}");
    let completed = events_of(root, "step_completed");
    let steps: Vec<u64> = completed.iter().map(|e| e["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, (0..LOSS_STEPS).collect::<Vec<_>>(), "each step completed exactly once, in order");
    let versions: Vec<u64> = completed.iter().map(|e| e["policy_version"].as_u64().unwrap()).collect();
    assert!(versions.windows(2).all(|w| w[0] <= w[1]), "policy versions went down: {versions:?}");
    let formed = events_of(root, "learner_group_formed");
    assert!(formed.len() >= 2, "the group formed at the start and again after the loss: {formed:?}");
    let records = metrics(&root.join("grpo").join("metrics.jsonl"));
    assert_eq!(records.last().map(|r| r.step), Some(LOSS_STEPS - 1));
    format!(
        "{} steps, {} AdamW steps in the final checkpoint; steps 0..{} completed once each; {} groups trained (2 per step), {} dropped as stale; policy versions {:?}; learner group epoch {} at the end",
        status.step,
        last.adam_steps,
        LOSS_STEPS,
        status.groups_trained,
        status.groups_dropped_stale,
        versions,
        status.group_epoch
    )
}

/// Starts coordinator, two learners (`shrink`/`wait` as `policy`) and one rollout worker on a GRPO
/// job and waits until `at_step` steps are done.
struct LossRun {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    rt: tokio::runtime::Runtime,
    url: String,
    _coordinator: Proc,
    learners: Vec<Option<Proc>>,
    _worker: Proc,
}

impl LossRun {
    fn start(policy: &str, at_step: u64) -> LossRun {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().to_path_buf();
        let data = dataset(&root);
        let cfg = two_learner_grpo(&root, &data, &initial_checkpoint(&root, &data), policy);
        let rt = runtime();
        let (coordinator, url) = start_coordinator(&root, &[&cfg]);
        let learners = vec![Some(learner(&url, 0, 2, &root)), Some(learner(&url, 1, 2, &root))];
        let worker = worker(&url, "worker-a", &root);
        wait_for(&rt, &url, 1, &root, Duration::from_secs(150), |s| s.step >= at_step);
        LossRun { _tmp: tmp, root, rt, url, _coordinator: coordinator, learners, _worker: worker }
    }

    /// The phase learner `rank`'s last heartbeat reported (what it was doing).
    fn phase_of(&self, rank: u32) -> String {
        let status = run_status(&self.rt, &self.url, None);
        let learner = status.workers.iter().find(|w| w.rank == rank && w.name.starts_with("learner"));
        learner.map(|w| format!("{} of step {}", w.phase, w.step)).unwrap_or_default()
    }

    fn log(&self, rank: usize) -> PathBuf {
        self.root.join(format!("learner-{rank}.log"))
    }

    fn wait_succeeded(&self) -> medtvt_proto::v1::JobStatus {
        wait_for(&self.rt, &self.url, 1, &self.root, Duration::from_secs(180), succeeded)
    }

    /// Waits until the group re-formed (epoch 2 or later); the time it did.
    fn wait_regrouped(&self) -> (Instant, medtvt_proto::v1::JobStatus) {
        let every = Duration::from_millis(50);
        let status =
            wait_for_every(&self.rt, &self.url, 1, &self.root, Duration::from_secs(120), every, |s| s.group_epoch >= 2);
        (Instant::now(), status)
    }
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

#[test]
fn a_learner_killed_mid_step_leaves_the_survivor_training_alone() {
    scenario(
        "(g) GRPO with a rollout worker sampling: kill -9 learner rank 1 of 2 mid-run (on_learner_loss = shrink)",
        "rank 0 detects it, re-forms a group of 1, redoes the interrupted step on the whole batch; the worker keeps sampling; exactly train.steps steps, each group trained once, versions monotonic",
        || {
            let mut run = LossRun::start("shrink", 2);
            let phase = run.phase_of(1);
            let killed = Instant::now();
            run.learners[1].take().unwrap().kill();
            let detected = wait_log(&run.log(0), "the learner group broke", Duration::from_secs(60));
            let (recovered, regrouped) = run.wait_regrouped();
            assert!(regrouped.learners == 1 && regrouped.learners_lost >= 1, "{regrouped:#?}");
            let status = run.wait_succeeded();
            let summary = learner_loss_invariants(&run.root, &status);
            assert!(read(&run.root.join("worker-a.log")).contains("groups submitted"));
            format!(
                "killed in `{phase}`; detected in {:.1} s, group of 1 formed {:.1} s after the kill; {summary}; SUCCEEDED",
                secs(detected - killed),
                secs(recovered - killed)
            )
        },
    );
}

#[test]
fn a_stopped_learner_is_detected_within_twice_the_collective_timeout() {
    scenario(
        "(h) SIGSTOP learner rank 1 of 2 mid-run (shrink, collective_timeout_s = 4)",
        "rank 0's collective times out (within 2 x 4 s), the stopped rank is left out, the survivor finishes the run",
        || {
            let run = LossRun::start("shrink", 2);
            let pid = run.learners[1].as_ref().unwrap().child.id();
            let stopped = Instant::now();
            assert!(std::process::Command::new("kill").args(["-STOP", &pid.to_string()]).status().unwrap().success());
            let detected = wait_log(&run.log(0), "the learner group broke", Duration::from_secs(60));
            let (recovered, regrouped) = run.wait_regrouped();
            assert!(
                secs(detected - stopped) <= 2.0 * COLLECTIVE_TIMEOUT_S,
                "detected after {:.1} s",
                secs(detected - stopped)
            );
            assert_eq!(regrouped.learners, 1, "{regrouped:#?}");
            let status = run.wait_succeeded();
            let summary = learner_loss_invariants(&run.root, &status);
            format!(
                "detected in {:.1} s (limit {:.0} s), group of 1 formed {:.1} s after the stop; {summary}; SUCCEEDED",
                secs(detected - stopped),
                2.0 * COLLECTIVE_TIMEOUT_S,
                secs(recovered - stopped)
            )
        },
    );
}

#[test]
fn losing_rank_zero_moves_its_duties_to_the_survivor() {
    scenario(
        "(i) kill -9 learner rank 0 of 2 mid-run (shrink)",
        "rank 1 becomes rank 0 of a group of 1 from its memory, publishes weights, writes metrics and checkpoints, finishes the job",
        || {
            let mut run = LossRun::start("shrink", 2);
            let phase = run.phase_of(0);
            let killed = Instant::now();
            run.learners[0].take().unwrap().kill();
            let detected = wait_log(&run.log(1), "the learner group broke", Duration::from_secs(60));
            let (recovered, regrouped) = run.wait_regrouped();
            assert_eq!(regrouped.learners, 1, "{regrouped:#?}");
            let status = run.wait_succeeded();
            let summary = learner_loss_invariants(&run.root, &status);
            assert!(status.message.contains("final"), "{status:#?}");
            format!(
                "killed in `{phase}`; detected in {:.1} s, rank 1 took rank 0's place {:.1} s after the kill; {summary}; SUCCEEDED",
                secs(detected - killed),
                secs(recovered - killed)
            )
        },
    );
}

#[test]
fn wait_takes_a_replacement_started_five_seconds_later() {
    scenario(
        "(j) kill -9 learner rank 1 of 2, start a replacement rank 1 5 s later (on_learner_loss = wait)",
        "the job is held until the replacement joins; it takes rank 0's state; the group of 2 finishes with identical weights on both ranks",
        || replacement_rejoins("wait"),
    );
}

#[test]
fn a_replacement_grows_a_shrunk_group_back() {
    scenario(
        "(k) kill -9 learner rank 1 of 2 (shrink), start a replacement rank 1 5 s later",
        "rank 0 trains alone meanwhile; the replacement grows the group back to 2 at a step boundary; identical final weights on both ranks",
        || replacement_rejoins("shrink"),
    );
}

/// Kills learner rank 1, starts a replacement 5 s later and checks that it joins the group.
fn replacement_rejoins(policy: &str) -> String {
    // Lost at step 1, so that the replacement (loading takes seconds) joins well before the end.
    let mut run = LossRun::start(policy, 1);
    let killed = Instant::now();
    run.learners[1].take().unwrap().kill();
    if policy == "shrink" {
        // The survivor carries on alone first.
        let (_, shrunk) = run.wait_regrouped();
        assert_eq!(shrunk.learners, 1, "{shrunk:#?}");
    }
    std::thread::sleep(Duration::from_secs(5).saturating_sub(killed.elapsed()));
    let again = run.root.join("replacement");
    std::fs::create_dir_all(&again).unwrap();
    run.learners[1] = Some(learner(&run.url, 1, 2, &again));
    let every = Duration::from_millis(50);
    let regrouped = wait_for_every(&run.rt, &run.url, 1, &run.root, Duration::from_secs(120), every, |s| {
        s.group_epoch >= if policy == "shrink" { 3 } else { 2 } && s.learners == 2
    });
    let recovered = Instant::now();
    assert!(policy == "wait" || regrouped.learners_lost >= 1, "{regrouped:#?}");
    let status = run.wait_succeeded();
    let summary = learner_loss_invariants(&run.root, &status);
    let out = run.root.join("grpo");
    assert_eq!(rank_digest(&out, 0), rank_digest(&out, 1), "both ranks end with the same weights");
    let alone = if policy == "wait" { "held" } else { "trained alone" };
    format!(
        "{alone} until the group of 2 formed again {:.1} s after the kill (group epoch {}; the replacement started at 5 s); final weights identical on both ranks; {summary}; SUCCEEDED",
        secs(recovered - killed),
        regrouped.group_epoch
    )
}

#[test]
fn a_pt_job_reshards_its_batch_over_the_survivor() {
    scenario(
        "(l) PT job: kill -9 learner rank 1 of 2 mid-run (shrink)",
        "rank 0 trains the same 4-sample batches alone from its memory; exactly train.steps steps, each completed once",
        || {
            let tmp = tempfile::tempdir().unwrap();
            let root = tmp.path();
            let data = dataset(root);
            let steps = 12;
            let train = format!(
                "steps = {steps}\nbatch_size = 4\nlearning_rate = 0.003\nwarmup_steps = 0\ncheckpoint_every = 4\n"
            );
            let cluster = format!(
                "learners = 2\nrollout_workers = 1\nheartbeat_timeout_s = 4.0\ncollective_timeout_s = {COLLECTIVE_TIMEOUT_S:.1}\n\
                 on_learner_loss = \"shrink\"\n"
            );
            let cfg = config_with_cluster(root, "pt", "pt", &data, None, &train, &cluster, "");
            let rt = runtime();
            let (_coordinator, url) = start_coordinator(root, &[&cfg]);
            let _rank0 = learner(&url, 0, 2, root);
            let rank1 = learner(&url, 1, 2, root);
            let killed_at = wait_for(&rt, &url, 1, root, Duration::from_secs(150), |s| s.step >= 3).step;
            let killed = Instant::now();
            rank1.kill();
            let detected = wait_log(&root.join("learner-0.log"), "the learner group broke", Duration::from_secs(60));
            let status = wait_for(&rt, &url, 1, root, Duration::from_secs(180), succeeded);
            // More than one loss or epoch: a re-forming for a rank that looked hung on a loaded machine.
            assert!(status.learners == 1 && status.learners_lost >= 1, "{status:#?}");
            let checkpoints = root.join("pt").join("checkpoints");
            let last = trainer_state(&medtvt_learner::checkpoint::step_dir(&checkpoints, steps));
            assert_eq!((status.step, last.step, last.adam_steps), (steps, steps, steps), "{status:#?}");
            let completed: Vec<u64> =
                events_of(root, "step_completed").iter().map(|e| e["step"].as_u64().unwrap()).collect();
            assert_eq!(completed, (0..steps).collect::<Vec<_>>());
            let records = metrics(&root.join("pt").join("metrics.jsonl"));
            let recorded: Vec<u64> = records.iter().map(|r| r.step).collect();
            assert_eq!(recorded, (0..steps).collect::<Vec<_>>(), "rank 0 survived: one record per step");
            assert!(records.iter().all(|r| r.values["samples"] == 4.0), "every step trained the whole batch");
            format!(
                "killed at step {killed_at}, detected in {:.1} s; {steps} steps with 4 samples each, {} AdamW steps, steps completed once each; learner group epoch {} at the end; SUCCEEDED",
                secs(detected - killed),
                last.adam_steps,
                status.group_epoch
            )
        },
    );
}
