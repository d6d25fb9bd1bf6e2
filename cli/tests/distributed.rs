//! Cross-process tests of the training fabric: the real `medtvt` binary as coordinator, learners
//! and rollout workers on 127.0.0.1 (ephemeral ports), a synthetic dataset and a temporary run
//! directory, the tiny model shrunk further for speed. Every child is killed when its guard
//! drops, so a failing assertion never leaves processes behind.
//!
//! (a) a PT job on two learners lowers the loss and leaves both ranks with bit-identical weights;
//! (b) a GRPO job with two workers and two learners trains every accepted prompt group exactly once
//!     and reports rewards; (c) a worker that joins mid-run receives leases; (d) both learner ranks
//!     killed and restarted resume from the latest checkpoint; (e) a GRPO job submitted again
//!     into the same run.out_dir, whose learners resume at the first job's last step, is refused
//!     at once with the reason. The process helpers are shared with
//!     the fault-injection tests (`chaos.rs`) in `common/mod.rs`.

mod common;

use common::*;
use medtvt_proto::v1::{JobState, SubmitJobRequest};
use std::time::Duration;

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
    // Long enough that the worker joining after step 1 still finds prompts to lease (with 6 steps
    // the job sometimes ended before the late worker's first lease).
    let steps = 12;
    let grpo_text = grpo_config_text(root, &data, &root.join("pt").join("final"), steps);
    let job_id = rt.block_on(async {
        let mut client = medtvt_proto::client::connect(&url, None).await.unwrap();
        client
            .submit_job(SubmitJobRequest { config_toml: grpo_text.clone(), overrides: vec![] })
            .await
            .unwrap()
            .into_inner()
            .job_id
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
    assert!(late_log.contains("groups submitted"), "the late worker never submitted a group:\n{late_log}");

    // (e) The same GRPO config submitted again with more steps: the learners resume from the
    // first job's checkpoint at its last step, which the new job cannot continue. It is refused at once
    // (it used to wait forever for a step 6 it would never seal).
    let again = grpo_text.replace(&format!("steps = {steps}\n"), &format!("steps = {}\n", steps + 2));
    let submitted = std::time::Instant::now();
    let second = rt.block_on(async {
        let mut client = medtvt_proto::client::connect(&url, None).await.unwrap();
        client.submit_job(SubmitJobRequest { config_toml: again, overrides: vec![] }).await.unwrap().into_inner().job_id
    });
    let refused = wait_for(&rt, &url, second, root, Duration::from_secs(60), |s| s.state == JobState::Failed as i32);
    assert!(refused.message.contains("cannot continue another job's steps"), "{refused:#?}");
    assert_eq!(refused.step, 0);
    assert!(submitted.elapsed() < Duration::from_secs(60));
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
