//! `save_hf` output read back by HF transformers: a randomly initialised decoder of ours (GQA,
//! llama3 rope scaling, untied head, several EOS ids) is saved, loaded with
//! `LlamaForCausalLM.from_pretrained` in the project venv's Python, and must produce our logits.
//!
//! Needs `.venv/bin/python` with transformers (installed by `make fixtures` / `make bench`, not
//! by `make test`); without it the test reports that it skipped and passes.

mod peers;

use medtvt_model::llama::{save_hf, Llama, Llama3RopeScaling, LlamaConfig};
use std::path::PathBuf;
use std::process::Command;
use tch::{nn, Device, Tensor};

const READ_BACK: &str = r#"
import json, sys, torch
from transformers import LlamaForCausalLM
model = LlamaForCausalLM.from_pretrained(sys.argv[1]).eval()
ids = torch.tensor(json.loads(sys.argv[2]))
with torch.no_grad():
    logits = model(ids).logits.float()
print(json.dumps({"logits": logits.flatten().tolist(), "eos": model.config.eos_token_id,
                  "tied": model.config.tie_word_embeddings}))
"#;

fn python() -> Option<PathBuf> {
    peers::venv_python_with("transformers")
}

#[test]
fn transformers_reads_save_hf_output() {
    let Some(python) = python() else { return };
    tch::manual_seed(3);
    let mut config = LlamaConfig::tiny(97, 48, 80, 2, 6, 2);
    config.tie_word_embeddings = false;
    config.rope_theta = 50000.0;
    config.rope_scaling = Some(Llama3RopeScaling {
        factor: 4.0,
        low_freq_factor: 1.0,
        high_freq_factor: 2.0,
        original_max_position_embeddings: 16,
    });
    config.eos_token_ids = vec![1, 2];
    let vs = nn::VarStore::new(Device::Cpu);
    let model = Llama::new(&vs.root(), &config);
    // HF-like init gives near-uniform logits; scale the weights up so the comparison is sharp.
    tch::no_grad(|| {
        for (_, mut var) in vs.variables() {
            let _ = var.g_mul_scalar_(5.0);
        }
    });
    let dir = tempfile::tempdir().unwrap();
    save_hf(&vs, &config, dir.path()).unwrap();

    let ids: Vec<i64> = (0..20).map(|i| (i * 37 + 5) % 97).collect();
    let out = Command::new(python)
        .args(["-c", READ_BACK, &dir.path().display().to_string(), &format!("[{ids:?}]")])
        .output()
        .unwrap();
    assert!(out.status.success(), "transformers failed: {}", String::from_utf8_lossy(&out.stderr));
    let reply: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(reply["eos"], serde_json::json!([1, 2]));
    assert_eq!(reply["tied"], false);
    let theirs: Vec<f32> = serde_json::from_value(reply["logits"].clone()).unwrap();

    let input = Tensor::from_slice(&ids).view([1, 20]);
    let ours = model.forward(&input, &input.ones_like(), None);
    let diff = (ours.reshape([-1]) - Tensor::from_slice(&theirs)).abs().max().double_value(&[]);
    assert!(diff < 1e-4, "transformers computes other logits from our checkpoint: max diff {diff}");
    assert!(ours.std(true).double_value(&[]) > 0.1, "logits too flat for a meaningful comparison");
}
