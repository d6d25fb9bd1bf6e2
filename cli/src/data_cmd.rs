//! `medtvt data`: the data tools: `synth` (a synthetic MedTVT-QA set), `inspect` (what a data
//! file holds) and `build-mimic` (pair a user's MIMIC copies). Thin wrappers over medtvt-data.

use anyhow::Context;
use clap::{Args, Subcommand};
use medtvt_data::disease::{parse_diseases, Disease};
use medtvt_data::inspect::inspect;
use medtvt_data::mimic::{build_mimic, BuildMimicConfig, BuildReport};
use medtvt_data::synth::{synthesize, SynthConfig};
use std::path::PathBuf;

#[derive(Args)]
pub struct DataArgs {
    #[command(subcommand)]
    command: DataCommand,
}

#[derive(Subcommand)]
enum DataCommand {
    /// Write a synthetic MedTVT-QA set (WFDB ECGs, PNG X-rays, MIMIC-style lab CSVs, qa.jsonl).
    Synth(SynthArgs),
    /// Describe a WFDB record, X-ray image, lab CSV, qa.jsonl, or one sample (qa.jsonl:LINE).
    Inspect(InspectArgs),
    /// Build MedTVT-QA from MIMIC-IV, MIMIC-IV-ECG and MIMIC-CXR-JPG copies.
    BuildMimic(BuildMimicArgs),
}

#[derive(Args)]
struct SynthArgs {
    /// Output directory (created).
    #[arg(long)]
    out: PathBuf,
    /// Number of encounters (two QA samples each).
    #[arg(long, default_value_t = 2000)]
    n: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Side of the written X-ray PNGs in pixels.
    #[arg(long, default_value_t = 128)]
    image_size: u32,
    /// Diseases to label, comma-separated canonical names (default: the paper's seven).
    #[arg(long, value_delimiter = ',')]
    diseases: Vec<String>,
    /// No progress output.
    #[arg(long)]
    quiet: bool,
}

#[derive(Args)]
struct InspectArgs {
    /// A WFDB record (stem or .hea), .png/.jpg, lab .csv, qa.jsonl, or qa.jsonl:LINE.
    path: String,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct BuildMimicArgs {
    /// MIMIC-IV hosp/ directory (admissions, diagnoses_icd, labevents, patients; .csv or .csv.gz).
    #[arg(long)]
    hosp: PathBuf,
    /// MIMIC-IV-ECG root (record_list.csv, files/).
    #[arg(long)]
    ecg: PathBuf,
    /// MIMIC-CXR-JPG root (mimic-cxr-2.0.0-metadata.csv, files/).
    #[arg(long)]
    cxr: PathBuf,
    /// Output directory (created); it must be empty unless --replace is given.
    #[arg(long)]
    out: PathBuf,
    /// Delete a previous build's files in --out first (ecg/, cxr/, labs/, qa.jsonl, ...; nothing else).
    #[arg(long)]
    replace: bool,
    /// Stop at the first unreadable record or bad row instead of skipping it.
    #[arg(long)]
    strict: bool,
    /// Diseases to label, comma-separated canonical names (default: the paper's seven).
    #[arg(long, value_delimiter = ',')]
    diseases: Vec<String>,
    #[arg(long)]
    quiet: bool,
}

fn diseases(names: &[String]) -> anyhow::Result<Vec<Disease>> {
    if names.is_empty() {
        return Ok(Disease::ALL.to_vec());
    }
    parse_diseases(names).map_err(|e| anyhow::anyhow!("--diseases: {e}"))
}

/// Skipped admissions printed by build-mimic; the rest are in build_report.json.
const SKIPS_SHOWN: usize = 10;

/// The first `n` skips of a build, one line each, and how many more the report lists.
fn first_skips(report: &BuildReport, n: usize) -> Vec<String> {
    let mut lines: Vec<String> = report.skips.iter().take(n).map(|s| format!("skipped {s}")).collect();
    if report.skips.len() > n {
        lines.push(format!("... and {} more, listed in build_report.json", report.skips.len() - n));
    }
    lines
}

pub fn run(args: &DataArgs) -> anyhow::Result<()> {
    match &args.command {
        DataCommand::Synth(a) => {
            let cfg = SynthConfig {
                n: a.n,
                seed: a.seed,
                image_size: a.image_size,
                diseases: diseases(&a.diseases)?,
                progress: !a.quiet,
            };
            let start = std::time::Instant::now();
            let summary = synthesize(&a.out, &cfg)
                .with_context(|| format!("writing the synthetic set to {}", a.out.display()))?;
            println!("{}", serde_json::to_string_pretty(&summary)?);
            eprintln!("wrote {} samples to {} in {:.1?}", summary.samples, a.out.display(), start.elapsed());
        }
        DataCommand::Inspect(a) => {
            let report = inspect(&a.path).with_context(|| format!("inspecting {}", a.path))?;
            if a.json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{report}");
            }
        }
        DataCommand::BuildMimic(a) => {
            let cfg = BuildMimicConfig {
                hosp: a.hosp.clone(),
                ecg: a.ecg.clone(),
                cxr: a.cxr.clone(),
                out: a.out.clone(),
                strict: a.strict,
                replace: a.replace,
                diseases: diseases(&a.diseases)?,
                progress: !a.quiet,
            };
            let report = build_mimic(&cfg).with_context(|| format!("building MedTVT-QA into {}", a.out.display()))?;
            for line in first_skips(&report, SKIPS_SHOWN) {
                eprintln!("{line}");
            }
            // The full list is in build_report.json; the console gets the counts.
            let mut summary = serde_json::to_value(&report)?;
            if let Some(fields) = summary.as_object_mut() {
                fields.remove("skips");
            }
            println!("{}", serde_json::to_string_pretty(&summary)?);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use medtvt_data::mimic::Skip;

    #[test]
    fn the_first_skips_are_shown_with_file_and_line_and_the_rest_counted() {
        let skip = |hadm: u64| Skip {
            hadm_id: Some(hadm),
            reason: "no ECG in admission".into(),
            file: PathBuf::from("hosp/admissions.csv"),
            line: Some(hadm + 1),
            problem: "record_list has no ECG of subject 7 between admittime and dischtime".into(),
        };
        let report = BuildReport {
            admissions: 3,
            matched: 0,
            skipped: Default::default(),
            by_split: Default::default(),
            by_disease: Default::default(),
            skips: (1..=3).map(skip).collect(),
        };
        let lines = first_skips(&report, 2);
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[0], "skipped admission 1: no ECG in admission: hosp/admissions.csv:2: record_list has no ECG of subject 7 between admittime and dischtime");
        assert_eq!(lines[2], "... and 1 more, listed in build_report.json");
    }
}
