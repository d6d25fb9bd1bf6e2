//! WFDB parity with the reference `wfdb` Python package: records written by wfdb read the same
//! here (fixtures from scripts/make_data_fixtures.py), and records written by our writer read the
//! same in wfdb (live through the script's verify mode when .venv has wfdb; always through the
//! committed fixtures ours16/ours212 and wfdb's reading of them).

use medtvt_data::wfdb::{ecg_model_input, read_record, write_record, SignalFormat, WfdbRecord, ECG_LEADS};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/wfdb")
}

fn load_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn assert_close(ours: f64, theirs: &Value, what: &str) {
    match theirs.as_f64() {
        None => assert!(ours.is_nan(), "{what}: ours {ours}, wfdb NaN"),
        Some(t) => {
            let tol = 1e-6 * t.abs().max(1e-9);
            assert!((ours - t).abs() <= tol, "{what}: ours {ours}, wfdb {t}");
        }
    }
}

/// Compares our reading of a record with wfdb's (the JSON layout of the fixture script).
fn assert_matches_wfdb(rec: &WfdbRecord, expected: &Value, samples: Option<usize>) {
    assert_eq!(rec.fs, expected["fs"].as_f64().unwrap());
    assert_eq!(rec.n_samples as u64, expected["n_samples"].as_u64().unwrap());
    for (i, s) in rec.signals.iter().enumerate() {
        assert_eq!(s.description, expected["sig_name"][i].as_str().unwrap());
        assert_eq!(s.format.code() as u64, expected["fmt"][i].as_u64().unwrap());
        assert_eq!(s.gain, expected["adc_gain"][i].as_f64().unwrap());
        assert_eq!(s.baseline as i64, expected["baseline"][i].as_i64().unwrap());
        assert_eq!(s.units, expected["units"][i].as_str().unwrap());
    }
    let phys = rec.physical();
    for (lead, values) in phys.iter().enumerate() {
        let theirs = expected["p_signal"][lead].as_array().unwrap();
        let n = samples.unwrap_or(values.len());
        assert_eq!(theirs.len(), n, "lead {lead} length");
        for (t, v) in values.iter().take(n).enumerate() {
            assert_close(*v, &theirs[t], &format!("lead {lead} sample {t}"));
        }
    }
    assert!(rec.checksum_mismatches().is_empty(), "checksums: {:?}", rec.checksum_mismatches());
}

#[test]
fn wfdb_written_records_read_like_wfdb() {
    for name in ["wf16", "wf212"] {
        let rec = read_record(&fixtures().join(name)).unwrap();
        assert_eq!(rec.signals.len(), 12);
        assert!(rec.physical().iter().flatten().any(|v| v.is_nan()), "{name}: the invalid samples should read as NaN");
        assert_matches_wfdb(&rec, &load_json(&fixtures().join(format!("{name}.json"))), None);
    }
}

#[test]
fn real_ecg_reads_like_wfdb_and_becomes_model_input() {
    let rec = read_record(&fixtures().join("real_ecg.hea")).unwrap();
    let expected = load_json(&fixtures().join("real_ecg.json"));
    assert_matches_wfdb(&rec, &expected, Some(20));
    for (i, lead) in rec.physical().iter().enumerate() {
        let mean = lead.iter().sum::<f64>() / lead.len() as f64;
        assert_close(mean, &expected["mean"][i], &format!("mean of lead {i}"));
    }
    let x = ecg_model_input(&rec, Path::new("real_ecg")).unwrap();
    assert_eq!(x.len(), 12 * 1000);
    // Lead II of a resting ECG has R waves of a few tenths of a mV to a few mV after resampling.
    let lead2 = &x[1000..2000];
    let peak = lead2.iter().fold(0f32, |m, v| m.max(v.abs()));
    assert!(peak > 0.3 && peak < 5.0, "lead II peak {peak} mV");
}

/// The deterministic record our writer is checked with.
fn our_record() -> (Vec<Vec<f32>>, Vec<f64>, Vec<i32>) {
    let n = 1000;
    let data: Vec<Vec<f32>> = (0..12)
        .map(|lead| {
            (0..n)
                .map(|t| {
                    if lead == 4 && t == 333 {
                        return f32::NAN;
                    }
                    let x = t as f32 / 500.0;
                    0.9 * (std::f32::consts::TAU * (lead as f32 + 1.0) * x).sin() + 0.05 * ((t * 7 + lead) % 13) as f32
                        - 0.3
                })
                .collect()
        })
        .collect();
    let gains = vec![200.0, 1000.0, 437.5, 123.25, 800.0, 77.0, 250.0, 1500.0, 333.0, 200.0, 612.5, 95.0];
    let baselines = vec![0, -123, 77, 1024, -5, 3, 0, -1000, 250, 12, -64, 999];
    (data, gains, baselines)
}

/// The fixture script's JSON layout for a record as we read it.
fn describe(rec: &WfdbRecord) -> Value {
    let p: Vec<Vec<Option<f64>>> =
        rec.physical().iter().map(|l| l.iter().map(|v| if v.is_nan() { None } else { Some(*v) }).collect()).collect();
    json!({
        "record": rec.name,
        "fs": rec.fs,
        "n_samples": rec.n_samples,
        "sig_name": rec.signals.iter().map(|s| s.description.clone()).collect::<Vec<_>>(),
        "fmt": rec.signals.iter().map(|s| s.format.code()).collect::<Vec<_>>(),
        "adc_gain": rec.signals.iter().map(|s| s.gain).collect::<Vec<_>>(),
        "baseline": rec.signals.iter().map(|s| s.baseline).collect::<Vec<_>>(),
        "units": rec.signals.iter().map(|s| s.units.clone()).collect::<Vec<_>>(),
        "p_signal": p,
    })
}

fn venv_python() -> Option<PathBuf> {
    let py = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python");
    let ok = std::process::Command::new(&py).args(["-c", "import wfdb"]).output().ok()?.status.success();
    ok.then_some(py)
}

#[test]
fn our_written_records_read_the_same_in_wfdb() {
    let dir = tempfile::tempdir().unwrap();
    let bless = std::env::var_os("MEDTVT_BLESS").is_some();
    let (data, gains, baselines) = our_record();
    for (name, format) in [("ours16", SignalFormat::F16), ("ours212", SignalFormat::F212)] {
        let (g, b): (Vec<f64>, Vec<i32>) = match format {
            SignalFormat::F16 => (gains.clone(), baselines.clone()),
            SignalFormat::F212 => (gains.iter().map(|g| g / 4.0).collect(), baselines.iter().map(|b| b / 4).collect()),
        };
        let out_dir = if bless { fixtures() } else { dir.path().to_path_buf() };
        let stem = out_dir.join(name);
        let written = write_record(&stem, 500.0, &ECG_LEADS, &data, format, &g, &b).unwrap();
        let rec = read_record(&stem).unwrap();
        assert_eq!(rec.adc, written.adc, "{name}: our reader returns what our writer wrote");
        for (lead, (ours, want)) in rec.physical().iter().zip(&data).enumerate() {
            for (t, (o, w)) in ours.iter().zip(want).enumerate() {
                if w.is_nan() {
                    assert!(o.is_nan());
                } else {
                    // Quantisation error is at most half an ADC step.
                    assert!((o - *w as f64).abs() <= 0.5 / g[lead] + 1e-6, "{name} lead {lead} t {t}: {o} vs {w}");
                }
            }
        }
        // Byte-identical with the committed copy that wfdb was run on.
        for ext in ["hea", "dat"] {
            let committed = std::fs::read(fixtures().join(format!("{name}.{ext}"))).unwrap();
            let now = std::fs::read(stem.with_extension(ext)).unwrap();
            assert!(
                committed == now,
                "{name}.{ext} differs from the committed fixture (rerun with MEDTVT_BLESS=1 and the fixture script)"
            );
        }
        // wfdb's reading of the committed copy (made by the fixture script) equals ours.
        let wfdb_json = fixtures().join(format!("{name}.json"));
        if bless && !wfdb_json.exists() {
            eprintln!("blessed {name}: now run scripts/make_data_fixtures.py");
            continue;
        }
        assert_matches_wfdb(&rec, &load_json(&wfdb_json), None);
        // Live check: wfdb reads the freshly written files as we do.
        if let Some(py) = venv_python() {
            let expected = dir.path().join(format!("{name}.expected.json"));
            std::fs::write(&expected, describe(&rec).to_string()).unwrap();
            let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/make_data_fixtures.py");
            let out =
                std::process::Command::new(py).arg(script).arg("verify").arg(&stem).arg(&expected).output().unwrap();
            assert!(out.status.success(), "wfdb disagrees: {}", String::from_utf8_lossy(&out.stdout));
        } else {
            eprintln!("no .venv with wfdb: live wfdb check skipped, committed fixture checked");
        }
    }
}

#[test]
fn truncated_dat_and_missing_files_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    for ext in ["hea", "dat"] {
        std::fs::copy(fixtures().join(format!("wf16.{ext}")), dir.path().join(format!("wf16.{ext}"))).unwrap();
    }
    let dat = dir.path().join("wf16.dat");
    let bytes = std::fs::read(&dat).unwrap();
    std::fs::write(&dat, &bytes[..bytes.len() - 7]).unwrap();
    let e = read_record(&dir.path().join("wf16")).unwrap_err().to_string();
    assert!(e.contains("wf16.dat") && e.contains("truncated"), "{e}");
    std::fs::remove_file(&dat).unwrap();
    let e = read_record(&dir.path().join("wf16")).unwrap_err().to_string();
    assert!(e.contains("wf16.dat"), "{e}");
    let e = read_record(&dir.path().join("nothere")).unwrap_err().to_string();
    assert!(e.contains("nothere.hea"), "{e}");
}
