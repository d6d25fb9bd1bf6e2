//! Cross-process test of `medtvt eval`'s CAO gates: the real binary evaluates a freshly built
//! tiny checkpoint on a small synthetic set (one sample's X-ray removed), and its JSON lists every
//! answer with a gate per modality, `null` exactly where the sample lacks that modality, while
//! its Markdown report ends with the mean gate per modality.

use medtvt_data::{read_jsonl, write_jsonl, QaSample, Split};
use medtvt_model::MedTvt;
use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

/// A tiny model's config; only `[model.tiny]` and the seed matter for building it.
fn tiny_config(data: &Path, out: &Path) -> medtvt_config::RunConfig {
    let text = format!(
        "[run]\nname = \"eval-gates\"\nstage = \"sft\"\nout_dir = \"{out}\"\nseed = 3\n\n[data]\ndir = \"{data}\"\n\n\
[model]\ndevice = \"cpu\"\n\n[model.tiny]\nvocab_size = 384\nhidden_size = 32\nintermediate_size = 64\nnum_layers = 1\n\
num_heads = 2\nnum_kv_heads = 1\nimage_size = 32\nvit_patch_size = 16\nvit_depth = 1\necg_resnet_blocks = 1\n\n\
[train]\nsteps = 1\nlearning_rate = 0.001\n",
        out = out.display(),
        data = data.display(),
    );
    medtvt_config::parse_run_config(&text, Path::new("eval-gates.toml"), &[]).unwrap()
}

#[test]
fn eval_json_carries_each_answers_cao_gates_and_markdown_their_means() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let mut synth = medtvt_data::synth::SynthConfig::new(6, 5);
    synth.image_size = 32;
    medtvt_data::synth::synthesize(&data, &synth).unwrap();
    // Take the X-ray away from the first training sample so that an absent modality is certain.
    let qa = data.join("qa.jsonl");
    let mut samples = read_jsonl(&qa).unwrap();
    let first_train = samples.iter().position(|s| s.split == Split::Train).unwrap();
    samples[first_train].cxr = None;
    write_jsonl(&qa, &samples).unwrap();

    let texts: Vec<String> = samples.iter().flat_map(|s| [s.question.clone(), s.answer.clone()]).collect();
    let tokenizer = MedTvt::train_tiny_tokenizer(&texts, 384).unwrap();
    let model = MedTvt::from_run_config(&tiny_config(&data, tmp.path()), tch::Device::Cpu, Some(tokenizer)).unwrap();
    let checkpoint = tmp.path().join("checkpoint");
    model.save(&checkpoint).unwrap();

    let json = tmp.path().join("report.json");
    let output = Command::new(env!("CARGO_BIN_EXE_medtvt"))
        .args(["eval", "--checkpoint"])
        .arg(&checkpoint)
        .arg("--data")
        .arg(&data)
        .args(["--split", "train", "--limit", "3", "--max-new-tokens", "4", "--json"])
        .arg(&json)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "medtvt eval failed: {stdout}\n{}", String::from_utf8_lossy(&output.stderr));
    assert!(stdout.contains("## CAO gates"), "{stdout}");
    assert!(stdout.contains("| Modality | Mean gate | Present | Absent |"), "{stdout}");

    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let by_id: BTreeMap<&str, &QaSample> = samples.iter().map(|s| (s.id.as_str(), s)).collect();
    let answers = report["answers"].as_array().unwrap();
    let expected = |kind| samples.iter().filter(|s| s.split == Split::Train && s.kind == kind).count().min(3);
    assert_eq!(answers.len(), expected(medtvt_data::QaKind::Disease) + expected(medtvt_data::QaKind::Physiological));
    assert!(
        answers.iter().any(|a| a["id"] == samples[first_train].id.as_str()),
        "the sample without X-ray was evaluated"
    );
    let mut present = [0u64; 3];
    for answer in answers {
        let sample = by_id[answer["id"].as_str().unwrap()];
        let has = [sample.ecg.is_some(), sample.cxr.is_some(), sample.lab.is_some()];
        for (m, name) in ["ecg", "cxr", "lab"].iter().enumerate() {
            let gate = &answer["cao_gates"][name];
            if has[m] {
                let g = gate.as_f64().unwrap_or_else(|| panic!("{}: {name} gate {gate}", sample.id));
                assert!(g > 0.0 && g < 1.0, "{}: {name} gate {g}", sample.id);
                present[m] += 1;
            } else {
                assert!(gate.is_null(), "{}: absent {name} has gate {gate}", sample.id);
            }
        }
    }
    let summary = report["cao_gates"]["per_modality"].as_array().unwrap();
    assert_eq!(summary.len(), 3);
    for (m, row) in summary.iter().enumerate() {
        assert_eq!(row["present"], present[m], "{row}");
        assert_eq!(row["absent"].as_u64().unwrap() + present[m], answers.len() as u64);
    }
}
