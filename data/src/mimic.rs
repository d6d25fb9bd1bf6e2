//! `medtvt data build-mimic`: pairs a user's copies of MIMIC-IV (hosp), MIMIC-IV-ECG and
//! MIMIC-CXR-JPG into a MedTVT-QA set with the same layout as the synthetic one.
//!
//! Pairing (the Symile-MIMIC rule): per admission, the first ECG and the first chest X-ray
//! (PA or AP view) taken between admission and discharge, and the lab rows of the same patient
//! from the 24 h before that X-ray. Labels come from the admission's ICD codes
//! ([`Disease::from_icd`]). Admissions without a target diagnosis, without an ECG, X-ray or labs
//! in the window, or whose files are missing or unreadable are skipped and counted by reason; with
//! `strict` an unreadable record or a bad table row stops the build instead.
//!
//! Tables are read as `NAME.csv` or `NAME.csv.gz`. Expected columns: admissions (subject_id,
//! hadm_id, admittime, dischtime), diagnoses_icd (hadm_id, icd_code, icd_version), patients
//! (subject_id), labevents (see [`crate::labs`]), MIMIC-IV-ECG `record_list` (subject_id,
//! ecg_time, path), MIMIC-CXR-JPG `mimic-cxr-2.0.0-metadata` (dicom_id, subject_id, study_id,
//! StudyDate, StudyTime, optional ViewPosition), with images at
//! `files/pXX/pSUBJECT/sSTUDY/DICOM_ID.jpg`.

use crate::disease::Disease;
use crate::error::DataError;
use crate::labs::{for_each_lab_row, open_maybe_gz, write_lab_csv, LabEvent, LabPercentiles};
use crate::qa_text::{self, EcgFindings, Findings};
use crate::rhythm::measure_rhythm;
use crate::sample::{write_jsonl, QaKind, QaSample, Split};
use crate::synth::Progress;
use crate::time::{parse_datetime, parse_study_datetime};
use crate::wfdb::{ecg_model_input, read_record};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

/// Where the MIMIC copies are and what to build.
#[derive(Debug, Clone)]
pub struct BuildMimicConfig {
    /// MIMIC-IV `hosp/` directory.
    pub hosp: PathBuf,
    /// MIMIC-IV-ECG root (holds `record_list.csv` and `files/`).
    pub ecg: PathBuf,
    /// MIMIC-CXR-JPG root (holds the metadata CSV and `files/`).
    pub cxr: PathBuf,
    pub out: PathBuf,
    pub strict: bool,
    pub diseases: Vec<Disease>,
    pub progress: bool,
}

/// What the build did.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct BuildReport {
    pub admissions: usize,
    pub matched: usize,
    /// Skipped admissions (and bad table rows) by reason.
    pub skipped: BTreeMap<String, usize>,
    pub by_split: BTreeMap<String, usize>,
    pub by_disease: BTreeMap<String, usize>,
}

/// Lab window before the X-ray.
const LAB_WINDOW_S: i64 = 24 * 3600;

struct Admission {
    subject: u64,
    hadm: u64,
    admit: i64,
    disch: i64,
}

/// A candidate encounter after pairing by time.
struct Candidate {
    subject: u64,
    hadm: u64,
    labels: Vec<Disease>,
    ecg_stem: PathBuf,
    cxr_path: PathBuf,
    cxr_time: i64,
    labs: Vec<LabEvent>,
}

/// One opened CSV table with its header.
struct Table {
    path: PathBuf,
    reader: csv::Reader<Box<dyn std::io::Read>>,
    header: csv::StringRecord,
}

impl Table {
    /// Opens `dir/NAME.csv` or `dir/NAME.csv.gz`.
    fn open(dir: &Path, name: &str) -> Result<Table, DataError> {
        let plain = dir.join(format!("{name}.csv"));
        let gz = dir.join(format!("{name}.csv.gz"));
        let path = if plain.exists() { plain } else if gz.exists() { gz } else {
            return Err(DataError::io(plain, std::io::Error::new(std::io::ErrorKind::NotFound, format!("neither {name}.csv nor {name}.csv.gz exists"))));
        };
        let mut reader = csv::ReaderBuilder::new().flexible(true).from_reader(open_maybe_gz(&path)?);
        let header = reader
            .headers()
            .map_err(|e| DataError::Csv { path: path.clone(), line: 1, column: "header".into(), problem: e.to_string() })?
            .clone();
        Ok(Table { path, reader, header })
    }

    fn column(&self, name: &str) -> Result<usize, DataError> {
        self.header.iter().position(|h| h.trim() == name).ok_or_else(|| DataError::Csv {
            path: self.path.clone(),
            line: 1,
            column: name.into(),
            problem: "required column is missing from the header".into(),
        })
    }

    /// Calls `f(line, row)` for each row; `f` returns a row error as `Err((column, problem))`.
    fn rows(
        mut self,
        policy: &mut RowPolicy,
        mut f: impl FnMut(&csv::StringRecord) -> Result<(), (String, String)>,
    ) -> Result<(), DataError> {
        let mut row = csv::StringRecord::new();
        let label = self.path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        loop {
            let more = self.reader.read_record(&mut row).map_err(|e| DataError::Csv {
                path: self.path.clone(),
                line: e.position().map_or(0, |p| p.line()),
                column: "-".into(),
                problem: e.to_string(),
            })?;
            if !more {
                return Ok(());
            }
            if let Err((column, problem)) = f(&row) {
                let line = row.position().map_or(0, |p| p.line());
                policy.bad_row(DataError::Csv { path: self.path.clone(), line, column, problem }, &label)?;
            }
        }
    }
}

/// Skip-and-count, or stop (`strict`).
struct RowPolicy {
    strict: bool,
    skipped: BTreeMap<String, usize>,
}

impl RowPolicy {
    fn bad_row(&mut self, e: DataError, table: &str) -> Result<(), DataError> {
        if self.strict {
            return Err(e);
        }
        *self.skipped.entry(format!("bad row in {table}")).or_default() += 1;
        Ok(())
    }

    fn skip(&mut self, reason: &str) {
        *self.skipped.entry(reason.to_string()).or_default() += 1;
    }
}

fn field<'a>(row: &'a csv::StringRecord, i: usize, name: &str) -> Result<&'a str, (String, String)> {
    row.get(i).map(str::trim).filter(|s| !s.is_empty()).ok_or_else(|| (name.to_string(), "empty".to_string()))
}

fn id(row: &csv::StringRecord, i: usize, name: &str) -> Result<u64, (String, String)> {
    let s = field(row, i, name)?;
    s.parse().map_err(|_| (name.to_string(), format!("{s:?} is not an id")))
}

fn time(row: &csv::StringRecord, i: usize, name: &str) -> Result<i64, (String, String)> {
    let s = field(row, i, name)?;
    parse_datetime(s).ok_or_else(|| (name.to_string(), format!("{s:?} is not YYYY-MM-DD HH:MM:SS")))
}

fn read_patients(hosp: &Path, policy: &mut RowPolicy) -> Result<BTreeSet<u64>, DataError> {
    let t = Table::open(hosp, "patients")?;
    let c = t.column("subject_id")?;
    let mut out = BTreeSet::new();
    t.rows(policy, |r| {
        out.insert(id(r, c, "subject_id")?);
        Ok(())
    })?;
    Ok(out)
}

fn read_admissions(hosp: &Path, policy: &mut RowPolicy) -> Result<Vec<Admission>, DataError> {
    let t = Table::open(hosp, "admissions")?;
    let (cs, ch, ca, cd) = (t.column("subject_id")?, t.column("hadm_id")?, t.column("admittime")?, t.column("dischtime")?);
    let mut out = Vec::new();
    t.rows(policy, |r| {
        out.push(Admission {
            subject: id(r, cs, "subject_id")?,
            hadm: id(r, ch, "hadm_id")?,
            admit: time(r, ca, "admittime")?,
            disch: time(r, cd, "dischtime")?,
        });
        Ok(())
    })?;
    out.sort_by_key(|a| a.hadm);
    Ok(out)
}

fn read_diagnoses(hosp: &Path, allowed: &[Disease], policy: &mut RowPolicy) -> Result<HashMap<u64, BTreeSet<Disease>>, DataError> {
    let t = Table::open(hosp, "diagnoses_icd")?;
    let (ch, cc, cv) = (t.column("hadm_id")?, t.column("icd_code")?, t.column("icd_version")?);
    let mut out: HashMap<u64, BTreeSet<Disease>> = HashMap::new();
    t.rows(policy, |r| {
        let hadm = id(r, ch, "hadm_id")?;
        let code = field(r, cc, "icd_code")?;
        let v = field(r, cv, "icd_version")?;
        let version: u8 = v.parse().map_err(|_| ("icd_version".to_string(), format!("{v:?} is not 9 or 10")))?;
        if let Some(d) = Disease::from_icd(code, version).filter(|d| allowed.contains(d)) {
            out.entry(hadm).or_default().insert(d);
        }
        Ok(())
    })?;
    Ok(out)
}

/// subject -> (time, record stem relative to the ECG root), sorted by time.
fn read_ecg_list(root: &Path, policy: &mut RowPolicy) -> Result<HashMap<u64, Vec<(i64, String)>>, DataError> {
    let t = Table::open(root, "record_list")?;
    let (cs, ct, cp) = (t.column("subject_id")?, t.column("ecg_time")?, t.column("path")?);
    let mut out: HashMap<u64, Vec<(i64, String)>> = HashMap::new();
    t.rows(policy, |r| {
        let subject = id(r, cs, "subject_id")?;
        let when = time(r, ct, "ecg_time")?;
        out.entry(subject).or_default().push((when, field(r, cp, "path")?.to_string()));
        Ok(())
    })?;
    out.values_mut().for_each(|v| v.sort());
    Ok(out)
}

/// subject -> (time, jpg path relative to the CXR root), sorted by time; frontal views only
/// when the table has ViewPosition.
fn read_cxr_list(root: &Path, policy: &mut RowPolicy) -> Result<HashMap<u64, Vec<(i64, String)>>, DataError> {
    let t = match Table::open(root, "mimic-cxr-2.0.0-metadata") {
        Ok(t) => t,
        Err(_) => Table::open(root, "metadata")?,
    };
    let (cdcm, cs, cst, cd, ct) =
        (t.column("dicom_id")?, t.column("subject_id")?, t.column("study_id")?, t.column("StudyDate")?, t.column("StudyTime")?);
    let cview = t.column("ViewPosition").ok();
    let mut out: HashMap<u64, Vec<(i64, String)>> = HashMap::new();
    let mut lateral = 0;
    t.rows(policy, |r| {
        if let Some(cv) = cview {
            let view = r.get(cv).unwrap_or("").trim();
            if !(view == "PA" || view == "AP") {
                lateral += 1;
                return Ok(());
            }
        }
        let subject = id(r, cs, "subject_id")?;
        let study = id(r, cst, "study_id")?;
        let dicom = field(r, cdcm, "dicom_id")?;
        let (d, tm) = (field(r, cd, "StudyDate")?, field(r, ct, "StudyTime")?);
        let when = parse_study_datetime(d, tm).ok_or_else(|| ("StudyTime".to_string(), format!("{d:?} {tm:?} is not a date and time")))?;
        let s = subject.to_string();
        let rel = format!("files/p{}/p{s}/s{study}/{dicom}.jpg", &s[..2.min(s.len())]);
        out.entry(subject).or_default().push((when, rel));
        Ok(())
    })?;
    if lateral > 0 {
        policy.skipped.insert("cxr images not PA/AP (ignored)".into(), lateral);
    }
    out.values_mut().for_each(|v| v.sort());
    Ok(out)
}

fn first_within(list: Option<&Vec<(i64, String)>>, from: i64, to: i64) -> Option<&(i64, String)> {
    list?.iter().find(|(t, _)| *t >= from && *t <= to)
}

/// Deterministic split by patient (a patient never spans two splits): 80/10/10.
pub fn split_for_subject(subject: u64) -> Split {
    // splitmix64 finaliser: a fixed, well-mixed hash.
    let mut z = subject.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    match (z ^ (z >> 31)) % 10 {
        0..=7 => Split::Train,
        8 => Split::Val,
        _ => Split::Test,
    }
}

/// Builds the dataset (see the module doc).
pub fn build_mimic(cfg: &BuildMimicConfig) -> Result<BuildReport, DataError> {
    if cfg.diseases.is_empty() {
        return Err(DataError::arg("diseases", "name at least one disease"));
    }
    let mut policy = RowPolicy { strict: cfg.strict, skipped: BTreeMap::new() };
    let patients = read_patients(&cfg.hosp, &mut policy)?;
    let admissions = read_admissions(&cfg.hosp, &mut policy)?;
    let diagnoses = read_diagnoses(&cfg.hosp, &cfg.diseases, &mut policy)?;
    let ecgs = read_ecg_list(&cfg.ecg, &mut policy)?;
    let cxrs = read_cxr_list(&cfg.cxr, &mut policy)?;

    let mut candidates = Vec::new();
    for a in &admissions {
        let labels: Vec<Disease> = diagnoses.get(&a.hadm).map(|s| s.iter().copied().collect()).unwrap_or_default();
        let reason = if labels.is_empty() {
            Some("no target diagnosis")
        } else if !patients.contains(&a.subject) {
            Some("subject not in patients")
        } else {
            None
        };
        if let Some(r) = reason {
            policy.skip(r);
            continue;
        }
        let Some((_, ecg)) = first_within(ecgs.get(&a.subject), a.admit, a.disch) else {
            policy.skip("no ECG in admission");
            continue;
        };
        let Some((cxr_time, cxr)) = first_within(cxrs.get(&a.subject), a.admit, a.disch) else {
            policy.skip("no CXR in admission");
            continue;
        };
        candidates.push(Candidate {
            subject: a.subject,
            hadm: a.hadm,
            labels,
            ecg_stem: cfg.ecg.join(ecg),
            cxr_path: cfg.cxr.join(cxr),
            cxr_time: *cxr_time,
            labs: Vec::new(),
        });
    }
    collect_labs(cfg, &mut candidates, &mut policy)?;
    write_dataset(cfg, admissions.len(), candidates, policy)
}

/// One pass over labevents: each row goes to the candidates of its subject whose window holds it.
fn collect_labs(cfg: &BuildMimicConfig, candidates: &mut [Candidate], policy: &mut RowPolicy) -> Result<(), DataError> {
    let mut by_subject: HashMap<u64, Vec<usize>> = HashMap::new();
    for (i, c) in candidates.iter().enumerate() {
        by_subject.entry(c.subject).or_default().push(i);
    }
    let plain = cfg.hosp.join("labevents.csv");
    let path = if plain.exists() { plain } else { cfg.hosp.join("labevents.csv.gz") };
    for_each_lab_row(&path, |row| {
        let e = match row {
            Ok(e) => e,
            Err(err) => return policy.bad_row(err, "labevents"),
        };
        let Some(list) = e.subject_id.and_then(|s| by_subject.get(&s)) else { return Ok(()) };
        let Some(t) = parse_datetime(&e.charttime) else { return Ok(()) };
        for &i in list {
            let c = &mut candidates[i];
            if t <= c.cxr_time && t >= c.cxr_time - LAB_WINDOW_S {
                c.labs.push(e.clone());
            }
        }
        Ok(())
    })
}

/// Checks one candidate's files; `Err(reason)` to skip it.
fn check_files(c: &Candidate) -> Result<crate::wfdb::WfdbRecord, (&'static str, DataError)> {
    let rec = read_record(&c.ecg_stem).map_err(|e| ("unreadable ECG record", e))?;
    ecg_model_input(&rec, &c.ecg_stem).map_err(|e| ("ECG without the 12 standard leads", e))?;
    let dims = image::ImageReader::open(&c.cxr_path)
        .map_err(|e| DataError::io(&c.cxr_path, e))
        .and_then(|r| r.with_guessed_format().map_err(|e| DataError::io(&c.cxr_path, e)))
        .and_then(|r| r.into_dimensions().map_err(|e| DataError::Image { path: c.cxr_path.clone(), problem: e.to_string() }));
    dims.map_err(|e| ("missing or unreadable CXR image", e))?;
    Ok(rec)
}

fn write_dataset(
    cfg: &BuildMimicConfig,
    n_admissions: usize,
    candidates: Vec<Candidate>,
    mut policy: RowPolicy,
) -> Result<BuildReport, DataError> {
    for sub in ["ecg", "cxr", "labs"] {
        let d = cfg.out.join(sub);
        std::fs::create_dir_all(&d).map_err(|e| DataError::io(&d, e))?;
    }
    let progress = Progress::new(cfg.progress, candidates.len(), "build-mimic");
    let mut samples = Vec::new();
    let mut train_labs = Vec::new();
    let mut report = BuildReport {
        admissions: n_admissions,
        matched: 0,
        skipped: BTreeMap::new(),
        by_split: BTreeMap::new(),
        by_disease: BTreeMap::new(),
    };
    for (k, c) in candidates.into_iter().enumerate() {
        progress.inc(k + 1);
        if c.labs.is_empty() {
            policy.skip("no labs in the 24 h before the CXR");
            continue;
        }
        let rec = match check_files(&c) {
            Ok(rec) => rec,
            Err((_, e)) if cfg.strict => return Err(e),
            Err((reason, _)) => {
                policy.skip(reason);
                continue;
            }
        };
        let enc = format!("enc-{}", c.hadm);
        rec.write(&cfg.out.join("ecg").join(&enc))?;
        let ext = c.cxr_path.extension().and_then(|e| e.to_str()).unwrap_or("jpg").to_ascii_lowercase();
        let cxr_rel = format!("cxr/{enc}.{ext}");
        std::fs::copy(&c.cxr_path, cfg.out.join(&cxr_rel)).map_err(|e| DataError::io(&c.cxr_path, e))?;
        let lab_rel = format!("labs/{enc}.csv");
        write_lab_csv(&cfg.out.join(&lab_rel), &c.labs)?;

        let findings = Findings {
            ecg_present: true,
            cxr_present: true,
            lab_present: true,
            ecg: measure_rhythm(&rec).map(|r| EcgFindings {
                heart_rate: r.heart_rate,
                irregular: r.irregular(),
                st_depression: None,
                t_inversion: None,
                lvh_voltage: None,
                peaked_t: None,
            }),
            cxr: None,
            labs: qa_text::abnormal_labs(&c.labs),
        };
        let split = split_for_subject(c.subject);
        let base = QaSample {
            id: format!("{enc}-phys"),
            split,
            kind: QaKind::Physiological,
            encounter_id: enc.clone(),
            ecg: Some(format!("ecg/{enc}")),
            cxr: Some(cxr_rel),
            lab: Some(lab_rel),
            question: qa_text::physiological_question(&findings),
            answer: qa_text::physiological_answer(&findings),
            labels: c.labels.iter().map(|d| d.name().to_string()).collect(),
        };
        let dx = QaSample {
            id: format!("{enc}-dx"),
            kind: QaKind::Disease,
            question: qa_text::disease_question(&findings, &cfg.diseases),
            answer: qa_text::disease_answer(&findings, &c.labels),
            ..base.clone()
        };
        samples.push(base);
        samples.push(dx);
        report.matched += 1;
        *report.by_split.entry(split.to_string()).or_default() += 1;
        for d in &c.labels {
            *report.by_disease.entry(d.name().to_string()).or_default() += 1;
        }
        if split == Split::Train {
            train_labs.push(c.labs);
        }
    }
    progress.finish();
    write_jsonl(&cfg.out.join("qa.jsonl"), &samples)?;
    LabPercentiles::fit(train_labs.iter().map(Vec::as_slice)).save(&cfg.out.join("lab_percentiles.json"))?;
    report.skipped = policy.skipped;
    let path = cfg.out.join("build_report.json");
    let json = serde_json::to_string_pretty(&report).map_err(|e| DataError::Json { path: path.clone(), problem: e.to_string() })?;
    std::fs::write(&path, json).map_err(|e| DataError::io(&path, e))?;
    let readme = cfg.out.join("README.md");
    let text = format!(
        "# MedTVT-QA from MIMIC\n\nBuilt by `medtvt data build-mimic` from MIMIC-IV hosp ({}), MIMIC-IV-ECG ({}) and \
         MIMIC-CXR-JPG ({}). Contains credentialed PhysioNet data: keep it under the MIMIC data use agreement.\n\n\
         Same layout as the synthetic set (see the repository's docs/data.md); `build_report.json` lists what \
         was matched and skipped.\n\nAdmissions: {}, matched: {}\n",
        cfg.hosp.display(),
        cfg.ecg.display(),
        cfg.cxr.display(),
        report.admissions,
        report.matched
    );
    std::fs::write(&readme, text).map_err(|e| DataError::io(&readme, e))?;
    Ok(report)
}
