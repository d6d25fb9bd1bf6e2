//! `medtvt coordinator` as a real process: it announces its real port on stdout, serves the
//! configs given on the command line, answers `medtvt status`, and exits cleanly on SIGTERM; it
//! refuses to listen beyond loopback without a token unless told `--insecure`, and then warns.

use medtvt_proto::v1 as pb;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_medtvt");

/// Kills the child if the test fails half-way.
struct Guard(std::process::Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn coordinator_process_announces_serves_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let lines: Vec<String> =
        (0..4).map(|i| format!(r#"{{"split":"train","kind":"physiological","id":{i}}}"#)).collect();
    std::fs::write(data.join("qa.jsonl"), lines.join("\n")).unwrap();
    let config = dir.path().join("pt.toml");
    std::fs::write(
        &config,
        format!(
            "[run]\nname = \"proc-pt\"\nstage = \"pt\"\nout_dir = \"out\"\n[data]\ndir = \"{}\"\n[model]\n\
             [train]\nsteps = 2\nbatch_size = 2\nlearning_rate = 0.01\n[cluster]\nlearners = 2\n",
            data.display()
        ),
    )
    .unwrap();

    let child = Command::new(BIN)
        .args(["coordinator", "--listen", "127.0.0.1:0", "--config"])
        .arg(&config)
        .env_remove("MEDTVT_AUTH_TOKEN_FILE")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut guard = Guard(child);
    let mut stdout = BufReader::new(guard.0.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    let addr =
        line.trim().strip_prefix("coordinator listening on ").unwrap_or_else(|| panic!("unexpected line {line:?}"));
    assert!(!addr.ends_with(":0"), "the real port is printed: {addr}");

    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let status = runtime.block_on(async {
        let mut client = medtvt_proto::client::connect(&format!("http://{addr}"), None).await.unwrap();
        client.get_status(pb::StatusRequest::default()).await.unwrap().into_inner()
    });
    assert_eq!(status.jobs.len(), 1);
    assert_eq!((status.jobs[0].name.as_str(), status.jobs[0].state), ("proc-pt", pb::JobState::Running as i32));

    let table = Command::new(BIN).args(["status", "--coordinator", &format!("http://{addr}")]).output().unwrap();
    assert!(table.status.success());
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(text.contains("proc-pt  pt     running  0/2"), "{text}");
    assert!(text.contains("pipeline: no GRPO job running"), "the pipeline gauges have a line: {text}");

    let pid = guard.0.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let start = Instant::now();
    let exit = loop {
        if let Some(exit) = guard.0.try_wait().unwrap() {
            break exit;
        }
        assert!(start.elapsed() < Duration::from_secs(20), "no exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(exit.success(), "{exit:?}");
}

#[test]
fn beyond_loopback_without_a_token_it_refuses_unless_insecure_and_then_warns() {
    let refused = Command::new(BIN)
        .args(["coordinator", "--listen", "0.0.0.0:0"])
        .env_remove("MEDTVT_AUTH_TOKEN_FILE")
        .env_remove("MEDTVT_INSECURE")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "{stderr}");
    assert!(stderr.contains("refusing to listen on 0.0.0.0:0") && stderr.contains("--insecure"), "{stderr}");
    assert!(refused.stdout.is_empty(), "it never announced an address");

    let dir = tempfile::tempdir().unwrap();
    let log_path = dir.path().join("coordinator.log");
    let child = Command::new(BIN)
        .args(["coordinator", "--listen", "0.0.0.0:0", "--insecure"])
        .env_remove("MEDTVT_AUTH_TOKEN_FILE")
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log_path).unwrap())
        .spawn()
        .unwrap();
    let mut guard = Guard(child);
    let mut line = String::new();
    BufReader::new(guard.0.stdout.take().unwrap()).read_line(&mut line).unwrap();
    assert!(line.starts_with("coordinator listening on 0.0.0.0:"), "{line:?}");
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(log.contains("WARN") && log.contains("--insecure"), "{log}");
}
