//! The control plane links no libtorch: the `medtvt-coordinator` binary's dynamic libraries
//! (as `ldd` resolves them) include neither torch, c10 nor any CUDA library, and the binary runs.

use std::process::Command;

const COORDINATOR: &str = env!("CARGO_BIN_EXE_medtvt-coordinator");

#[test]
fn the_coordinator_binary_links_no_libtorch_and_no_cuda() {
    let out = Command::new("ldd").arg(COORDINATOR).output().expect("running ldd (a Linux build machine has it)");
    assert!(out.status.success(), "ldd failed: {}", String::from_utf8_lossy(&out.stderr));
    let libraries = String::from_utf8_lossy(&out.stdout);
    // ldd really listed something: every binary here needs the C library.
    assert!(libraries.contains("libc.so"), "{libraries}");
    for banned in ["libtorch", "libc10", "libcuda", "libcudart", "libnccl", "libgomp"] {
        assert!(!libraries.contains(banned), "medtvt-coordinator links {banned}:\n{libraries}");
    }
}

#[test]
fn the_coordinator_binary_runs_and_takes_the_coordinator_flags() {
    let out = Command::new(COORDINATOR).arg("--help").output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("--run-dir") && help.contains("--listen"), "{help}");
}
