//! A tokenizer.json trained by `MedTokenizer` gives the same ids in Python's HF `tokenizers`
//! (the library transformers uses), and decodes back to the text there too.
//!
//! Needs `.venv/bin/python` with `tokenizers` (installed with transformers by `make fixtures`);
//! without it the test reports that it skipped and passes.

mod peers;

use medtvt_model::tokenizer::{MedTokenizer, MEDTVT_SPECIAL_TOKENS};
use std::path::Path;
use std::process::Command;

const ENCODE: &str = r#"
import json, sys
from tokenizers import Tokenizer
tok = Tokenizer.from_file(sys.argv[1])
ids = tok.encode(sys.argv[2], add_special_tokens=False).ids
print(json.dumps({"ids": ids, "text": tok.decode(ids, skip_special_tokens=False), "eos": tok.token_to_id("<eos>")}))
"#;

#[test]
fn python_tokenizers_agrees_on_ids() {
    let python = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python");
    let available = Command::new(&python).args(["-c", "import tokenizers"]).output().map(|o| o.status.success());
    if !available.unwrap_or(false) {
        peers::peer_missing(&format!("{} cannot import tokenizers (run `make fixtures`)", python.display()));
        return;
    }
    let corpus = [
        "Sinus tachycardia with premature ventricular complexes.",
        "Bilateral pleural effusions, cardiomegaly. <ecg><cxr><lab>",
        "<think>Troponin is elevated.</think><answer>myocardial infarction</answer><eos>",
    ];
    let tok = MedTokenizer::train_byte_level_bpe(corpus.iter().cycle().take(30).copied(), 350, MEDTVT_SPECIAL_TOKENS)
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokenizer.json");
    tok.save(&path).unwrap();

    let text = "<ecg> Sinus rhythm; pleural effusions ✓ <think>ok</think><answer>none</answer><eos>";
    let out = Command::new(&python).args(["-c", ENCODE, &path.display().to_string(), text]).output().unwrap();
    assert!(out.status.success(), "python tokenizers failed: {}", String::from_utf8_lossy(&out.stderr));
    let reply: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let theirs: Vec<i64> = serde_json::from_value(reply["ids"].clone()).unwrap();
    assert_eq!(tok.encode(text, false).unwrap(), theirs);
    assert_eq!(reply["text"], text);
    assert_eq!(reply["eos"].as_i64(), tok.token_to_id("<eos>"));
}
