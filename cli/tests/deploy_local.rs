//! The Kubernetes manifests, run for real on loopback: `deploy/render.py local-commands` turns the
//! cpu-demo overlay into each container's exact argv, environment and working directory (config
//! maps and secrets as files, the shared volume as one folder); this test starts those processes
//! with the real `medtvt` binary and checks that the coordinator serves and that every rollout
//! worker and learner the manifests declare registers with it, token and all.

#[path = "../../model/tests/peers/mod.rs"]
mod peers;

use medtvt_model::MedTvt;
use medtvt_proto::v1::{Role, StatusRequest};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Processes(Vec<Child>);

impl Drop for Processes {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("cli/ has a parent").to_path_buf()
}

fn python() -> Option<PathBuf> {
    let py = repo_root().join(".venv/bin/python");
    let ok = Command::new(&py).args(["-c", "import yaml"]).status().map(|s| s.success()).unwrap_or(false);
    ok.then_some(py)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("a free port")
}

/// A tiny SFT checkpoint where the GRPO config of the overlay expects one.
fn write_checkpoint(data_dir: &Path, out: &Path) {
    let samples = medtvt_data::read_jsonl(&data_dir.join("qa.jsonl")).expect("synthetic qa.jsonl reads");
    let texts: Vec<String> = samples.iter().flat_map(|s| [s.question.clone(), s.answer.clone()]).collect();
    let tokenizer = MedTvt::train_tiny_tokenizer(&texts, 400).expect("tokenizer trains");
    let config = format!(
        r#"
        [run]
        name = "ckpt"
        stage = "sft"
        out_dir = "{out}"
        [data]
        dir = "{data}"
        [model]
        device = "cpu"
        [model.tiny]
        hidden_size = 32
        intermediate_size = 64
        num_layers = 1
        num_heads = 4
        num_kv_heads = 2
        image_size = 32
        vit_patch_size = 16
        vit_depth = 1
        ecg_resnet_blocks = 1
        [train]
        steps = 1
        learning_rate = 1e-3
        "#,
        out = out.display(),
        data = data_dir.display()
    );
    let cfg = medtvt_config::parse_run_config(&config, Path::new("test.toml"), &[]).expect("checkpoint config parses");
    let model = MedTvt::from_run_config(&cfg, tch::Device::Cpu, Some(tokenizer)).expect("tiny model builds");
    model.save(out).expect("checkpoint saves");
}

#[test]
fn cpu_demo_overlay_processes_start_and_connect() {
    let Some(py) = python() else {
        peers::peer_missing(".venv with pyyaml not found (make test installs scripts/requirements-deploy.txt)");
        return;
    };
    let root = tempfile::tempdir().expect("temp dir");
    let port = free_port();
    let medtvt = env!("CARGO_BIN_EXE_medtvt");
    let rendered = Command::new(&py)
        .current_dir(repo_root())
        .args(["deploy/render.py", "local-commands", "deploy/k8s/overlays/cpu-demo", "--root"])
        .arg(root.path())
        .args(["--port", &format!("50051={port}"), "--auth-token", "s3cret-test-token"])
        .output()
        .expect("render.py runs");
    assert!(rendered.status.success(), "render.py failed: {}", String::from_utf8_lossy(&rendered.stderr));
    let pods: Vec<serde_json::Value> = serde_json::from_slice(&rendered.stdout).expect("render.py prints JSON");

    // The GRPO config needs its data and the SFT checkpoint on the shared volume.
    let runs = root.path().join("volumes/medtvt-shared/runs");
    let data = runs.join("demo/data");
    let synth = Command::new(medtvt)
        .args(["data", "synth", "--n", "12", "--seed", "1", "--image-size", "32", "--quiet", "--out"])
        .arg(&data)
        .output()
        .expect("medtvt data synth runs");
    assert!(synth.status.success(), "synth failed: {}", String::from_utf8_lossy(&synth.stderr));
    write_checkpoint(&data, &runs.join("demo/sft/final"));

    let mut processes = Processes(Vec::new());
    let mut expected_workers = 0;
    let mut expected_learners = 0;
    let mut coordinator_stdout = None;
    for pod in &pods {
        let argv: Vec<String> =
            pod["argv"].as_array().expect("argv").iter().map(|a| a.as_str().expect("string arg").to_string()).collect();
        let env = pod["env"].as_object().expect("env");
        // render.py maps absolute paths under the pods' mounts (e.g. /tmp), so the binary is
        // substituted here rather than passed with --binary.
        assert_eq!(argv[0], "medtvt", "the manifests run the medtvt binary");
        let mut cmd = Command::new(medtvt);
        cmd.args(&argv[1..]).current_dir(pod["cwd"].as_str().expect("cwd")).env_clear();
        cmd.env("PATH", std::env::var("PATH").unwrap_or_default());
        for (k, v) in env {
            cmd.env(k, v.as_str().expect("env values are strings"));
        }
        let role = pod["role"].as_str().expect("role");
        match role {
            "coordinator" => {
                cmd.stdout(Stdio::piped());
            }
            "rollout-worker" => expected_workers += 1,
            "learner" => expected_learners += 1,
            _ => {}
        }
        if role == "otel-collector" {
            continue; // not a medtvt process
        }
        let mut child = cmd.stderr(Stdio::null()).spawn().unwrap_or_else(|e| panic!("starting {argv:?}: {e}"));
        if role == "coordinator" {
            coordinator_stdout = child.stdout.take();
        }
        processes.0.push(child);
    }
    assert!(expected_workers >= 1 && expected_learners >= 1, "the overlay declares workers and learners");

    let stdout = coordinator_stdout.expect("the overlay has a coordinator");
    let mut first = String::new();
    BufReader::new(stdout).read_line(&mut first).expect("coordinator stdout");
    assert!(first.starts_with("coordinator listening on"), "coordinator said {first:?}");

    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    runtime.block_on(async {
        let url = format!("http://127.0.0.1:{port}");
        // Without the token the coordinator refuses.
        let mut anonymous = medtvt_proto::client::connect(&url, None).await.expect("connects");
        let refused = anonymous.get_status(StatusRequest { job_id: 0 }).await.expect_err("no token must be refused");
        assert_eq!(refused.code(), tonic::Code::Unauthenticated);

        let mut client = medtvt_proto::client::connect(&url, Some("s3cret-test-token")).await.expect("connects with token");
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let status = client.get_status(StatusRequest { job_id: 0 }).await.expect("status").into_inner();
            let alive = |role: Role| status.workers.iter().filter(|w| w.role == role as i32 && w.alive).count();
            let (workers, learners) = (alive(Role::RolloutWorker), alive(Role::Learner));
            if workers == expected_workers && learners == expected_learners {
                assert_eq!(status.jobs.len(), 1, "the overlay's config became one job");
                break;
            }
            assert!(
                Instant::now() < deadline,
                "after 120 s only {workers}/{expected_workers} workers and {learners}/{expected_learners} learners registered"
            );
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    });
}
