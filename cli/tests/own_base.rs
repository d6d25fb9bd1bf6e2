//! Cross-process test of bringing your own HF base: `medtvt train pt.toml sft.toml grpo.toml`
//! starts a local cluster of real processes (coordinator, a learner, a rollout worker on
//! loopback) and runs two steps of each stage, PT starting from the committed ChatML fixture of
//! `scripts/make_chatml_base_fixture.py` (a random `LlamaForCausalLM` whose tokenizer fills its
//! vocabulary, with its own chat template and two EOS ids), with the spec's per-stage parameter
//! groups and a small modality side (`model.encoders = "tiny"`).
//!
//! Checked: each stage trains its two steps; PT grows the vocabulary for the placeholders; the
//! final GRPO checkpoint keeps the base's template and EOS ids, and transformers (the project
//! venv's Python; skipped, saying so, without it) loads it with logits equal to ours.

mod common;

#[path = "../../model/tests/peers/mod.rs"]
mod peers;

use common::*;
use medtvt_model::medtvt::MedTvt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../model/tests/fixtures/chatml_base")
}

/// One stage's config on the fixture's decoder with a tiny modality side; `extra` adds tables.
fn stage_config(root: &Path, stage: &str, data: &Path, checkpoint: &Path, train: &str, extra: &str) -> PathBuf {
    let text = format!(
        r#"[run]
name = "own-{stage}"
stage = "{stage}"
out_dir = "{out}"
seed = 5

[data]
dir = "{data}"
max_prompt_tokens = 256

[model]
checkpoint = "{checkpoint}"
device = "cpu"
encoders = "tiny"

[model.tiny]
hidden_size = 32
image_size = 32
vit_patch_size = 16
vit_depth = 1
ecg_resnet_blocks = 1

[train]
{train}

[cluster]
learners = 1
rollout_workers = 1
lease_timeout_s = 60.0
heartbeat_timeout_s = 20.0
{extra}"#,
        out = root.join(stage).display(),
        data = data.display(),
        checkpoint = checkpoint.display(),
    );
    let path = root.join(format!("{stage}.toml"));
    std::fs::write(&path, text).unwrap();
    path
}

const READ_BACK: &str = r#"
import json, sys, torch
from transformers import LlamaForCausalLM
model = LlamaForCausalLM.from_pretrained(sys.argv[1]).eval()
with torch.no_grad():
    logits = model(torch.tensor([json.loads(sys.argv[2])])).logits.float()
print(json.dumps({"logits": logits.flatten().tolist(), "vocab": model.config.vocab_size}))
"#;

#[test]
fn pt_sft_and_grpo_run_on_a_real_hf_base() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let data = dataset(root);
    let supervised = "steps = 2\nbatch_size = 2\nlearning_rate = 0.001\nwarmup_steps = 0\ncheckpoint_every = 2\n";
    let pt = stage_config(root, "pt", &data, &fixture(), supervised, "");
    let sft = stage_config(root, "sft", &data, &root.join("pt/final"), supervised, "");
    let grpo_table =
        "\n[grpo]\ngroup_size = 2\nprompts_per_step = 2\nmax_new_tokens = 8\nbeta = 0.04\nmax_staleness = 2\n";
    let grpo_train = "steps = 2\nlearning_rate = 0.001\nwarmup_steps = 0\ncheckpoint_every = 2\n";
    let grpo = stage_config(root, "grpo", &data, &root.join("sft/final"), grpo_train, grpo_table);

    let output = std::fs::File::create(root.join("train.log")).unwrap();
    let child = medtvt()
        .arg("train")
        .args([&pt, &sft, &grpo])
        .stdout(output.try_clone().unwrap())
        .stderr(output)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let mut train = Proc { name: "medtvt train".into(), child };
    let status = train.wait_exit(Duration::from_secs(600));
    let logs_dir = root.join("logs");
    let report =
        || format!("{}\n{}", std::fs::read_to_string(root.join("train.log")).unwrap_or_default(), logs(&logs_dir));
    assert!(status.success(), "medtvt train failed:\n{}", report());

    for stage in ["pt", "sft", "grpo"] {
        let records = metrics(&root.join(stage).join("metrics.jsonl"));
        assert_eq!(records.len(), 2, "{stage}: one record per step\n{}", report());
        let key = if stage == "grpo" { "reward_mean" } else { "loss" };
        assert!(records.iter().all(|r| r.values[key].is_finite()), "{stage}: {key} {records:?}");
    }
    let grpo_records = metrics(&root.join("grpo/metrics.jsonl"));
    assert!(grpo_records.iter().all(|r| r.values["completions"] == 4.0), "G * prompts_per_step completions per step");
    let learner_log = std::fs::read_to_string(logs_dir.join("learner-0.log")).unwrap();
    assert!(learner_log.contains("grew the decoder's vocabulary"), "PT did not resize:\n{learner_log}");

    // The final checkpoint keeps the base's template and EOS ids.
    let fin = root.join("grpo/final");
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fin.join("tokenizer_config.json")).unwrap()).unwrap();
    let base: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture().join("tokenizer_config.json")).unwrap()).unwrap();
    assert_eq!(config["chat_template"], base["chat_template"]);
    let model = MedTvt::load(&fin, tch::Device::Cpu, tch::Kind::Float).unwrap();
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture().join("expected.json")).unwrap()).unwrap();
    let eos: Vec<i64> = serde_json::from_value(expected["eos_ids"].clone()).unwrap();
    assert_eq!(model.eos_token_ids(), eos.as_slice());
    let vocab = expected["vocab_size"].as_i64().unwrap() + 3;
    assert_eq!(model.llm().config().vocab_size, vocab);

    let Some(python) = peers::venv_python_with("transformers") else { return };
    let prompt = model.prompt_text("<ecg> <cxr> <lab> Which diseases?").unwrap();
    let ids = model.tokenizer().encode(&prompt, false).unwrap();
    let reply = Command::new(&python)
        .args(["-c", READ_BACK, &fin.display().to_string(), &format!("{ids:?}")])
        .output()
        .unwrap();
    assert!(reply.status.success(), "transformers failed: {}", String::from_utf8_lossy(&reply.stderr));
    let reply: serde_json::Value = serde_json::from_slice(&reply.stdout).unwrap();
    assert_eq!(reply["vocab"].as_i64(), Some(vocab));
    let theirs: Vec<f32> = serde_json::from_value(reply["logits"].clone()).unwrap();
    let input = tch::Tensor::from_slice(&ids).view([1, -1]);
    let ours = model.llm().forward(&input, &input.ones_like(), None);
    let diff = (ours.reshape([-1]) - tch::Tensor::from_slice(&theirs)).abs().max().double_value(&[]);
    eprintln!("max |logit difference| to transformers on the GRPO checkpoint: {diff:.3e}");
    assert!(diff < 1e-4, "transformers computes other logits from the GRPO checkpoint: max diff {diff}");
}
