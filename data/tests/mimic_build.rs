//! build-mimic on a small fake tree in the real MIMIC layouts (MIMIC-IV hosp tables, MIMIC-IV-ECG
//! record_list + files/pNNNN/pSUBJECT/sSTUDY/STUDY.hea/.dat, MIMIC-CXR-JPG metadata +
//! files/pNN/pSUBJECT/sSTUDY/DICOM.jpg), written by the test into a temporary directory.

use flate2::write::GzEncoder;
use medtvt_data::disease::Disease;
use medtvt_data::labs::{read_lab_csv, LabPercentiles};
use medtvt_data::mimic::{build_mimic, BuildMimicConfig};
use medtvt_data::synth::ecg::{synthesize_ecg, EcgSigns};
use medtvt_data::wfdb::{write_record, SignalFormat, ECG_LEADS};
use medtvt_data::{load_inputs, read_jsonl, QaKind};
use rand::SeedableRng;
use std::io::Write;
use std::path::Path;

fn write(path: &Path, text: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
}

fn ecg_record(root: &Path, subject: u64, study: u64, irregular: bool) -> String {
    let rel = format!("files/p{}/p{subject}/s{study}/{study}", &subject.to_string()[..4]);
    let stem = root.join(&rel);
    std::fs::create_dir_all(stem.parent().unwrap()).unwrap();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(study);
    let signs = EcgSigns { heart_rate: 72.0, af: irregular, ..EcgSigns::default() };
    let leads = synthesize_ecg(&mut rng, &signs);
    write_record(&stem, 500.0, &ECG_LEADS, &leads, SignalFormat::F16, &[200.0; 12], &[0; 12]).unwrap();
    rel
}

fn cxr_image(root: &Path, subject: u64, study: u64, dicom: &str) {
    let s = subject.to_string();
    let path = root.join(format!("files/p{}/p{s}/s{study}/{dicom}.jpg", &s[..2]));
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    image::GrayImage::from_fn(48, 40, |x, y| image::Luma([((x * 5 + y * 3) % 256) as u8])).save(&path).unwrap();
}

/// Admissions: 1 and 2 match; 3 has its ECG after discharge; 4 has no target diagnosis; 5 has a
/// truncated ECG; 6 has labs only outside the 24 h window; 7 has no CXR at all.
fn fake_tree(root: &Path) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    let hosp = root.join("mimic-iv/hosp");
    let ecg = root.join("mimic-iv-ecg");
    let cxr = root.join("mimic-cxr-jpg");
    write(&hosp.join("patients.csv"), "subject_id,gender,anchor_age,anchor_year,anchor_year_group,dod\n\
        10000001,F,60,2150,2008 - 2010,\n10000002,M,70,2150,2008 - 2010,\n10000003,M,50,2150,2008 - 2010,\n\
        10000004,F,80,2150,2008 - 2010,\n10000005,F,65,2150,2008 - 2010,\n10000006,M,55,2150,2008 - 2010,\n10000007,M,45,2150,2008 - 2010,\n");
    let mut adm = String::from("subject_id,hadm_id,admittime,dischtime,deathtime,admission_type\n");
    let mut dx = String::from("subject_id,hadm_id,seq_num,icd_code,icd_version\n");
    let mut ecg_list = String::from("subject_id,study_id,file_name,ecg_time,path\n");
    let mut meta = String::from("dicom_id,subject_id,study_id,PerformedProcedureStepDescription,ViewPosition,Rows,Columns,StudyDate,StudyTime\n");
    for k in 1..=7u64 {
        let subject = 10_000_000 + k;
        let hadm = 20_000_000 + k;
        adm.push_str(&format!("{subject},{hadm},2150-0{k}-01 08:00:00,2150-0{k}-05 12:00:00,,URGENT\n"));
        let ecg_day = if k == 3 { 7 } else { 1 };
        let study = 40_000_000 + k;
        let rel = ecg_record(&ecg, subject, study, k == 2);
        ecg_list.push_str(&format!("{subject},{study},{study},2150-0{k}-0{ecg_day} 09:00:00,{rel}\n"));
        if k != 7 {
            let cstudy = 50_000_000 + k;
            let dicom = format!("d{k}aa-bb");
            cxr_image(&cxr, subject, cstudy, &dicom);
            meta.push_str(&format!("{dicom},{subject},{cstudy},CHEST (PA AND LAT),PA,40,48,21500{k}02,101500.000\n"));
            meta.push_str(&format!(
                "{dicom}-lat,{subject},{cstudy},CHEST (PA AND LAT),LATERAL,40,48,21500{k}02,101600.000\n"
            ));
        }
    }
    dx.push_str("10000001,20000001,1,I10,10\n10000001,20000001,2,E119,10\n10000001,20000001,3,K219,10\n");
    dx.push_str("10000002,20000002,1,A419,10\n10000002,20000002,2,J189,10\n10000002,20000002,3,42731,9\n");
    dx.push_str("10000003,20000003,1,I10,10\n10000004,20000004,1,K219,10\n10000005,20000005,1,N179,10\n");
    dx.push_str("10000006,20000006,1,I2510,10\n10000007,20000007,1,I10,10\n");
    write(&hosp.join("admissions.csv"), &adm);
    write(&hosp.join("diagnoses_icd.csv"), &dx);
    write(&ecg.join("record_list.csv"), &ecg_list);
    write(&cxr.join("mimic-cxr-2.0.0-metadata.csv"), &meta);
    // Admission 5's ECG is truncated.
    let dat = ecg.join("files/p1000/p10000005/s40000005/40000005.dat");
    let bytes = std::fs::read(&dat).unwrap();
    std::fs::write(&dat, &bytes[..1000]).unwrap();

    let mut labs = String::from("labevent_id,subject_id,hadm_id,specimen_id,itemid,order_provider_id,charttime,storetime,value,valuenum,valueuom,ref_range_lower,ref_range_upper,flag,priority,comments\n");
    let mut id = 0;
    let mut row = |subject: u64, itemid: u32, time: &str, v: f64, lo: f64, hi: f64| {
        id += 1;
        let flag = if v < lo || v > hi { "abnormal" } else { "" };
        labs.push_str(&format!(
            "{id},{subject},,{id},{itemid},,{time},{time},{v},{v},mg/dL,{lo},{hi},{flag},ROUTINE,\n"
        ));
    };
    for k in 1..=6u64 {
        let subject = 10_000_000 + k;
        let day = if k == 6 { "2150-06-01 05:00:00" } else { "" };
        let in_window = format!("2150-0{k}-01 20:00:00");
        let t = if k == 6 { day.to_string() } else { in_window };
        row(subject, 50912, &t, 1.0, 0.5, 1.2);
        row(subject, 50931, &t, if k == 1 { 250.0 } else { 90.0 }, 70.0, 100.0);
    }
    row(10_000_001, 50912, "2150-01-03 20:00:00", 9.0, 0.5, 1.2); // after the X-ray: not in the slice
    row(10_000_002, 50813, "2150-02-01 21:00:00", 4.5, 0.5, 2.0);
    row(10_000_002, 51301, "2150-02-01 21:00:00", 18.0, 4.0, 11.0);
    let mut gz = GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(labs.as_bytes()).unwrap();
    std::fs::write(hosp.join("labevents.csv.gz"), gz.finish().unwrap()).unwrap();
    (hosp, ecg, cxr)
}

fn config(root: &Path, strict: bool) -> BuildMimicConfig {
    let (hosp, ecg, cxr) = fake_tree(root);
    BuildMimicConfig {
        hosp,
        ecg,
        cxr,
        out: root.join("out"),
        strict,
        replace: false,
        diseases: Disease::ALL.to_vec(),
        progress: false,
    }
}

#[test]
fn pairs_admissions_and_counts_skips_by_reason() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), false);
    let report = build_mimic(&cfg).unwrap();
    assert_eq!((report.admissions, report.matched), (7, 2), "{report:?}");
    let skipped = |r: &str| report.skipped.get(r).copied().unwrap_or(0);
    assert_eq!(skipped("no ECG in admission"), 1, "{report:?}");
    assert_eq!(skipped("no target diagnosis"), 1);
    assert_eq!(skipped("unreadable ECG record"), 1);
    assert_eq!(skipped("no labs in the 24 h before the CXR"), 1);
    assert_eq!(skipped("no CXR in admission"), 1);
    assert_eq!(skipped("cxr images not PA/AP (ignored)"), 6);

    let samples = read_jsonl(&cfg.out.join("qa.jsonl")).unwrap();
    assert_eq!(samples.len(), 4);
    let dx1 = samples.iter().find(|s| s.id == "enc-20000001-dx").unwrap();
    assert_eq!(dx1.labels, vec!["hypertension", "diabetes mellitus"]);
    assert!(dx1.answer.contains("Glucose 250 mg/dL suggests diabetes mellitus"), "{}", dx1.answer);
    let dx2 = samples.iter().find(|s| s.id == "enc-20000002-dx").unwrap();
    assert_eq!(dx2.labels, vec!["atrial fibrillation", "pneumonia", "sepsis"]);
    assert!(dx2.answer.contains("Irregular rhythm without P waves suggests atrial fibrillation"), "{}", dx2.answer);
    let phys1 = samples.iter().find(|s| s.id == "enc-20000001-phys").unwrap();
    assert_eq!(phys1.kind, QaKind::Physiological);
    // The rate is measured from the record (drawn at 72 bpm with beat-to-beat jitter).
    let bpm: f64 =
        phys1.answer.split("sinus rhythm, ").nth(1).and_then(|r| r.split(' ').next()).unwrap().parse().unwrap();
    assert!((68.0..=76.0).contains(&bpm), "{}", phys1.answer);

    // The lab slice holds the 24 h before the X-ray only.
    let labs = read_lab_csv(&cfg.out.join("labs/enc-20000001.csv")).unwrap();
    assert_eq!(labs.len(), 2);
    assert!(labs.iter().all(|e| e.valuenum != Some(9.0)));
    let p = LabPercentiles::load(&cfg.out.join("lab_percentiles.json")).unwrap();
    for s in &samples {
        let inputs = load_inputs(&cfg.out, s, &p, 16).unwrap();
        assert_eq!(inputs.ecg.map(|v| v.len()), Some(12_000));
        assert_eq!(inputs.cxr.map(|v| v.len()), Some(3 * 16 * 16));
        assert_eq!(inputs.lab.map(|v| v.len()), Some(100));
    }
    assert!(cfg.out.join("build_report.json").exists() && cfg.out.join("README.md").exists());
}

#[test]
fn strict_mode_stops_at_the_bad_record_and_names_it() {
    let dir = tempfile::tempdir().unwrap();
    let e = build_mimic(&config(dir.path(), true)).unwrap_err().to_string();
    assert!(e.contains("40000005.dat") && e.contains("truncated"), "{e}");
}

#[test]
fn bad_table_rows_are_counted_or_named() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), false);
    let adm = cfg.hosp.join("admissions.csv");
    let mut text = std::fs::read_to_string(&adm).unwrap();
    text.push_str("10000009,20000009,not-a-time,2150-01-05 12:00:00,,URGENT\n");
    std::fs::write(&adm, &text).unwrap();
    let report = build_mimic(&cfg).unwrap();
    assert_eq!(report.skipped.get("bad row in admissions.csv"), Some(&1));
    let skip = report.skips.iter().find(|s| s.reason == "bad row in admissions.csv").unwrap();
    assert_eq!((skip.file.clone(), skip.line, skip.hadm_id), (adm.clone(), Some(9), None), "{skip:?}");
    assert!(skip.problem.contains("admittime") && skip.problem.contains("not-a-time"), "{skip:?}");
    let strict = BuildMimicConfig { strict: true, replace: true, ..cfg };
    let e = build_mimic(&strict).unwrap_err().to_string();
    assert!(e.contains("admissions.csv:9") && e.contains("admittime"), "{e}");
}

#[test]
fn each_skipped_admission_is_named_with_its_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), false);
    let report = build_mimic(&cfg).unwrap();
    let skip = |hadm: u64| {
        report
            .skips
            .iter()
            .find(|s| s.hadm_id == Some(hadm))
            .unwrap_or_else(|| panic!("{hadm} not listed: {report:#?}"))
    };
    let admissions = cfg.hosp.join("admissions.csv");
    // Admission k is on line k + 1 of admissions.csv.
    let no_ecg = skip(20_000_003);
    assert_eq!((no_ecg.reason.as_str(), &no_ecg.file, no_ecg.line), ("no ECG in admission", &admissions, Some(4)));
    assert_eq!((skip(20_000_004).reason.as_str(), skip(20_000_004).line), ("no target diagnosis", Some(5)));
    assert_eq!(skip(20_000_007).reason, "no CXR in admission");
    let ecg = skip(20_000_005);
    assert_eq!(ecg.reason, "unreadable ECG record");
    assert!(
        ecg.file.ends_with("files/p1000/p10000005/s40000005/40000005.dat") && ecg.problem.contains("truncated"),
        "{ecg:?}"
    );
    let labs = skip(20_000_006);
    assert!(labs.reason.starts_with("no labs") && labs.file.ends_with("labevents.csv.gz"), "{labs:?}");
    assert_eq!(report.skips.len(), 5, "{report:#?}");
    let written: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(cfg.out.join("build_report.json")).unwrap()).unwrap();
    assert_eq!(written["skips"][0]["hadm_id"], 20_000_003);
    assert_eq!(written["skips"][0]["line"], 4);
    assert!(written["skips"][0]["file"].as_str().unwrap().ends_with("admissions.csv"));
}

#[test]
fn a_truncated_cxr_jpeg_skips_its_admission_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), false);
    let jpg = cfg.cxr.join("files/p10/p10000001/s50000001/d1aa-bb.jpg");
    let bytes = std::fs::read(&jpg).unwrap();
    std::fs::write(&jpg, &bytes[..bytes.len() * 3 / 4]).unwrap();
    let report = build_mimic(&cfg).unwrap();
    assert_eq!(report.matched, 1, "{report:#?}");
    let skip = report.skips.iter().find(|s| s.hadm_id == Some(20_000_001)).unwrap();
    assert_eq!((skip.reason.as_str(), &skip.file), ("missing or unreadable CXR image", &jpg));
    assert!(skip.problem.contains("truncated"), "{skip:?}");
    let e = build_mimic(&BuildMimicConfig { strict: true, replace: true, ..cfg }).unwrap_err().to_string();
    assert!(e.contains("d1aa-bb.jpg") && e.contains("truncated"), "{e}");
}

#[test]
fn a_bad_lab_row_in_the_window_skips_the_sample_instead_of_vanishing() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), false);
    let gz = cfg.hosp.join("labevents.csv.gz");
    let mut text = String::new();
    std::io::Read::read_to_string(&mut flate2::read::GzDecoder::new(std::fs::File::open(&gz).unwrap()), &mut text)
        .unwrap();
    std::fs::remove_file(&gz).unwrap();
    let lines = text.lines().count() as u64;
    // Admission 1's window: its lactate row does not parse. Subject 4 has no sample.
    text.push_str("900,10000001,,900,50813,,2150-01-01 21:00:00,,4.5,four point five,mmol/L,0.5,2.0,abnormal,STAT,\n");
    text.push_str("901,10000004,,901,50813,,2150-04-01 21:00:00,,4.5,x,mmol/L,0.5,2.0,,STAT,\n");
    let plain = cfg.hosp.join("labevents.csv");
    std::fs::write(&plain, &text).unwrap();
    let report = build_mimic(&cfg).unwrap();
    assert_eq!(report.matched, 1, "{report:#?}");
    let skip = report.skips.iter().find(|s| s.hadm_id == Some(20_000_001)).expect("admission 1 is skipped");
    assert_eq!(
        (skip.reason.as_str(), &skip.file, skip.line),
        ("bad labevents row in the lab window", &plain, Some(lines + 1))
    );
    assert!(skip.problem.contains("valuenum") && skip.problem.contains("four point five"), "{skip:?}");
    let row = report.skips.iter().find(|s| s.reason == "bad row in labevents").expect("the other row is reported");
    assert_eq!((row.hadm_id, row.line), (None, Some(lines + 2)));
    assert!(!read_jsonl(&cfg.out.join("qa.jsonl")).unwrap().iter().any(|s| s.encounter_id == "enc-20000001"));
}

#[test]
fn a_non_empty_output_folder_is_refused_unless_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), false);
    build_mimic(&cfg).unwrap();
    let stale = cfg.out.join("ecg/enc-99999999.hea");
    std::fs::write(&stale, "old build").unwrap();
    std::fs::write(cfg.out.join("notes.txt"), "mine").unwrap();
    let e = build_mimic(&cfg).unwrap_err().to_string();
    assert!(e.contains(cfg.out.to_str().unwrap()) && e.contains("not empty"), "{e}");
    assert!(stale.exists());
    let report = build_mimic(&BuildMimicConfig { replace: true, ..cfg.clone() }).unwrap();
    assert_eq!(report.matched, 2);
    assert!(!stale.exists(), "the previous build's files are gone");
    assert!(cfg.out.join("ecg/enc-20000001.hea").exists());
    assert_eq!(
        std::fs::read_to_string(cfg.out.join("notes.txt")).unwrap(),
        "mine",
        "files the build does not own stay"
    );
}

#[test]
fn an_empty_table_is_said_to_be_empty() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), false);
    std::fs::write(cfg.hosp.join("patients.csv"), "").unwrap();
    let e = build_mimic(&cfg).unwrap_err().to_string();
    assert!(e.contains("patients.csv") && e.contains("is empty") && !e.contains("missing"), "{e}");
}
