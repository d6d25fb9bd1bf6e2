//! `medtvt data synth`: a synthetic MedTVT-QA set written in the real formats (WFDB ECGs, PNG
//! X-rays, MIMIC-IV labevents CSVs), deterministic for a seed. Diseases co-occur with realistic
//! prevalences and correlations and leave physiologically sensible traces in the modalities
//! (documented in docs/data.md and in [`ecg`], [`cxr`] and [`labs`]); each sign shows only with
//! some probability and each modality is missing now and then, so no one modality gives every
//! label.
//!
//! Every encounter draws from its own ChaCha8 stream (`seed`, stream = encounter index), so an
//! encounter's files do not depend on the others.

pub mod cxr;
pub mod ecg;
pub mod labs;

use crate::disease::Disease;
use crate::error::DataError;
use crate::labs::{LabEvent, LabPercentiles};
use crate::qa_text::{self, CxrFindings, Findings, Side};
use crate::sample::{write_jsonl, QaKind, QaSample, Split};
use crate::wfdb::{write_record, SignalFormat, ECG_LEADS};
use ecg::{synthesize_ecg, EcgSigns, SYNTH_FS};
use labs::{synthesize_labs, LabContext, LabSigns};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::Path;

/// Probability that a disease's sign shows in a modality that is present.
pub const SIGN_PROBABILITY: f64 = 0.85;
/// Probability that each modality is missing from an encounter.
pub const MISSING_PROBABILITY: f64 = 0.15;

/// What to generate.
#[derive(Debug, Clone)]
pub struct SynthConfig {
    /// Number of encounters (each gives two QA samples).
    pub n: usize,
    pub seed: u64,
    /// Side of the written X-ray PNGs in pixels.
    pub image_size: u32,
    /// Diseases that may be labelled (others never occur).
    pub diseases: Vec<Disease>,
    /// Show a progress bar (a plain line every 10 % when stderr is not a terminal).
    pub progress: bool,
}

impl SynthConfig {
    pub fn new(n: usize, seed: u64) -> Self {
        SynthConfig { n, seed, image_size: 128, diseases: Disease::ALL.to_vec(), progress: false }
    }

    pub fn validate(&self) -> Result<(), DataError> {
        if self.n == 0 {
            return Err(DataError::arg("n", "must be at least 1"));
        }
        if !(16..=1024).contains(&self.image_size) {
            return Err(DataError::arg("image_size", format!("{} is outside 16..=1024", self.image_size)));
        }
        if self.diseases.is_empty() {
            return Err(DataError::arg("diseases", "name at least one disease"));
        }
        Ok(())
    }
}

/// Counts of what was written.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct SynthSummary {
    pub encounters: usize,
    pub samples: usize,
    pub by_split: BTreeMap<String, usize>,
    pub by_disease: BTreeMap<String, usize>,
    pub missing: BTreeMap<String, usize>,
}

/// Samples the encounter's diseases with age-dependent prevalences and the usual associations
/// (hypertension and diabetes with CAD, sepsis with pneumonia, renal failure with sepsis and
/// diabetes, AF with age and hypertension); restricted to `allowed`, never empty.
fn sample_diseases(rng: &mut ChaCha8Rng, allowed: &[Disease]) -> Vec<Disease> {
    let age = rng.random_range(0.0..1.0); // 0 = 40 years, 1 = 90 years
    let b = |rng: &mut ChaCha8Rng, p: f64| rng.random_bool(p.clamp(0.0, 1.0));
    let htn = b(rng, 0.2 + 0.35 * age);
    let dm = b(rng, 0.15 + 0.12 * htn as u8 as f64);
    let cad = b(rng, 0.06 + 0.14 * htn as u8 as f64 + 0.12 * dm as u8 as f64 + 0.1 * age);
    let af = b(rng, 0.06 + 0.1 * htn as u8 as f64 + 0.12 * age);
    let pna = b(rng, 0.2);
    let sepsis = b(rng, 0.05 + 0.3 * pna as u8 as f64);
    let arf = b(rng, 0.07 + 0.3 * sepsis as u8 as f64 + 0.08 * dm as u8 as f64);
    let drawn = [
        (Disease::CoronaryArteryDisease, cad),
        (Disease::AcuteRenalFailure, arf),
        (Disease::Hypertension, htn),
        (Disease::AtrialFibrillation, af),
        (Disease::Pneumonia, pna),
        (Disease::DiabetesMellitus, dm),
        (Disease::Sepsis, sepsis),
    ];
    let mut out: Vec<Disease> = drawn.iter().filter(|(d, on)| *on && allowed.contains(d)).map(|(d, _)| *d).collect();
    if out.is_empty() {
        // Every encounter has at least one diagnosis (see docs/data.md).
        let k = rng.random_range(0..allowed.len());
        out.push(allowed[k]);
    }
    out.sort();
    out
}

/// One generated encounter, before it is written.
struct Encounter {
    id: String,
    diseases: Vec<Disease>,
    ecg: Option<(EcgSigns, SignalFormat)>,
    cxr: Option<CxrFindings>,
    labs: Option<Vec<LabEvent>>,
}

fn plan_encounter(index: usize, seed: u64, allowed: &[Disease], rng: &mut ChaCha8Rng) -> Encounter {
    let diseases = sample_diseases(rng, allowed);
    let has = |d: Disease| diseases.contains(&d);
    let mut present = [0; 3].map(|_| !rng.random_bool(MISSING_PROBABILITY));
    if !present.iter().any(|p| *p) {
        present[2] = true;
    }
    let sign = |rng: &mut ChaCha8Rng, d: Disease| has(d) && rng.random_bool(SIGN_PROBABILITY);
    let st = sign(rng, Disease::CoronaryArteryDisease);
    let t_inv = has(Disease::CoronaryArteryDisease) && (!st || rng.random_bool(0.5)) && rng.random_bool(0.8);
    let lvh = sign(rng, Disease::Hypertension);
    let af = sign(rng, Disease::AtrialFibrillation);
    let tachy = sign(rng, Disease::Sepsis);
    let opacity = sign(rng, Disease::Pneumonia);
    let lab_signs = LabSigns {
        troponin: sign(rng, Disease::CoronaryArteryDisease),
        ldl: has(Disease::CoronaryArteryDisease) && rng.random_bool(0.5),
        renal: sign(rng, Disease::AcuteRenalFailure),
        potassium: has(Disease::AcuteRenalFailure) && rng.random_bool(0.6),
        glucose: sign(rng, Disease::DiabetesMellitus),
        hba1c: sign(rng, Disease::DiabetesMellitus),
        lactate: sign(rng, Disease::Sepsis),
        wbc_high: sign(rng, Disease::Sepsis),
        wbc_moderate: sign(rng, Disease::Pneumonia),
        crp: has(Disease::Pneumonia) || has(Disease::Sepsis),
        suspect_cardiac: has(Disease::CoronaryArteryDisease) || has(Disease::AtrialFibrillation),
        suspect_sepsis: has(Disease::Sepsis) || has(Disease::Pneumonia),
        suspect_diabetes: has(Disease::DiabetesMellitus),
        suspect_infection: has(Disease::Pneumonia) || has(Disease::Sepsis),
    };
    let cardiomegaly = has(Disease::Hypertension) && rng.random_bool(0.4) || rng.random_bool(0.04);
    let heart_rate = if af {
        rng.random_range(88.0..125.0)
    } else if tachy {
        rng.random_range(106.0..132.0)
    } else {
        rng.random_range(58.0..94.0)
    };
    let ecg_signs =
        EcgSigns { heart_rate, af, st_depression: st, t_inversion: t_inv, lvh, peaked_t: lab_signs.potassium };
    let format = if rng.random_bool(0.2) { SignalFormat::F212 } else { SignalFormat::F16 };
    let side = if rng.random_bool(0.5) { Side::Right } else { Side::Left };
    let subject_id = 10_000_000 + index as u64;
    let ctx = LabContext {
        subject_id,
        hadm_id: 20_000_000 + index as u64,
        // MIMIC-style shifted dates: encounters spread over 2150-2160.
        draw_time: crate::time::parse_datetime("2150-01-01 06:00:00").unwrap_or(0)
            + (seed % 97) as i64 * 86400
            + index as i64 * 2 * 86400
            + rng.random_range(0..12) * 3600,
        first_event_id: 1 + index as u64 * 1000,
    };
    let labs = synthesize_labs(rng, &lab_signs, &ctx);
    Encounter {
        id: format!("enc-{:06}", index + 1),
        diseases,
        ecg: present[0].then_some((ecg_signs, format)),
        cxr: present[1].then_some(CxrFindings { opacity: opacity.then_some(side), cardiomegaly }),
        labs: present[2].then_some(labs),
    }
}

/// Writes the encounter's files and returns its findings (for the QA texts).
fn write_encounter(out: &Path, enc: &Encounter, image_size: u32, rng: &mut ChaCha8Rng) -> Result<Findings, DataError> {
    let mut f = Findings {
        ecg_present: enc.ecg.is_some(),
        cxr_present: enc.cxr.is_some(),
        lab_present: enc.labs.is_some(),
        ..Findings::default()
    };
    if let Some((signs, format)) = &enc.ecg {
        let mut leads = synthesize_ecg(rng, signs);
        if rng.random_bool(0.05) {
            // A lead-off stretch: invalid samples, read back as NaN.
            let lead = rng.random_range(0..12);
            let start = rng.random_range(0..4000);
            leads[lead][start..start + 250].iter_mut().for_each(|v| *v = f32::NAN);
        }
        let (gain, baseline) = match format {
            SignalFormat::F16 => (1000.0, 0),
            SignalFormat::F212 => (200.0, 0),
        };
        write_record(
            &out.join("ecg").join(&enc.id),
            SYNTH_FS,
            &ECG_LEADS,
            &leads,
            *format,
            &[gain; 12],
            &[baseline; 12],
        )?;
        f.ecg = Some(signs.findings());
    }
    if let Some(c) = &enc.cxr {
        let img = cxr::synthesize_cxr(rng, image_size, c);
        let path = out.join("cxr").join(format!("{}.png", enc.id));
        img.save(&path).map_err(|e| DataError::Image { path, problem: e.to_string() })?;
        f.cxr = Some(c.clone());
    }
    if let Some(events) = &enc.labs {
        crate::labs::write_lab_csv(&out.join("labs").join(format!("{}.csv", enc.id)), events)?;
        f.labs = qa_text::abnormal_labs(events);
    }
    Ok(f)
}

fn samples_for(enc: &Encounter, split: Split, f: &Findings, diseases: &[Disease]) -> [QaSample; 2] {
    let labels: Vec<String> = enc.diseases.iter().map(|d| d.name().to_string()).collect();
    let base = QaSample {
        id: String::new(),
        split,
        kind: QaKind::Physiological,
        encounter_id: enc.id.clone(),
        ecg: enc.ecg.as_ref().map(|_| format!("ecg/{}", enc.id)),
        cxr: enc.cxr.as_ref().map(|_| format!("cxr/{}.png", enc.id)),
        lab: enc.labs.as_ref().map(|_| format!("labs/{}.csv", enc.id)),
        question: String::new(),
        answer: String::new(),
        labels,
    };
    let phys = QaSample {
        id: format!("{}-phys", enc.id),
        question: qa_text::physiological_question(f),
        answer: qa_text::physiological_answer(f),
        ..base.clone()
    };
    let dx = QaSample {
        id: format!("{}-dx", enc.id),
        kind: QaKind::Disease,
        question: qa_text::disease_question(f, diseases),
        answer: qa_text::disease_answer(f, &enc.diseases),
        ..base
    };
    [phys, dx]
}

/// 80 / 10 / 10 % of the encounters, by a seeded shuffle.
fn assign_splits(n: usize, seed: u64) -> Vec<Split> {
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut ChaCha8Rng::seed_from_u64(seed ^ 0x5b11_75ee_d000_0001));
    let n_train = n * 8 / 10;
    let n_val = n / 10;
    let mut splits = vec![Split::Test; n];
    for (rank, &i) in order.iter().enumerate() {
        splits[i] = if rank < n_train {
            Split::Train
        } else if rank < n_train + n_val {
            Split::Val
        } else {
            Split::Test
        };
    }
    splits
}

/// Progress reporting: an indicatif bar on a terminal, plain lines otherwise.
pub(crate) struct Progress {
    bar: Option<indicatif::ProgressBar>,
    plain: bool,
    total: usize,
    label: &'static str,
}

impl Progress {
    pub(crate) fn new(enabled: bool, total: usize, label: &'static str) -> Self {
        let tty = std::io::stderr().is_terminal();
        let bar = (enabled && tty).then(|| {
            let bar = indicatif::ProgressBar::new(total as u64);
            if let Ok(style) = indicatif::ProgressStyle::with_template("{msg} [{bar:40}] {pos}/{len} {eta}") {
                bar.set_style(style);
            }
            bar.set_message(label);
            bar
        });
        Progress { bar, plain: enabled && !tty, total, label }
    }

    pub(crate) fn inc(&self, done: usize) {
        let step = (self.total / 10).max(1);
        if let Some(bar) = &self.bar {
            bar.set_position(done as u64);
        } else if self.plain && done > 0 && (done == self.total || done / step != (done - 1) / step) {
            eprintln!("{}: {done}/{}", self.label, self.total);
        }
    }

    pub(crate) fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish();
        }
    }
}

fn create_dirs(out: &Path) -> Result<(), DataError> {
    for sub in ["ecg", "cxr", "labs"] {
        let d = out.join(sub);
        std::fs::create_dir_all(&d).map_err(|e| DataError::io(&d, e))?;
    }
    Ok(())
}

type Generated = Result<(Encounter, [QaSample; 2]), DataError>;

/// Generates and writes encounter `i` (its own random stream, so any thread may do it).
fn generate_one(out: &Path, cfg: &SynthConfig, i: usize, split: Split) -> Generated {
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    rng.set_stream(i as u64);
    let enc = plan_encounter(i, cfg.seed, &cfg.diseases, &mut rng);
    let findings = write_encounter(out, &enc, cfg.image_size, &mut rng)?;
    let pair = samples_for(&enc, split, &findings, &cfg.diseases);
    Ok((enc, pair))
}

/// Generates every encounter on all cores; results in encounter order (the output does not
/// depend on the number of threads).
fn generate_all(out: &Path, cfg: &SynthConfig, splits: &[Split], progress: &Progress) -> Vec<Generated> {
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get()).clamp(1, 8).min(splits.len());
    let done = std::sync::atomic::AtomicUsize::new(0);
    let mut slots: Vec<Option<Generated>> = (0..splits.len()).map(|_| None).collect();
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..workers)
            .map(|w| {
                let done = &done;
                scope.spawn(move || {
                    (w..splits.len())
                        .step_by(workers)
                        .map(|i| {
                            let r = generate_one(out, cfg, i, splits[i]);
                            progress.inc(done.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1);
                            (i, r)
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        for h in handles {
            // A worker only panics on a broken invariant; pass that panic on.
            for (i, r) in h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)) {
                slots[i] = Some(r);
            }
        }
    });
    slots
        .into_iter()
        .enumerate()
        .map(|(i, r)| r.unwrap_or_else(|| Err(DataError::arg("n", format!("encounter {i} was not generated")))))
        .collect()
}

/// Generates the dataset into `out` (see docs/data.md for the layout).
pub fn synthesize(out: &Path, cfg: &SynthConfig) -> Result<SynthSummary, DataError> {
    cfg.validate()?;
    create_dirs(out)?;
    let splits = assign_splits(cfg.n, cfg.seed);
    let progress = Progress::new(cfg.progress, cfg.n, "synth");
    let mut samples = Vec::with_capacity(2 * cfg.n);
    let mut train_labs: Vec<Vec<LabEvent>> = Vec::new();
    let mut summary = SynthSummary {
        encounters: cfg.n,
        samples: 0,
        by_split: BTreeMap::new(),
        by_disease: BTreeMap::new(),
        missing: BTreeMap::new(),
    };
    for (i, generated) in generate_all(out, cfg, &splits, &progress).into_iter().enumerate() {
        let (enc, pair) = generated?;
        let split = splits[i];
        samples.extend(pair);
        *summary.by_split.entry(split.to_string()).or_default() += 1;
        for d in &enc.diseases {
            *summary.by_disease.entry(d.name().to_string()).or_default() += 1;
        }
        for (name, missing) in [("ecg", enc.ecg.is_none()), ("cxr", enc.cxr.is_none()), ("lab", enc.labs.is_none())] {
            if missing {
                *summary.missing.entry(name.to_string()).or_default() += 1;
            }
        }
        if split == Split::Train {
            if let Some(l) = enc.labs {
                train_labs.push(l);
            }
        }
    }
    progress.finish();
    summary.samples = samples.len();
    write_jsonl(&out.join("qa.jsonl"), &samples)?;
    LabPercentiles::fit(train_labs.iter().map(Vec::as_slice)).save(&out.join("lab_percentiles.json"))?;
    write_readme(out, cfg, &summary).map(|_| summary)
}

fn write_readme(out: &Path, cfg: &SynthConfig, s: &SynthSummary) -> Result<(), DataError> {
    let path = out.join("README.md");
    let list =
        |m: &BTreeMap<String, usize>| m.iter().map(|(k, v)| format!("- {k}: {v}")).collect::<Vec<_>>().join("\n");
    let text = format!(
        "# Synthetic MedTVT-QA\n\n\
         Written by `medtvt data synth --n {} --seed {} --image-size {}`; the same arguments give \
         byte-identical files. Synthetic data: no patient information.\n\n\
         Layout: `qa.jsonl` (two QA samples per encounter, the `split` field says train/val/test), \
         `ecg/<enc>.hea/.dat` (WFDB, 12 leads, 500 Hz, 10 s, format 16 or 212), `cxr/<enc>.png` \
         (grey), `labs/<enc>.csv` (MIMIC-IV labevents schema), `lab_percentiles.json` (fitted on \
         the train split). Paths in samples are relative to this directory. The text formats and \
         the disease traces are described in the repository's docs/data.md.\n\n\
         Diseases: {}\n\n## Encounters by split\n{}\n\n## Encounters by disease\n{}\n\n\
         ## Encounters missing a modality\n{}\n",
        cfg.n,
        cfg.seed,
        cfg.image_size,
        cfg.diseases.iter().map(|d| d.name()).collect::<Vec<_>>().join(", "),
        list(&s.by_split),
        list(&s.by_disease),
        list(&s.missing),
    );
    std::fs::write(&path, text).map_err(|e| DataError::io(&path, e))
}
