//! `medtvt train CONFIG` without `--coordinator`: the local cluster it starts accepts the jobs of
//! its own configs, whose paths lie outside the working directory (the coordinator's default job
//! root), because it passes them as `--job-root`.

mod common;

use common::*;
use std::process::Stdio;

#[test]
fn a_local_train_runs_configs_whose_paths_lie_outside_the_working_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("elsewhere");
    let cwd = tmp.path().join("cwd");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::create_dir_all(&cwd).unwrap();
    let data = dataset_of(&root, 4);
    let train = "steps = 1\nbatch_size = 2\nlearning_rate = 0.003\nwarmup_steps = 0\n";
    let cluster = "learners = 1\nrollout_workers = 1\nlease_timeout_s = 60.0\nheartbeat_timeout_s = 20.0\n";
    let config = config_with_cluster(&root, "pt", "pt", &data, None, train, cluster, "");
    let out = medtvt()
        .arg("train")
        .arg(&config)
        .current_dir(&cwd)
        .env_remove("MEDTVT_COORDINATOR")
        .env_remove("MEDTVT_JOB_ROOTS")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let logs = logs(&root.join("logs"));
    assert!(out.status.success(), "stdout:\n{stdout}\nstderr:\n{stderr}\n{logs}");
    assert!(stdout.contains("done, 1 steps"), "{stdout}");
    assert!(root.join("pt/final").is_dir(), "the checkpoint is where the config says");
}
