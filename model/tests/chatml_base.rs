//! Bringing your own HF base, on the committed fixture of `scripts/make_chatml_base_fixture.py`: a
//! random `LlamaForCausalLM` whose tokenizer fills its vocabulary exactly, with a ChatML
//! `chat_template` in tokenizer_config.json and two EOS ids in generation_config.json.
//!
//! Checked against what transformers computed when the fixture was made (`expected.json`): the
//! rendered prompt byte for byte, its ids, the placeholder ids and the special tokens. Then the
//! resize (new rows = the mean of the stored ones, stored rows untouched, tied or untied), and a
//! saved checkpoint read by transformers in the project venv's Python: same logits, same
//! vocabulary, same prompt from `apply_chat_template`, same EOS ids. The Python checks skip (and
//! say so) without `.venv/bin/python` and transformers.

mod peers;

use medtvt_config::TinyModel;
use medtvt_eval::{DiagnosisReward, DiseaseVocabulary, NameMatching, RewardWeights};
use medtvt_model::llama::{save_hf, Llama, LlamaConfig};
use medtvt_model::medtvt::{MedTvt, ModalityConfig, SYSTEM_PROMPT};
use serde_json::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use tch::{nn, Device, Kind, Tensor};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/chatml_base")
}

fn expected() -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture().join("expected.json")).unwrap()).unwrap()
}

fn ids(v: &Value) -> Vec<i64> {
    serde_json::from_value(v.clone()).unwrap()
}

/// A small modality side: the point here is the decoder and the tokenizer.
fn small_modality() -> ModalityConfig {
    let t = TinyModel { hidden_size: 16, image_size: 32, vit_depth: 1, ecg_resnet_blocks: 1, ..TinyModel::default() };
    ModalityConfig::tiny(&t)
}

fn load(dir: &Path) -> MedTvt {
    MedTvt::load_with_fresh_modality(dir, Device::Cpu, Kind::Float, small_modality()).unwrap()
}

fn stored(dir: &Path) -> HashMap<String, Tensor> {
    Tensor::read_safetensors(dir.join("model.safetensors")).unwrap().into_iter().collect()
}

fn variable(model: &MedTvt, name: &str) -> Tensor {
    model.named_variables().into_iter().find(|(n, _)| n == name).unwrap_or_else(|| panic!("no variable {name}")).1
}

#[test]
fn prompt_ids_and_special_tokens_equal_transformers() {
    let e = expected();
    assert_eq!(
        e["system"], SYSTEM_PROMPT,
        "SYSTEM_PROMPT changed: update scripts/make_chatml_base_fixture.py and run `make fixtures`"
    );
    let model = load(&fixture());
    let question = e["question"].as_str().unwrap();
    let prompt = model.prompt_text(question).unwrap();
    assert_eq!(prompt, e["prompt"].as_str().unwrap(), "our rendering differs from apply_chat_template");
    assert_eq!(model.tokenizer().encode(&prompt, false).unwrap(), ids(&e["prompt_ids"]));
    assert_eq!(model.placeholder_ids().to_vec(), ids(&e["placeholder_ids"]));
    assert_eq!(model.eos_token_ids(), ids(&e["eos_ids"]).as_slice(), "every EOS id, <|im_end|> first");
    assert_eq!(model.pad_token_id(), e["pad_id"].as_i64().unwrap());
    let vocab = e["vocab_size"].as_i64().unwrap();
    assert_eq!(model.vocab_resize(), Some((vocab, vocab + 3)));
    assert_eq!(model.llm().config().vocab_size, vocab + 3);

    // <think>/<answer> are plain text to this tokenizer; decoded, the reward still parses them.
    let completion = e["completion"].as_str().unwrap();
    let completion_ids = model.tokenizer().encode(completion, false).unwrap();
    assert_eq!(completion_ids, ids(&e["completion_ids"]));
    assert!(model.tokenizer().token_to_id("<think>").is_none());
    let text = model.decode(&completion_ids).unwrap();
    assert_eq!(text, completion);
    let reward =
        DiagnosisReward::new(DiseaseVocabulary::paper_default(NameMatching::Synonyms), RewardWeights::default());
    assert_eq!(reward.score(&text, completion).total, 2.0, "jaccard 1 + format 1");
}

#[test]
fn new_vocabulary_rows_are_the_mean_of_the_stored_ones() {
    let model = load(&fixture());
    let file = stored(&fixture());
    for name in ["model.embed_tokens.weight", "lm_head.weight"] {
        let old = &file[name];
        let grown = variable(&model, &format!("llm.{name}"));
        let n = old.size()[0];
        assert_eq!(grown.size(), vec![n + 3, old.size()[1]], "{name}");
        assert!(grown.narrow(0, 0, n).equal(old), "{name}: stored rows changed");
        let mean = old.mean_dim(0, true, Kind::Float);
        let diff = (grown.narrow(0, n, 3) - mean).abs().max().double_value(&[]);
        assert!(diff < 1e-6, "{name}: new rows differ from the mean by {diff}");
    }
}

#[test]
fn a_tied_base_grows_its_single_matrix() {
    let dir = tempfile::tempdir().unwrap();
    for file in ["tokenizer.json", "tokenizer_config.json", "generation_config.json"] {
        std::fs::copy(fixture().join(file), dir.path().join(file)).unwrap();
    }
    let vocab = expected()["vocab_size"].as_i64().unwrap();
    let mut config = LlamaConfig::tiny(vocab, 32, 64, 1, 4, 2);
    config.eos_token_ids = vec![0];
    let vs = nn::VarStore::new(Device::Cpu);
    let _llama = Llama::new(&vs.root(), &config);
    save_hf(&vs, &config, dir.path()).unwrap();
    let model = load(dir.path());
    assert!(model.llm().config().tie_word_embeddings);
    assert_eq!(model.vocab_resize(), Some((vocab, vocab + 3)));
    assert!(!model.named_variables().iter().any(|(n, _)| n.contains("lm_head")));
    let old = &stored(dir.path())["model.embed_tokens.weight"];
    let grown = variable(&model, "llm.model.embed_tokens.weight");
    assert!(grown.narrow(0, 0, vocab).equal(old));
    assert!((grown.get(vocab + 2) - old.mean_dim(0, false, Kind::Float)).abs().max().double_value(&[]) < 1e-6);
}

const READ_BACK: &str = r#"
import json, sys, torch
from transformers import AutoTokenizer, GenerationConfig, LlamaForCausalLM
model = LlamaForCausalLM.from_pretrained(sys.argv[1]).eval()
tok = AutoTokenizer.from_pretrained(sys.argv[1])
ids = torch.tensor([json.loads(sys.argv[2])])
with torch.no_grad():
    logits = model(ids).logits.float()
messages = [{"role": "system", "content": sys.argv[3]}, {"role": "user", "content": sys.argv[4]}]
prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
print(json.dumps({"logits": logits.flatten().tolist(), "vocab": model.config.vocab_size, "tokenizer_len": len(tok),
                  "prompt": prompt, "prompt_ids": tok(prompt, add_special_tokens=False).input_ids,
                  "ecg": tok.convert_tokens_to_ids("<ecg>"),
                  "eos": GenerationConfig.from_pretrained(sys.argv[1]).eos_token_id, "pad": tok.pad_token_id}))
"#;

fn python() -> Option<PathBuf> {
    peers::venv_python_with("transformers")
}

#[test]
fn a_saved_checkpoint_loads_in_transformers_with_our_logits() {
    let model = load(&fixture());
    let e = expected();
    let question = e["question"].as_str().unwrap();
    let out = tempfile::tempdir().unwrap();
    model.save(out.path()).unwrap();

    // Read back by us: the same prompt and tokens, no second resize.
    let back = load(out.path());
    assert_eq!(back.prompt_text(question).unwrap(), model.prompt_text(question).unwrap());
    assert_eq!(back.eos_token_ids(), model.eos_token_ids());
    assert_eq!(back.placeholder_ids(), model.placeholder_ids());
    assert_eq!(back.vocab_resize(), None);

    // A base that already has the placeholders (this one, without its modality side) keeps them.
    std::fs::remove_file(out.path().join("medtvt.json")).unwrap();
    let bare = load(out.path());
    assert_eq!((bare.placeholder_ids(), bare.vocab_resize()), (model.placeholder_ids(), None));

    let Some(python) = python() else { return };
    let prompt = model.prompt_text(question).unwrap();
    let prompt_ids = model.tokenizer().encode(&prompt, false).unwrap();
    let reply = Command::new(python)
        .args(["-c", READ_BACK, &out.path().display().to_string(), &format!("{prompt_ids:?}"), SYSTEM_PROMPT, question])
        .output()
        .unwrap();
    assert!(reply.status.success(), "transformers failed: {}", String::from_utf8_lossy(&reply.stderr));
    let reply: Value = serde_json::from_slice(&reply.stdout).unwrap();
    let vocab = e["vocab_size"].as_i64().unwrap() + 3;
    assert_eq!((reply["vocab"].as_i64(), reply["tokenizer_len"].as_i64()), (Some(vocab), Some(vocab)));
    assert_eq!(reply["prompt"].as_str(), Some(prompt.as_str()));
    assert_eq!(ids(&reply["prompt_ids"]), prompt_ids);
    assert_eq!(reply["ecg"].as_i64(), Some(model.placeholder_ids()[0]));
    assert_eq!(ids(&reply["eos"]), model.eos_token_ids());
    assert_eq!(reply["pad"].as_i64(), Some(model.pad_token_id()));

    let theirs: Vec<f32> = serde_json::from_value(reply["logits"].clone()).unwrap();
    let input = Tensor::from_slice(&prompt_ids).view([1, -1]);
    let ours = model.llm().forward(&input, &input.ones_like(), None);
    let diff = (ours.reshape([-1]) - Tensor::from_slice(&theirs)).abs().max().double_value(&[]);
    eprintln!("max |logit difference| to transformers on the saved checkpoint: {diff:.3e}");
    assert!(diff < 1e-4, "transformers computes other logits from our checkpoint: max diff {diff}");
    assert!(ours.std(true).double_value(&[]) > 0.1, "logits too flat for a meaningful comparison");
}
