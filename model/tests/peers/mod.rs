//! What a test does when the Python peer it compares against is missing: plain `cargo test` skips
//! it with a note, but under `make test` (which installs the peers and sets
//! `MEDTVT_REQUIRE_PEERS=1`) a missing peer is a failure, so that a parity test never passes by
//! not running. Shared by model/tests and cli/tests (included there by path).

use std::path::{Path, PathBuf};
use std::process::Command;

/// The variable `make test` sets.
pub const REQUIRE_PEERS: &str = "MEDTVT_REQUIRE_PEERS";

/// Reports a missing peer: panics when [`REQUIRE_PEERS`] is set, else prints `SKIPPED: why`.
pub fn peer_missing(why: &str) {
    if std::env::var_os(REQUIRE_PEERS).is_some_and(|v| !v.is_empty() && v != "0") {
        panic!("{why}, and {REQUIRE_PEERS} is set (make test installs the peers; run it again or check .venv)");
    }
    eprintln!("SKIPPED: {why}");
}

/// The repository's `.venv` Python when it can import `module`; otherwise reports the missing
/// peer ([`peer_missing`]) and returns `None`. (Both crates that include this file sit one level
/// below the repository root.)
// Not every test file that includes this module compares with transformers.
#[allow(dead_code)]
pub fn venv_python_with(module: &str) -> Option<PathBuf> {
    let python = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python");
    let ok = Command::new(&python).args(["-c", &format!("import {module}")]).output().is_ok_and(|o| o.status.success());
    if ok {
        Some(python)
    } else {
        peer_missing(&format!("{} cannot import {module} (run `make fixtures`)", python.display()));
        None
    }
}
