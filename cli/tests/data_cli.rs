//! `medtvt data` as a user runs it: a reader that closes the pipe early (`| head -1`) ends the
//! command quietly, and a folder or a missing path is said to be one.

use std::process::{Command, Stdio};

const BIN: &str = env!("CARGO_BIN_EXE_medtvt");

/// A small synthetic set in `dir`.
fn dataset(dir: &std::path::Path) {
    let mut cfg = medtvt_data::synth::SynthConfig::new(3, 1);
    cfg.image_size = 16;
    cfg.progress = false;
    medtvt_data::synth::synthesize(dir, &cfg).unwrap();
}

#[test]
fn a_closed_output_pipe_ends_inspect_quietly() {
    let dir = tempfile::tempdir().unwrap();
    dataset(dir.path());
    let record = dir.path().join("ecg/enc-000001");
    for json in [false, true] {
        let mut cmd = Command::new(BIN);
        cmd.args(["data", "inspect"]).arg(&record);
        if json {
            cmd.arg("--json");
        }
        // The reading end is closed before the command writes (as `head -1` does after a line).
        let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
        drop(child.stdout.take());
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stderr.contains("panicked") && !stderr.contains("Broken pipe"), "json {json}: {stderr}");
        assert_ne!(out.status.code(), Some(101), "json {json}: no panic exit");
        assert!(matches!(out.status.code(), Some(0) | Some(141)), "json {json}: {:?} {stderr}", out.status);
    }
}

#[test]
fn inspect_says_a_folder_is_a_folder_and_a_missing_path_does_not_exist() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(BIN).args(["data", "inspect"]).arg(dir.path()).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("is a folder") && !stderr.contains("not a WFDB"), "{stderr}");
    let missing = dir.path().join("typo.jsonl");
    let out = Command::new(BIN).args(["data", "inspect"]).arg(&missing).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("typo.jsonl") && stderr.contains("does not exist"), "{stderr}");
}
