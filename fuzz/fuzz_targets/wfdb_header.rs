//! Fuzz target: a WFDB record from arbitrary bytes. The input is the header text, a NUL byte, then
//! the bytes every signal file of that header holds. Parsing may fail, never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let split = data.iter().position(|&b| b == 0).unwrap_or(data.len());
    let Ok(header) = std::str::from_utf8(&data[..split]) else { return };
    let signal = data.get(split + 1..).unwrap_or_default().to_vec();
    if let Ok(record) = medtvt_data::wfdb::parse_record(Path::new("fuzz.hea"), header, |_| Ok(signal.clone())) {
        let _ = record.physical();
        let _ = record.checksum_mismatches();
    }
});
