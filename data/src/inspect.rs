//! `medtvt data inspect PATH`: what a data file holds, as text or JSON. Handles WFDB records
//! (stem or `.hea`), X-ray images (PNG/JPEG), lab CSVs (MIMIC-IV labevents schema), `qa.jsonl`
//! sets (counts) and single samples (`qa.jsonl:LINE`).

use crate::error::DataError;
use crate::labs::{item_index, latest_values, read_lab_csv, LAB_ITEMS};
use crate::sample::{read_jsonl, read_jsonl_line, QaSample};
use crate::wfdb::{header_path, read_record};
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

/// First samples shown per lead.
const FIRST_SAMPLES: usize = 5;

/// One lead of a record.
#[derive(Debug, Clone, Serialize)]
pub struct LeadSummary {
    pub name: String,
    pub format: u32,
    pub units: String,
    pub gain: f64,
    pub baseline: i32,
    /// First samples in physical units (`null` = invalid sample).
    pub first: Vec<Option<f64>>,
}

/// One lab item found in a CSV.
#[derive(Debug, Clone, Serialize)]
pub struct LabItemSummary {
    pub itemid: u32,
    /// `None` for items outside the model's 50.
    pub name: Option<String>,
    pub rows: usize,
    pub latest_value: Option<f64>,
    pub unit: Option<String>,
    pub latest_time: Option<String>,
    pub abnormal: bool,
}

/// What `inspect` found.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum InspectReport {
    Wfdb {
        path: PathBuf,
        record: String,
        fs: f64,
        n_samples: usize,
        duration_s: f64,
        leads: Vec<LeadSummary>,
        checksum_mismatches: Vec<String>,
        comments: Vec<String>,
    },
    Image {
        path: PathBuf,
        width: u32,
        height: u32,
        channels: u8,
        color: String,
        mean_intensity: f64,
    },
    Labs {
        path: PathBuf,
        rows: usize,
        items: Vec<LabItemSummary>,
    },
    QaSet {
        path: PathBuf,
        samples: usize,
        encounters: usize,
        by_split: BTreeMap<String, usize>,
        by_kind: BTreeMap<String, usize>,
        by_label: BTreeMap<String, usize>,
        missing_modality: BTreeMap<String, usize>,
    },
    QaSample {
        path: PathBuf,
        line: usize,
        sample: QaSample,
    },
}

/// Inspects `arg`: a path, or `FILE.jsonl:LINE` for one sample.
pub fn inspect(arg: &str) -> Result<InspectReport, DataError> {
    if let Some((file, line)) = arg.rsplit_once(':') {
        if file.ends_with(".jsonl") && !line.is_empty() && line.bytes().all(|b| b.is_ascii_digit()) {
            let path = PathBuf::from(file);
            let line: usize = line.parse().map_err(|_| DataError::arg("PATH", format!("{arg:?}: bad line number")))?;
            let sample = read_jsonl_line(&path, line)?;
            return Ok(InspectReport::QaSample { path, line, sample });
        }
    }
    let path = PathBuf::from(arg);
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("").to_ascii_lowercase();
    // Said first, so that a typo is not reported as an unknown kind of file.
    if path.is_dir() {
        let problem = "is a folder; give a file in it, a WFDB record stem, or FILE.jsonl[:LINE]";
        return Err(DataError::io(&path, std::io::Error::new(std::io::ErrorKind::IsADirectory, problem)));
    }
    if !path.exists() && !header_path(&path).exists() {
        return Err(DataError::io(&path, std::io::Error::new(std::io::ErrorKind::NotFound, "does not exist")));
    }
    if name.ends_with(".dat") && path.with_extension("hea").exists() {
        inspect_wfdb(&path.with_extension("hea"))
    } else if name.ends_with(".hea") || (!path.exists() && header_path(&path).exists()) {
        inspect_wfdb(&path)
    } else if [".png", ".jpg", ".jpeg"].iter().any(|e| name.ends_with(e)) {
        inspect_image(&path)
    } else if name.ends_with(".csv") || name.ends_with(".csv.gz") {
        inspect_labs(&path)
    } else if name.ends_with(".jsonl") {
        inspect_qa(&path)
    } else {
        Err(DataError::arg(
            "PATH",
            format!("{arg:?}: not a WFDB record (stem, .hea or .dat), image (.png/.jpg), lab CSV or .jsonl[:LINE]"),
        ))
    }
}

fn inspect_wfdb(path: &Path) -> Result<InspectReport, DataError> {
    let rec = read_record(path)?;
    let phys = rec.physical();
    let leads = rec
        .signals
        .iter()
        .zip(&phys)
        .map(|(s, p)| LeadSummary {
            name: s.description.clone(),
            format: s.format.code(),
            units: s.units.clone(),
            gain: s.gain,
            baseline: s.baseline,
            first: p.iter().take(FIRST_SAMPLES).map(|v| (!v.is_nan()).then_some(*v)).collect(),
        })
        .collect();
    Ok(InspectReport::Wfdb {
        path: header_path(path),
        record: rec.name.clone(),
        fs: rec.fs,
        n_samples: rec.n_samples,
        duration_s: rec.n_samples as f64 / rec.fs,
        leads,
        checksum_mismatches: rec.checksum_mismatches(),
        comments: rec.comments.clone(),
    })
}

fn inspect_image(path: &Path) -> Result<InspectReport, DataError> {
    let img = crate::image::open_image(path)?;
    let luma = img.to_luma32f();
    let n = (luma.width() as f64 * luma.height() as f64).max(1.0);
    let mean = luma.pixels().map(|p| p.0[0] as f64).sum::<f64>() / n;
    Ok(InspectReport::Image {
        path: path.to_path_buf(),
        width: img.width(),
        height: img.height(),
        channels: img.color().channel_count(),
        color: format!("{:?}", img.color()),
        mean_intensity: mean,
    })
}

fn inspect_labs(path: &Path) -> Result<InspectReport, DataError> {
    let events = read_lab_csv(path)?;
    let latest = latest_values(&events);
    let mut items: BTreeMap<u32, LabItemSummary> = BTreeMap::new();
    for e in &events {
        let entry = items.entry(e.itemid).or_insert_with(|| LabItemSummary {
            itemid: e.itemid,
            name: item_index(e.itemid).map(|i| LAB_ITEMS[i].name.to_string()),
            rows: 0,
            latest_value: None,
            unit: None,
            latest_time: None,
            abnormal: false,
        });
        entry.rows += 1;
    }
    for e in latest.iter().flatten() {
        if let Some(s) = items.get_mut(&e.itemid) {
            s.latest_value = e.valuenum;
            s.unit = e.valueuom.clone();
            s.latest_time = Some(e.charttime.clone());
            s.abnormal = e.is_abnormal();
        }
    }
    Ok(InspectReport::Labs { path: path.to_path_buf(), rows: events.len(), items: items.into_values().collect() })
}

fn inspect_qa(path: &Path) -> Result<InspectReport, DataError> {
    let samples = read_jsonl(path)?;
    let mut by_split = BTreeMap::new();
    let mut by_kind = BTreeMap::new();
    let mut by_label = BTreeMap::new();
    let mut missing = BTreeMap::new();
    let mut encounters = std::collections::BTreeSet::new();
    for s in &samples {
        *by_split.entry(s.split.to_string()).or_insert(0) += 1;
        *by_kind.entry(s.kind.to_string()).or_insert(0) += 1;
        for l in &s.labels {
            *by_label.entry(l.clone()).or_insert(0) += 1;
        }
        for (m, p) in [("ecg", &s.ecg), ("cxr", &s.cxr), ("lab", &s.lab)] {
            if p.is_none() {
                *missing.entry(m.to_string()).or_insert(0) += 1;
            }
        }
        encounters.insert(s.encounter_id.clone());
    }
    Ok(InspectReport::QaSet {
        path: path.to_path_buf(),
        samples: samples.len(),
        encounters: encounters.len(),
        by_split,
        by_kind,
        by_label,
        missing_modality: missing,
    })
}

fn opt(v: Option<f64>) -> String {
    v.map_or("NaN".to_string(), |v| format!("{v:.4}"))
}

fn counts(f: &mut fmt::Formatter<'_>, title: &str, m: &BTreeMap<String, usize>) -> fmt::Result {
    writeln!(f, "{title}:")?;
    for (k, v) in m {
        writeln!(f, "  {k}: {v}")?;
    }
    Ok(())
}

impl fmt::Display for InspectReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            InspectReport::Wfdb { path, record, fs, n_samples, duration_s, leads, checksum_mismatches, comments } => {
                writeln!(f, "WFDB record {record} ({})", path.display())?;
                writeln!(f, "fs {fs} Hz, {n_samples} samples ({duration_s:.2} s), {} leads", leads.len())?;
                writeln!(
                    f,
                    "{:<6} {:>4} {:>6} {:>10} {:>8}  first samples",
                    "lead", "fmt", "units", "gain", "baseline"
                )?;
                for l in leads {
                    let first: Vec<String> = l.first.iter().map(|v| opt(*v)).collect();
                    writeln!(
                        f,
                        "{:<6} {:>4} {:>6} {:>10} {:>8}  {}",
                        l.name,
                        l.format,
                        l.units,
                        l.gain,
                        l.baseline,
                        first.join(" ")
                    )?;
                }
                if !checksum_mismatches.is_empty() {
                    writeln!(f, "checksum mismatch in: {}", checksum_mismatches.join(", "))?;
                }
                for c in comments {
                    writeln!(f, "# {c}")?;
                }
                Ok(())
            }
            InspectReport::Image { path, width, height, channels, color, mean_intensity } => writeln!(
                f,
                "image {}: {width}x{height}, {channels} channel(s) ({color}), mean intensity {mean_intensity:.4}",
                path.display()
            ),
            InspectReport::Labs { path, rows, items } => {
                writeln!(f, "lab CSV {}: {rows} rows, {} items", path.display(), items.len())?;
                for i in items {
                    writeln!(
                        f,
                        "  {:>6} {:<28} rows {:>2}  latest {} {} at {}{}",
                        i.itemid,
                        i.name.as_deref().unwrap_or("(not one of the 50)"),
                        i.rows,
                        opt(i.latest_value),
                        i.unit.as_deref().unwrap_or(""),
                        i.latest_time.as_deref().unwrap_or("-"),
                        if i.abnormal { "  abnormal" } else { "" }
                    )?;
                }
                Ok(())
            }
            InspectReport::QaSet { path, samples, encounters, by_split, by_kind, by_label, missing_modality } => {
                writeln!(f, "QA set {}: {samples} samples, {encounters} encounters", path.display())?;
                counts(f, "by split", by_split)?;
                counts(f, "by kind", by_kind)?;
                counts(f, "by label (samples)", by_label)?;
                counts(f, "missing modality (samples)", missing_modality)
            }
            InspectReport::QaSample { path, line, sample } => {
                writeln!(f, "{}:{line}: {} ({}, {})", path.display(), sample.id, sample.split, sample.kind)?;
                writeln!(f, "encounter: {}", sample.encounter_id)?;
                writeln!(f, "ecg: {}", sample.ecg.as_deref().unwrap_or("-"))?;
                writeln!(f, "cxr: {}", sample.cxr.as_deref().unwrap_or("-"))?;
                writeln!(f, "lab: {}", sample.lab.as_deref().unwrap_or("-"))?;
                writeln!(f, "question: {}", sample.question)?;
                writeln!(f, "answer: {}", sample.answer)?;
                writeln!(f, "labels: {}", sample.labels.join("; "))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inspects_each_kind_of_file() {
        let dir = tempfile::tempdir().unwrap();
        crate::synth::synthesize(
            dir.path(),
            &crate::synth::SynthConfig { image_size: 32, ..crate::synth::SynthConfig::new(5, 1) },
        )
        .unwrap();
        let p = |rel: &str| dir.path().join(rel).to_string_lossy().into_owned();
        let t = inspect(&p("ecg/enc-000001")).unwrap().to_string();
        assert!(t.contains("fs 500 Hz, 5000 samples (10.00 s), 12 leads") && t.contains("aVF"), "{t}");
        assert!(matches!(inspect(&p("ecg/enc-000001.dat")).unwrap(), InspectReport::Wfdb { .. }));
        let t = inspect(&p("ecg/enc-000001.hea")).unwrap();
        assert!(matches!(t, InspectReport::Wfdb { ref leads, .. } if leads.len() == 12 && leads[0].first.len() == 5));
        let t = inspect(&p("qa.jsonl")).unwrap().to_string();
        assert!(t.contains("10 samples, 5 encounters") && t.contains("physiological: 5"), "{t}");
        let t = inspect(&format!("{}:2", p("qa.jsonl"))).unwrap().to_string();
        assert!(t.contains("enc-000001-dx"), "{t}");
        let json = serde_json::to_value(inspect(&p("cxr/enc-000002.png")).unwrap()).unwrap();
        assert_eq!(
            (json["type"].as_str(), json["width"].as_u64(), json["channels"].as_u64()),
            (Some("image"), Some(32), Some(1))
        );
        let labs = std::fs::read_dir(dir.path().join("labs")).unwrap().next().unwrap().unwrap().path();
        let t = inspect(&labs.to_string_lossy()).unwrap().to_string();
        assert!(t.contains("50912 creatinine"), "{t}");
        assert!(inspect(&p("qa.jsonl:99")).unwrap_err().to_string().contains("qa.jsonl:99"));
        assert!(inspect(&p("README.md")).is_err());
    }

    #[test]
    fn a_folder_or_a_missing_path_is_said_to_be_one() {
        let dir = tempfile::tempdir().unwrap();
        let folder = dir.path().to_string_lossy().into_owned();
        let e = inspect(&folder).unwrap_err().to_string();
        assert!(e.contains(&folder) && e.contains("is a folder") && !e.contains("not a WFDB"), "{e}");
        for missing in ["nothere", "nothere.png", "nothere.csv", "ecg/enc-000001"] {
            let path = dir.path().join(missing).to_string_lossy().into_owned();
            let e = inspect(&path).unwrap_err().to_string();
            assert!(e.contains(&path) && e.contains("does not exist") && !e.contains("not a WFDB"), "{e}");
        }
    }

    #[test]
    fn a_truncated_jpeg_is_refused_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cxr.jpg");
        let jpeg = crate::jpeg::tests::noisy_jpeg(128);
        std::fs::write(&path, &jpeg[..20 * jpeg.len() / 100]).unwrap();
        let e = inspect(&path.to_string_lossy()).unwrap_err().to_string();
        assert!(e.contains("cxr.jpg") && e.contains("truncated"), "{e}");
    }

    #[test]
    fn an_empty_lab_csv_is_said_to_be_empty() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("labs.csv");
        std::fs::write(&path, "").unwrap();
        let e = inspect(&path.to_string_lossy()).unwrap_err().to_string();
        assert!(e.contains("labs.csv") && e.contains("empty") && !e.contains("missing"), "{e}");
    }
}
