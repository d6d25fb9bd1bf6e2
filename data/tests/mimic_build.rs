//! build-mimic on a small fake tree in the real MIMIC layouts (MIMIC-IV hosp tables, MIMIC-IV-ECG
//! record_list + files/pNNNN/pSUBJECT/sSTUDY/STUDY.hea/.dat, MIMIC-CXR-JPG metadata +
//! files/pNN/pSUBJECT/sSTUDY/DICOM.jpg), written by the test into a temporary directory.

use flate2::write::GzEncoder;
use medtvt_data::labs::{read_lab_csv, LabPercentiles};
use medtvt_data::mimic::{build_mimic, BuildMimicConfig};
use medtvt_data::synth::ecg::{synthesize_ecg, EcgSigns};
use medtvt_data::wfdb::{write_record, SignalFormat, ECG_LEADS};
use medtvt_data::disease::Disease;
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
            meta.push_str(&format!("{dicom}-lat,{subject},{cstudy},CHEST (PA AND LAT),LATERAL,40,48,21500{k}02,101600.000\n"));
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
        labs.push_str(&format!("{id},{subject},,{id},{itemid},,{time},{time},{v},{v},mg/dL,{lo},{hi},{flag},ROUTINE,\n"));
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
    BuildMimicConfig { hosp, ecg, cxr, out: root.join("out"), strict, diseases: Disease::ALL.to_vec(), progress: false }
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
    let bpm: f64 = phys1.answer.split("sinus rhythm, ").nth(1).and_then(|r| r.split(' ').next()).unwrap().parse().unwrap();
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
    let strict = BuildMimicConfig { strict: true, ..cfg };
    let e = build_mimic(&strict).unwrap_err().to_string();
    assert!(e.contains("admissions.csv:9") && e.contains("admittime"), "{e}");
}
