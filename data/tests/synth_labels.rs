//! The synthetic set says what its files show: a simple rule-based reader of the written files
//! (R-peak rhythm, ST level, QRS voltage and T height of the ECG, lung-zone brightness of the
//! X-ray, lab thresholds) recovers every disease far above chance; the samples are consistent
//! with the files; and the same seed gives byte-identical output.

use medtvt_data::disease::Disease;
use medtvt_data::labs::{item_index, latest_values, read_lab_csv, LabPercentiles};
use medtvt_data::rhythm::{measure_rhythm, r_peaks};
use medtvt_data::synth::cxr::{LEFT_LUNG_MID, RIGHT_LUNG_MID};
use medtvt_data::synth::{synthesize, SynthConfig};
use medtvt_data::wfdb::{read_record, ECG_LEADS};
use medtvt_data::{load_inputs, read_jsonl, QaKind, QaSample};
use std::collections::BTreeMap;
use std::path::Path;

/// What the rule-based reader sees in one encounter's files.
#[derive(Debug, Default)]
struct Seen {
    irregular: bool,
    heart_rate: f64,
    st_depression: bool,
    t_inversion: bool,
    lvh: bool,
    peaked_t: bool,
    opacity: bool,
    labs: BTreeMap<u32, f64>,
}

fn lead(rec: &medtvt_data::wfdb::WfdbRecord, name: &str) -> Vec<f64> {
    let i = rec.lead_index(name).unwrap();
    rec.physical()[i].iter().map(|v| if v.is_nan() { 0.0 } else { *v }).collect()
}

fn read_ecg(stem: &Path, seen: &mut Seen) {
    let rec = read_record(stem).unwrap();
    let fs = rec.fs;
    let leads: Vec<Vec<f64>> = ECG_LEADS.iter().map(|l| lead(&rec, l)).collect();
    let n = rec.n_samples;
    let rhythm = measure_rhythm(&rec).unwrap();
    seen.irregular = rhythm.irregular();
    seen.heart_rate = rhythm.heart_rate;
    let peaks = r_peaks(&rec);
    let at = |x: &[f64], r: usize, dt: f64| -> f64 {
        let k = (r as f64 + dt * fs).round() as isize;
        x[k.clamp(0, n as isize - 1) as usize]
    };
    let beats: Vec<usize> =
        peaks.iter().copied().filter(|&r| r as f64 > 0.2 * fs && (r as f64) < n as f64 - 0.45 * fs).collect();
    let avg = |f: &dyn Fn(usize) -> f64| beats.iter().map(|&r| f(r)).sum::<f64>() / beats.len().max(1) as f64;
    let baseline = |x: &[f64], r: usize| (at(x, r, -0.09) + at(x, r, -0.07) + at(x, r, -0.06)) / 3.0;
    let (v1, v3, v5, v6) = (&leads[6], &leads[8], &leads[10], &leads[11]);
    let st = avg(&|r| (at(v5, r, 0.11) - baseline(v5, r) + at(v6, r, 0.11) - baseline(v6, r)) / 2.0);
    seen.st_depression = st < -0.07;
    let t_v5 = avg(&|r| (0..12).map(|j| at(v5, r, 0.18 + 0.015 * j as f64) - baseline(v5, r)).fold(f64::MAX, f64::min));
    seen.t_inversion = t_v5 < -0.12;
    let s_v1 = avg(&|r| (-10..=25).map(|j| at(v1, r, j as f64 / fs)).fold(f64::MAX, f64::min) - baseline(v1, r));
    let r_v5 = avg(&|r| (-10..=10).map(|j| at(v5, r, j as f64 / fs)).fold(f64::MIN, f64::max) - baseline(v5, r));
    seen.lvh = r_v5 - s_v1 > 3.0;
    let t_v3 = avg(&|r| (0..16).map(|j| at(v3, r, 0.15 + 0.015 * j as f64) - baseline(v3, r)).fold(f64::MIN, f64::max));
    seen.peaked_t = t_v3 > 0.8;
}

fn read_cxr(path: &Path, seen: &mut Seen) {
    let img = image::open(path).unwrap().to_luma8();
    let (w, h) = img.dimensions();
    let mean_in = |b: [f64; 4]| {
        let (x0, x1, y0, y1) =
            ((b[0] * w as f64) as u32, (b[1] * w as f64) as u32, (b[2] * h as f64) as u32, (b[3] * h as f64) as u32);
        let mut s = 0.0;
        for y in y0..y1 {
            for x in x0..x1 {
                s += img.get_pixel(x, y).0[0] as f64 / 255.0;
            }
        }
        s / ((x1 - x0) * (y1 - y0)) as f64
    };
    seen.opacity = (mean_in(RIGHT_LUNG_MID) - mean_in(LEFT_LUNG_MID)).abs() > 0.06;
}

fn read_labs(path: &Path, seen: &mut Seen) {
    let events = read_lab_csv(path).unwrap();
    for e in latest_values(&events).iter().flatten() {
        seen.labs.insert(e.itemid, e.valuenum.unwrap());
    }
}

fn predict(d: Disease, s: &Seen) -> bool {
    let lab = |id: u32, above: f64| s.labs.get(&id).is_some_and(|v| *v > above);
    match d {
        Disease::CoronaryArteryDisease => lab(51003, 0.01) || s.st_depression || s.t_inversion,
        Disease::AcuteRenalFailure => lab(50912, 1.5) || lab(51006, 30.0) || s.peaked_t,
        Disease::Hypertension => s.lvh,
        Disease::AtrialFibrillation => s.irregular,
        Disease::Pneumonia => s.opacity,
        Disease::DiabetesMellitus => lab(50931, 180.0) || lab(50852, 6.5),
        Disease::Sepsis => lab(50813, 2.0) || lab(51301, 13.5) || (s.heart_rate > 102.0 && !s.irregular),
    }
}

fn read_encounter(dir: &Path, s: &QaSample) -> Seen {
    let mut seen = Seen::default();
    if let Some(e) = &s.ecg {
        read_ecg(&dir.join(e), &mut seen);
    }
    if let Some(c) = &s.cxr {
        read_cxr(&dir.join(c), &mut seen);
    }
    if let Some(l) = &s.lab {
        read_labs(&dir.join(l), &mut seen);
    }
    seen
}

#[test]
fn rule_based_reader_recovers_every_disease_from_the_files() {
    let dir = tempfile::tempdir().unwrap();
    let start = std::time::Instant::now();
    let summary = synthesize(dir.path(), &SynthConfig::new(400, 7)).unwrap();
    eprintln!("synth 400 encounters: {:?}", start.elapsed());
    assert_eq!(summary.samples, 800);
    let samples = read_jsonl(&dir.path().join("qa.jsonl")).unwrap();
    let dx: Vec<&QaSample> = samples.iter().filter(|s| s.kind == QaKind::Disease).collect();
    assert_eq!(dx.len(), 400);
    let seen: Vec<Seen> = dx.iter().map(|s| read_encounter(dir.path(), s)).collect();
    for d in Disease::ALL {
        let (mut tp, mut fn_, mut tn, mut fp) = (0.0, 0.0, 0.0, 0.0);
        for (s, seen) in dx.iter().zip(&seen) {
            let truth = s.labels.iter().any(|l| l == d.name());
            match (truth, predict(d, seen)) {
                (true, true) => tp += 1.0,
                (true, false) => fn_ += 1.0,
                (false, false) => tn += 1.0,
                (false, true) => fp += 1.0,
            }
        }
        let sens = tp / (tp + fn_);
        let spec = tn / (tn + fp);
        let ba = (sens + spec) / 2.0;
        eprintln!("{d}: n+={} sens {sens:.2} spec {spec:.2} balanced accuracy {ba:.2}", tp + fn_);
        assert!(tp + fn_ >= 20.0, "{d}: only {} positives", tp + fn_);
        assert!(ba > 0.75, "{d}: balanced accuracy {ba:.2}");
        // No single modality is enough: some positives show no sign at all.
    }
}

#[test]
fn samples_agree_with_files_and_inputs_load() {
    let dir = tempfile::tempdir().unwrap();
    synthesize(dir.path(), &SynthConfig { image_size: 64, ..SynthConfig::new(60, 3) }).unwrap();
    let samples = read_jsonl(&dir.path().join("qa.jsonl")).unwrap();
    let p = LabPercentiles::load(&dir.path().join("lab_percentiles.json")).unwrap();
    assert!(p.counts[item_index(50912).unwrap()] > 30, "creatinine fitted on the train split");
    let mut by_split = BTreeMap::new();
    let mut missing = 0;
    for s in &samples {
        *by_split.entry(s.split).or_insert(0) += 1;
        missing += [&s.ecg, &s.cxr, &s.lab].iter().filter(|m| m.is_none()).count();
        assert!(!s.labels.is_empty(), "{}: every encounter has a diagnosis", s.id);
        if s.kind == QaKind::Disease {
            let answer: Vec<&str> = s.answer_text().unwrap().split("; ").collect();
            assert_eq!(answer, s.labels.iter().map(String::as_str).collect::<Vec<_>>());
            let think_words = s.answer.split("</think>").next().unwrap().split_whitespace().count();
            assert!(think_words <= 70, "{}: think has {think_words} words", s.id);
        }
        let inputs = load_inputs(dir.path(), s, &p, 32).unwrap();
        assert_eq!(inputs.ecg.as_ref().map(Vec::len), s.ecg.as_ref().map(|_| 12 * 1000));
        assert_eq!(inputs.cxr.as_ref().map(Vec::len), s.cxr.as_ref().map(|_| 3 * 32 * 32));
        assert_eq!(inputs.lab.as_ref().map(Vec::len), s.lab.as_ref().map(|_| 100));
        assert!(inputs.ecg.iter().flatten().chain(inputs.cxr.iter().flatten()).all(|v| v.is_finite()));
    }
    assert_eq!(by_split.values().sum::<usize>(), 120);
    assert_eq!(by_split.len(), 3, "train, val and test all present: {by_split:?}");
    assert!(missing > 0, "some modalities are missing");
    assert!(dir.path().join("README.md").exists());
}

#[test]
fn same_seed_gives_identical_files_and_another_seed_does_not() {
    let run = |seed: u64| {
        let dir = tempfile::tempdir().unwrap();
        synthesize(dir.path(), &SynthConfig { image_size: 32, ..SynthConfig::new(12, seed) }).unwrap();
        let read = |p: &str| std::fs::read(dir.path().join(p)).unwrap();
        (read("qa.jsonl"), read("lab_percentiles.json"), read("cxr/enc-000003.png"), read("ecg/enc-000002.dat"))
    };
    let a = run(11);
    assert!(a == run(11), "same seed, same bytes");
    assert!(a.0 != run(12).0, "another seed, another set");
}
