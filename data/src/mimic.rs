//! `medtvt data build-mimic`: pairs a user's copies of MIMIC-IV (hosp), MIMIC-IV-ECG and
//! MIMIC-CXR-JPG into a MedTVT-QA set with the same layout as the synthetic one.
//!
//! Pairing (the Symile-MIMIC rule): per admission, the first ECG and the first chest X-ray
//! (PA or AP view) taken between admission and discharge, and the lab rows of the same patient
//! from the 24 h before that X-ray. Labels come from the admission's ICD codes
//! ([`Disease::from_icd`]). Admissions without a target diagnosis, without an ECG, X-ray or labs
//! in the window, or whose files are missing or unreadable are skipped, counted by reason and
//! listed one by one ([`Skip`]: the admission, the file and line where the reason shows, the
//! problem); with `strict` an unreadable record or a bad table row stops the build instead. A
//! labevents row that cannot be parsed skips the admissions whose lab window it falls in (their
//! lab slice would silently lack a value), rather than being dropped from the slice.
//!
//! The output folder must be empty or absent; with `replace` what a build writes there (see
//! [`OWNED_OUTPUTS`]) is deleted first, and nothing else is touched.
//!
//! Tables are read as `NAME.csv` or `NAME.csv.gz`. Expected columns: admissions (subject_id,
//! hadm_id, admittime, dischtime), diagnoses_icd (hadm_id, icd_code, icd_version), patients
//! (subject_id), labevents (see [`crate::labs`]), MIMIC-IV-ECG `record_list` (subject_id,
//! ecg_time, path), MIMIC-CXR-JPG `mimic-cxr-2.0.0-metadata` (dicom_id, subject_id, study_id,
//! StudyDate, StudyTime, optional ViewPosition), with images at
//! `files/pXX/pSUBJECT/sSTUDY/DICOM_ID.jpg`.

use crate::disease::Disease;
use crate::error::DataError;
use crate::labs::{csv_header, for_each_lab_row, open_maybe_gz, write_lab_csv, LabEvent, LabPercentiles};
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
    /// Delete a previous build's files in `out` first, instead of refusing a non-empty `out`.
    pub replace: bool,
    pub diseases: Vec<Disease>,
    pub progress: bool,
}

/// What a build writes in its output folder, and deletes first when asked to replace it.
pub const OWNED_OUTPUTS: [&str; 7] =
    ["ecg", "cxr", "labs", "qa.jsonl", "lab_percentiles.json", "build_report.json", "README.md"];

/// What the build did.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct BuildReport {
    pub admissions: usize,
    pub matched: usize,
    /// Skipped admissions (and bad table rows) by reason.
    pub skipped: BTreeMap<String, usize>,
    pub by_split: BTreeMap<String, usize>,
    pub by_disease: BTreeMap<String, usize>,
    /// Every skipped admission and bad table row, in the order they were met (the lateral
    /// X-rays counted under `cxr images not PA/AP (ignored)` are not listed).
    pub skips: Vec<Skip>,
}

/// One skipped admission or bad table row: where to look and what is wrong.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Skip {
    /// The admission, or `None` for a table row that belongs to none.
    pub hadm_id: Option<u64>,
    /// One of the reasons counted in [`BuildReport::skipped`].
    pub reason: String,
    /// The file where the reason shows: the admission's row, the unreadable record or image, the
    /// bad row.
    pub file: PathBuf,
    /// Its line, where one applies.
    pub line: Option<u64>,
    /// The field and what is wrong with it, or what was looked for and not found.
    pub problem: String,
}

impl std::fmt::Display for Skip {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(hadm) = self.hadm_id {
            write!(f, "admission {hadm}: ")?;
        }
        write!(f, "{}: {}", self.reason, self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        write!(f, ": {}", self.problem)
    }
}

/// Lab window before the X-ray.
const LAB_WINDOW_S: i64 = 24 * 3600;

struct Admission {
    subject: u64,
    hadm: u64,
    admit: i64,
    disch: i64,
    /// Its line in the admissions table.
    line: u64,
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
    /// The first labevents row in its window that could not be parsed: file, line, problem.
    bad_lab_row: Option<(PathBuf, Option<u64>, String)>,
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
        let path = if plain.exists() {
            plain
        } else if gz.exists() {
            gz
        } else {
            return Err(DataError::io(
                plain,
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!("neither {name}.csv nor {name}.csv.gz exists"),
                ),
            ));
        };
        let mut reader = csv::ReaderBuilder::new().flexible(true).from_reader(open_maybe_gz(&path)?);
        let header = csv_header(&path, &mut reader)?;
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

    /// Calls `f(row)` for each row; `f` returns a row error as `Err((column, problem))`.
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

/// Skip, count and list, or stop (`strict`).
struct RowPolicy {
    strict: bool,
    skipped: BTreeMap<String, usize>,
    skips: Vec<Skip>,
}

impl RowPolicy {
    fn bad_row(&mut self, e: DataError, table: &str) -> Result<(), DataError> {
        if self.strict {
            return Err(e);
        }
        self.skip_for_error(None, &format!("bad row in {table}"), &e, Path::new(table));
        Ok(())
    }

    /// Counts and lists one skip.
    fn skip(&mut self, skip: Skip) {
        *self.skipped.entry(skip.reason.clone()).or_default() += 1;
        self.skips.push(skip);
    }

    /// A skip whose cause is `e`: its file and line are the error's (`fallback` when it names none).
    fn skip_for_error(&mut self, hadm_id: Option<u64>, reason: &str, e: &DataError, fallback: &Path) {
        let file = e.path().unwrap_or(fallback).to_path_buf();
        self.skip(Skip { hadm_id, reason: reason.into(), file, line: e.line(), problem: e.detail() });
    }

    /// A skipped admission whose reason shows in its own row of the admissions table.
    fn skip_admission(&mut self, a: &Admission, table: &Path, reason: &str, problem: String) {
        self.skip(Skip {
            hadm_id: Some(a.hadm),
            reason: reason.into(),
            file: table.to_path_buf(),
            line: Some(a.line),
            problem,
        });
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

/// The admissions, sorted by `hadm_id`, and the table's path.
fn read_admissions(hosp: &Path, policy: &mut RowPolicy) -> Result<(Vec<Admission>, PathBuf), DataError> {
    let t = Table::open(hosp, "admissions")?;
    let path = t.path.clone();
    let (cs, ch, ca, cd) =
        (t.column("subject_id")?, t.column("hadm_id")?, t.column("admittime")?, t.column("dischtime")?);
    let mut out = Vec::new();
    t.rows(policy, |r| {
        out.push(Admission {
            subject: id(r, cs, "subject_id")?,
            hadm: id(r, ch, "hadm_id")?,
            admit: time(r, ca, "admittime")?,
            disch: time(r, cd, "dischtime")?,
            line: r.position().map_or(0, |p| p.line()),
        });
        Ok(())
    })?;
    out.sort_by_key(|a| a.hadm);
    Ok((out, path))
}

fn read_diagnoses(
    hosp: &Path,
    allowed: &[Disease],
    policy: &mut RowPolicy,
) -> Result<HashMap<u64, BTreeSet<Disease>>, DataError> {
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
    let (cdcm, cs, cst, cd, ct) = (
        t.column("dicom_id")?,
        t.column("subject_id")?,
        t.column("study_id")?,
        t.column("StudyDate")?,
        t.column("StudyTime")?,
    );
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
        let when = parse_study_datetime(d, tm)
            .ok_or_else(|| ("StudyTime".to_string(), format!("{d:?} {tm:?} is not a date and time")))?;
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
    check_output_folder(&cfg.out, cfg.replace)?;
    let mut policy = RowPolicy { strict: cfg.strict, skipped: BTreeMap::new(), skips: Vec::new() };
    let patients = read_patients(&cfg.hosp, &mut policy)?;
    let (admissions, admissions_table) = read_admissions(&cfg.hosp, &mut policy)?;
    let diagnoses = read_diagnoses(&cfg.hosp, &cfg.diseases, &mut policy)?;
    let ecgs = read_ecg_list(&cfg.ecg, &mut policy)?;
    let cxrs = read_cxr_list(&cfg.cxr, &mut policy)?;

    let mut candidates = Vec::new();
    for a in &admissions {
        let labels: Vec<Disease> = diagnoses.get(&a.hadm).map(|s| s.iter().copied().collect()).unwrap_or_default();
        let table = admissions_table.as_path();
        if labels.is_empty() {
            let problem = "no ICD code of a target disease in diagnoses_icd".to_string();
            policy.skip_admission(a, table, "no target diagnosis", problem);
            continue;
        }
        if !patients.contains(&a.subject) {
            let problem = format!("subject_id {} is not in patients", a.subject);
            policy.skip_admission(a, table, "subject not in patients", problem);
            continue;
        }
        let Some((_, ecg)) = first_within(ecgs.get(&a.subject), a.admit, a.disch) else {
            let problem = format!("record_list has no ECG of subject {} between admittime and dischtime", a.subject);
            policy.skip_admission(a, table, "no ECG in admission", problem);
            continue;
        };
        let Some((cxr_time, cxr)) = first_within(cxrs.get(&a.subject), a.admit, a.disch) else {
            let problem =
                format!("the CXR metadata has no PA/AP image of subject {} between admittime and dischtime", a.subject);
            policy.skip_admission(a, table, "no CXR in admission", problem);
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
            bad_lab_row: None,
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
    let path = labevents_path(&cfg.hosp);
    let in_window = |c: &Candidate, t: i64| t <= c.cxr_time && t >= c.cxr_time - LAB_WINDOW_S;
    for_each_lab_row(&path, |row| {
        let e = match row {
            Ok(e) => e,
            Err(bad) => {
                if policy.strict {
                    return Err(bad.error);
                }
                // The admissions whose window the row falls in (every admission of its subject
                // when its time is unreadable) are skipped; a row of no admission is reported alone.
                let list = bad.subject_id.and_then(|s| by_subject.get(&s)).map_or(&[][..], Vec::as_slice);
                let when = bad.charttime.as_deref().and_then(parse_datetime);
                let hit: Vec<usize> =
                    list.iter().copied().filter(|&i| when.is_none_or(|t| in_window(&candidates[i], t))).collect();
                if hit.is_empty() {
                    return policy.bad_row(bad.error, "labevents");
                }
                for i in hit {
                    let c = &mut candidates[i];
                    if c.bad_lab_row.is_none() {
                        let file = bad.error.path().unwrap_or(&path).to_path_buf();
                        c.bad_lab_row = Some((file, bad.error.line(), bad.error.detail()));
                    }
                }
                return Ok(());
            }
        };
        let Some(list) = e.subject_id.and_then(|s| by_subject.get(&s)) else { return Ok(()) };
        let Some(t) = parse_datetime(&e.charttime) else { return Ok(()) };
        for &i in list {
            let c = &mut candidates[i];
            if in_window(c, t) {
                c.labs.push(e.clone());
            }
        }
        Ok(())
    })
}

/// `hosp/labevents.csv`, else `hosp/labevents.csv.gz`.
fn labevents_path(hosp: &Path) -> PathBuf {
    let plain = hosp.join("labevents.csv");
    if plain.exists() {
        plain
    } else {
        hosp.join("labevents.csv.gz")
    }
}

/// Checks one candidate's files with the readers training uses (the X-ray is decoded whole, so
/// a truncated JPEG is caught); `Err(reason)` to skip it.
fn check_files(c: &Candidate) -> Result<crate::wfdb::WfdbRecord, (&'static str, DataError)> {
    let rec = read_record(&c.ecg_stem).map_err(|e| ("unreadable ECG record", e))?;
    ecg_model_input(&rec, &c.ecg_stem).map_err(|e| ("ECG without the 12 standard leads", e))?;
    crate::image::open_image(&c.cxr_path).map_err(|e| ("missing or unreadable CXR image", e))?;
    Ok(rec)
}

/// Refuses an output folder that is a file, or that holds anything unless `replace`; with
/// `replace`, deletes what a previous build wrote there ([`OWNED_OUTPUTS`]).
fn check_output_folder(out: &Path, replace: bool) -> Result<(), DataError> {
    let entries = match std::fs::read_dir(out) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(DataError::io(out, e)),
    };
    let mut names: Vec<String> = entries.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    if names.is_empty() {
        return Ok(());
    }
    names.sort();
    if !replace {
        return Err(DataError::OutputNotEmpty {
            path: out.to_path_buf(),
            holds: names.into_iter().take(3).collect::<Vec<_>>().join(", "),
        });
    }
    for name in OWNED_OUTPUTS.iter().filter(|n| names.iter().any(|have| have == *n)) {
        let path = out.join(name);
        let removed = if path.is_dir() { std::fs::remove_dir_all(&path) } else { std::fs::remove_file(&path) };
        removed.map_err(|e| DataError::io(&path, e))?;
    }
    Ok(())
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
        skips: Vec::new(),
    };
    for (k, mut c) in candidates.into_iter().enumerate() {
        progress.inc(k + 1);
        if let Some((file, line, problem)) = c.bad_lab_row.take() {
            policy.skip(Skip {
                hadm_id: Some(c.hadm),
                reason: "bad labevents row in the lab window".into(),
                file,
                line,
                problem,
            });
            continue;
        }
        if c.labs.is_empty() {
            let problem = format!("no row of subject {} in the 24 h before the X-ray", c.subject);
            let file = labevents_path(&cfg.hosp);
            policy.skip(Skip {
                hadm_id: Some(c.hadm),
                reason: "no labs in the 24 h before the CXR".into(),
                file,
                line: None,
                problem,
            });
            continue;
        }
        let rec = match check_files(&c) {
            Ok(rec) => rec,
            Err((_, e)) if cfg.strict => return Err(e),
            Err((reason, e)) => {
                policy.skip_for_error(Some(c.hadm), reason, &e, &c.ecg_stem);
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
    report.skips = policy.skips;
    let path = cfg.out.join("build_report.json");
    let json = serde_json::to_string_pretty(&report)
        .map_err(|e| DataError::Json { path: path.clone(), problem: e.to_string() })?;
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
