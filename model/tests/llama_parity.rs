//! The decoder against HF transformers, on the committed fixtures of
//! `scripts/make_llama_fixtures.py`: logits, greedy generation, and the invariants generation and
//! scoring must keep (batched == one at a time, seeded sampling, scores == generation log-probs,
//! save/load round trips, errors that name the tensor or file).

use medtvt_model::llama::{
    generate, generate_from_embeds, left_pad, load_llama, save_hf, score_completions, score_ids, Generation, Llama,
    LlamaConfig, SamplingParams, WeightsError,
};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tch::{nn, Device, Kind, Tensor};

const FIXTURES: [&str; 2] = ["gqa_llama3", "mha_untied"];

fn fixture_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

struct Fixture {
    _vs: nn::VarStore,
    model: Llama,
    expected: HashMap<String, Tensor>,
    batch_rows: Vec<Vec<i64>>,
}

fn load(name: &str) -> Fixture {
    let dir = fixture_dir(name);
    let (vs, model) = load_llama(&dir, Device::Cpu, Kind::Float).unwrap();
    let expected: HashMap<String, Tensor> =
        Tensor::read_safetensors(dir.join("expected.safetensors")).unwrap().into_iter().collect();
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    let batch_rows = serde_json::from_value(json["batch"].clone()).unwrap();
    Fixture { _vs: vs, model, expected, batch_rows }
}

fn max_abs(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

fn greedy(max_new_tokens: usize) -> SamplingParams {
    SamplingParams { max_new_tokens, greedy: true, ..Default::default() }
}

fn rows_of(t: &Tensor) -> Vec<Vec<i64>> {
    let width = t.size()[1] as usize;
    Vec::<i64>::try_from(t.reshape([-1])).unwrap().chunks(width).map(<[i64]>::to_vec).collect()
}

#[test]
fn logits_match_transformers() {
    for name in FIXTURES {
        let f = load(name);
        let ids = &f.expected["single_ids"];
        let ours = f.model.forward(ids, &ids.ones_like(), None);
        let diff = max_abs(&ours, &f.expected["single_logits"]);
        assert!(diff < 1e-4, "{name}: single-prompt logits differ by {diff}");

        let mask = &f.expected["batch_mask"];
        let ours = f.model.forward(&f.expected["batch_ids"], mask, None);
        let real = mask.unsqueeze(-1).to_kind(Kind::Float);
        let diff = max_abs(&(ours * &real), &(&f.expected["batch_logits"] * &real));
        assert!(diff < 1e-4, "{name}: left-padded batch logits differ by {diff}");
    }
}

#[test]
fn greedy_generation_matches_transformers_batched_and_one_at_a_time() {
    for name in FIXTURES {
        let f = load(name);
        let want = rows_of(&f.expected["greedy_tokens"]);
        let new_tokens = want[0].len();
        let batched = generate(&f.model, &f.batch_rows, 0, &greedy(new_tokens)).unwrap();
        assert_eq!(batched.tokens, want, "{name}: batched greedy tokens differ from transformers");
        assert_eq!(batched.finished_by_eos, vec![false; want.len()]);
        for (row, prompt) in f.batch_rows.iter().enumerate() {
            let single = generate(&f.model, std::slice::from_ref(prompt), 0, &greedy(new_tokens)).unwrap();
            assert_eq!(single.tokens[0], want[row], "{name}: row {row} alone differs");
            for (a, b) in single.logprobs[0].iter().zip(&batched.logprobs[row]) {
                assert!((a - b).abs() < 1e-4, "{name}: row {row} log-probs {a} vs batched {b}");
            }
        }
    }
}

#[test]
fn incremental_decoding_over_a_ragged_batch_equals_full_forward() {
    let f = load("gqa_llama3");
    let (ids, mask) = (&f.expected["batch_ids"], &f.expected["batch_mask"]);
    let t = ids.size()[1];
    let full = f.model.forward(ids, mask, None);
    let mut cache = f.model.new_cache(3, t);
    let prefix = 4;
    let mut parts = vec![f.model.forward(&ids.narrow(1, 0, prefix), &mask.narrow(1, 0, prefix), Some(&mut cache))];
    for i in prefix..t {
        parts.push(f.model.forward(&ids.narrow(1, i, 1), &mask.narrow(1, 0, i + 1), Some(&mut cache)));
    }
    let real = mask.unsqueeze(-1).to_kind(Kind::Float);
    let diff = max_abs(&(Tensor::cat(&parts, 1) * &real), &(full * &real));
    assert!(diff < 1e-4, "cached decoding differs from one pass by {diff}");
}

fn sampling(seed: u64) -> SamplingParams {
    SamplingParams { max_new_tokens: 12, temperature: 1.3, top_p: 0.95, top_k: 100, seed, ..Default::default() }
}

#[test]
fn seeded_sampling_is_reproducible() {
    let f = load("mha_untied");
    let a = generate(&f.model, &f.batch_rows, 0, &sampling(5)).unwrap();
    let b = generate(&f.model, &f.batch_rows, 0, &sampling(5)).unwrap();
    let c = generate(&f.model, &f.batch_rows, 0, &sampling(6)).unwrap();
    let g = generate(&f.model, &f.batch_rows, 0, &greedy(12)).unwrap();
    assert_eq!(a, b, "same seed must give the same generation");
    assert_ne!(a.tokens, c.tokens, "another seed must give other tokens");
    assert_ne!(a.tokens, g.tokens, "sampling must not be greedy");
}

#[test]
fn rows_stop_at_eos_and_include_it() {
    let f = load("gqa_llama3");
    let free = generate(&f.model, &f.batch_rows, 0, &greedy(10)).unwrap();
    // Make row 0's third greedy token an EOS: row 0 stops there, the others are unchanged up to
    // the first occurrence of that token in them.
    let eos = free.tokens[0][2];
    let params = SamplingParams { eos_token_ids: vec![eos], ..greedy(10) };
    let stopped = generate(&f.model, &f.batch_rows, 0, &params).unwrap();
    assert_eq!(stopped.tokens[0], free.tokens[0][..3].to_vec());
    assert!(stopped.finished_by_eos[0]);
    for row in 1..3 {
        let cut = free.tokens[row].iter().position(|&t| t == eos).map_or(10, |i| i + 1);
        assert_eq!(stopped.tokens[row], free.tokens[row][..cut].to_vec(), "row {row}");
        assert_eq!(stopped.finished_by_eos[row], cut < 10 || free.tokens[row][9] == eos);
    }
}

/// Right-pads generated rows into completion ids and mask `[b, longest]`.
fn completions(g: &Generation) -> (Tensor, Tensor) {
    let width = g.tokens.iter().map(Vec::len).max().unwrap_or(0);
    let mut ids = Vec::new();
    let mut mask = Vec::new();
    for row in &g.tokens {
        ids.extend(row.iter().copied().chain(std::iter::repeat_n(0, width - row.len())));
        mask.extend(std::iter::repeat_n(1i64, row.len()).chain(std::iter::repeat_n(0, width - row.len())));
    }
    let shape = [g.tokens.len() as i64, width as i64];
    (Tensor::from_slice(&ids).view(shape), Tensor::from_slice(&mask).view(shape))
}

#[test]
fn scores_equal_full_logits_and_generation_logprobs() {
    for name in FIXTURES {
        let f = load(name);
        let temperature = 0.7;
        let params = SamplingParams { max_new_tokens: 8, temperature, eos_token_ids: vec![7, 11, 13], ..sampling(9) };
        let g = generate(&f.model, &f.batch_rows, 0, &params).unwrap();
        let (prompt_ids, prompt_mask) = left_pad(&f.batch_rows, 0, Device::Cpu).unwrap();
        let (completion_ids, completion_mask) = completions(&g);
        let scores = score_ids(&f.model, &prompt_ids, &prompt_mask, &completion_ids, &completion_mask, temperature);

        for (row, logprobs) in g.logprobs.iter().enumerate() {
            let scored = Vec::<f32>::try_from(scores.get(row as i64)).unwrap();
            for (j, want) in logprobs.iter().enumerate() {
                assert!(
                    (scored[j] - want).abs() < 1e-4,
                    "{name} row {row} token {j}: score {} vs generation {want}",
                    scored[j]
                );
            }
            assert!(scored[logprobs.len()..].iter().all(|&s| s == 0.0), "padding must score 0");
        }

        let tp = prompt_ids.size()[1];
        let tc = completion_ids.size()[1];
        let all_ids = Tensor::cat(&[&prompt_ids, &completion_ids], 1);
        let all_mask = Tensor::cat(&[&prompt_mask, &completion_mask], 1);
        let logits = f.model.forward(&all_ids, &all_mask, None).narrow(1, tp - 1, tc) / temperature;
        let reference =
            logits.log_softmax(-1, Kind::Float).gather(2, &completion_ids.unsqueeze(2), false).squeeze_dim(2)
                * completion_mask.to_kind(Kind::Float);
        let diff = max_abs(&scores, &reference);
        assert!(diff < 1e-5, "{name}: scores differ from gathered full log-softmax by {diff}");
    }
}

#[test]
fn scoring_is_differentiable_and_generation_from_embeds_agrees_with_ids() {
    let f = load("gqa_llama3");
    let (prompt_ids, prompt_mask) = left_pad(&f.batch_rows, 0, Device::Cpu).unwrap();
    let embeds = f.model.embed_tokens(&prompt_ids);
    let by_embeds = generate_from_embeds(&f.model, &embeds, &prompt_mask, &greedy(6)).unwrap();
    let by_ids = generate(&f.model, &f.batch_rows, 0, &greedy(6)).unwrap();
    assert_eq!(by_embeds, by_ids);

    let (completion_ids, completion_mask) = completions(&by_ids);
    let scores = score_completions(&f.model, &embeds, &prompt_mask, &completion_ids, &completion_mask, 1.0);
    scores.sum(Kind::Float).backward();
    let grad = f._vs.variables()["model.layers.0.self_attn.q_proj.weight"].grad();
    assert!(grad.defined() && grad.abs().sum(Kind::Float).double_value(&[]) > 0.0, "no gradient reached q_proj");
}

#[test]
fn generation_rejects_right_padded_prompts_and_bad_params() {
    let f = load("gqa_llama3");
    let embeds = f.model.embed_tokens(&Tensor::from_slice(&[5i64, 6, 0]).view([1, 3]));
    let right_padded = Tensor::from_slice(&[1i64, 1, 0]).view([1, 3]);
    let err = generate_from_embeds(&f.model, &embeds, &right_padded, &greedy(2)).unwrap_err();
    assert!(err.to_string().contains("left-padded"), "{err}");
    let err = generate(&f.model, &f.batch_rows, 0, &SamplingParams { temperature: -1.0, ..sampling(0) }).unwrap_err();
    assert!(err.to_string().contains("temperature"), "{err}");
}

#[test]
fn save_hf_then_load_gives_identical_logits_in_f32_and_bf16() {
    let f = load("mha_untied");
    let ids = &f.expected["single_ids"];
    for kind in [Kind::Float, Kind::BFloat16] {
        let (vs, model) = load_llama(&fixture_dir("mha_untied"), Device::Cpu, kind).unwrap();
        let dir = tempfile::tempdir().unwrap();
        save_hf(&vs, model.config(), dir.path()).unwrap();
        let config = LlamaConfig::from_file(dir.path().join("config.json")).unwrap();
        let want_dtype = if kind == Kind::Float { "float32" } else { "bfloat16" };
        assert_eq!(config.torch_dtype.as_deref(), Some(want_dtype));
        let (_vs2, reloaded) = load_llama(dir.path(), Device::Cpu, kind).unwrap();
        let (a, b) = (model.forward(ids, &ids.ones_like(), None), reloaded.forward(ids, &ids.ones_like(), None));
        assert!(a.equal(&b), "{kind:?}: reloaded model computes other logits");
        if kind == Kind::BFloat16 {
            let diff = max_abs(&a, &f.expected["single_logits"]);
            assert!(diff < 0.25, "bf16 logits too far from f32 transformers: {diff}");
        }
    }
}

/// Copies fixture `name` into a temporary directory and edits its config.json.
fn edited_fixture(name: &str, edit: impl FnOnce(&mut serde_json::Value)) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for file in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture_dir(name).join(file), dir.path().join(file)).unwrap();
    }
    let path = dir.path().join("config.json");
    let mut config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut config);
    std::fs::write(&path, config.to_string()).unwrap();
    dir
}

#[test]
fn load_errors_name_the_file_or_tensor() {
    let err = load_llama(Path::new("/nonexistent/llama"), Device::Cpu, Kind::Float).unwrap_err();
    assert!(err.to_string().contains("/nonexistent/llama/config.json"), "{err}");

    let dir = edited_fixture("gqa_llama3", |c| c["intermediate_size"] = 96.into());
    let err = load_llama(dir.path(), Device::Cpu, Kind::Float).unwrap_err();
    assert!(matches!(err, WeightsError::Shape { .. }), "{err}");
    let message = err.to_string();
    assert!(message.contains("`model.layers.0.mlp.down_proj.weight`") && message.contains("[64, 96]"), "{err}");

    let dir = edited_fixture("gqa_llama3", |c| c["num_hidden_layers"] = 3.into());
    let err = load_llama(dir.path(), Device::Cpu, Kind::Float).unwrap_err();
    assert!(err.to_string().contains("model.layers.2.input_layernorm.weight"), "{err}");

    let dir = edited_fixture("gqa_llama3", |c| c["tie_word_embeddings"] = false.into());
    let err = load_llama(dir.path(), Device::Cpu, Kind::Float).unwrap_err();
    assert!(err.to_string().contains("lm_head.weight"), "{err}");

    let dir = edited_fixture("gqa_llama3", |c| c["model_type"] = "gpt2".into());
    let err = load_llama(dir.path(), Device::Cpu, Kind::Float).unwrap_err();
    assert!(err.to_string().contains("gpt2"), "{err}");

    let dir2 = edited_fixture("gqa_llama3", |_| {});
    std::fs::remove_file(dir2.path().join("model.safetensors")).unwrap();
    let err = load_llama(dir2.path(), Device::Cpu, Kind::Float).unwrap_err();
    assert!(matches!(err, WeightsError::NoWeights { .. }), "{err}");
}

#[test]
fn sharded_checkpoints_load() {
    let (vs, model) = load_llama(&fixture_dir("mha_untied"), Device::Cpu, Kind::Float).unwrap();
    let dir = tempfile::tempdir().unwrap();
    // Split the variables over two shard files with an index, as HF does for large models.
    let variables = vs.variables();
    let mut names: Vec<&String> = variables.keys().collect();
    names.sort();
    let (first, second) = names.split_at(names.len() / 2);
    let mut weight_map = serde_json::Map::new();
    for (file, part) in [("model-00001-of-00002.safetensors", first), ("model-00002-of-00002.safetensors", second)] {
        let tensors: Vec<(&str, Tensor)> = part.iter().map(|n| (n.as_str(), variables[*n].detach())).collect();
        Tensor::write_safetensors(&tensors, dir.path().join(file)).unwrap();
        for n in part {
            weight_map.insert(n.to_string(), file.into());
        }
    }
    let index = serde_json::json!({ "metadata": {}, "weight_map": weight_map });
    std::fs::write(dir.path().join("model.safetensors.index.json"), index.to_string()).unwrap();
    std::fs::copy(fixture_dir("mha_untied").join("config.json"), dir.path().join("config.json")).unwrap();
    let (_vs2, sharded) = load_llama(dir.path(), Device::Cpu, Kind::Float).unwrap();
    let ids = Tensor::from_slice(&[4i64, 8, 15, 16, 23, 42]).view([1, 6]);
    assert!(model.forward(&ids, &ids.ones_like(), None).equal(&sharded.forward(&ids, &ids.ones_like(), None)));
}
