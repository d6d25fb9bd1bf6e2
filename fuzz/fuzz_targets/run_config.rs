//! Fuzz target: the run-config loader over arbitrary TOML text, with the input's last line also
//! tried as a `--set key=value` override. Errors are fine; a panic is a bug.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let origin = Path::new("fuzz.toml");
    let _ = medtvt_config::parse_run_config(text, origin, &[]);
    if let Some(last) = text.lines().last() {
        let _ = medtvt_config::parse_run_config(text, origin, &[last.to_string()]);
    }
});
