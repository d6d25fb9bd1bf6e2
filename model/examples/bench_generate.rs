//! Prefill and generation throughput of our decoder, side by side with HF transformers
//! `generate` on the same weights, shapes and device in the same run (`make bench`).
//!
//! ```sh
//! cargo run --release -p medtvt-model --example bench_generate -- \
//!     --config small --batch 8 --prompt 64 --new 64 --dtype f32 --device cpu
//! ```
//!
//! `--config` is `tiny`, `small`, `llama-1b` (Llama-3.2-1B shape) or a checkpoint directory.
//! Random-weight configs are saved to a temporary directory first so transformers loads exactly
//! our weights. Every row generates exactly `--new` tokens (EOS disabled on both sides).
//! `--no-hf` skips the transformers run; `--greedy` uses argmax instead of sampling at T = 1;
//! `--threads N` sets torch's intra-op threads on both sides; `--repeat N` keeps the best of N.
//! `--group G` makes the batch `batch / G` distinct prompts, each repeated G times (a GRPO
//! group, as TRL feeds `generate`); ours then runs twice: one prefill per row (every copy of a
//! prompt prefilled again, the old rollout path) and one prefill per group (the rollout path now).

use medtvt_model::llama::{
    check_device_kind, generate_from_embeds, generate_groups_from_embeds, kind_from_name, load_llama, save_hf,
    ContinuousBatch, Generation, GroupRequest, Llama, LlamaConfig, SamplingParams,
};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;
use tch::{nn, Device, Tensor};

const HF_BENCH: &str = r#"
import json, sys, time, torch
from transformers import LlamaForCausalLM
args = json.loads(sys.argv[1])
device = torch.device(args["device"])
dtype = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}[args["dtype"]]
if args["threads"] > 0:
    torch.set_num_threads(args["threads"])
model = LlamaForCausalLM.from_pretrained(args["dir"], dtype=dtype).to(device).eval()
ids = torch.tensor(args["ids"], device=device)
mask = torch.ones_like(ids)
def sync():
    if device.type == "cuda":
        torch.cuda.synchronize()
def run_generate(n):
    return model.generate(ids, attention_mask=mask, do_sample=not args["greedy"], temperature=1.0, top_k=0,
                          top_p=1.0, max_new_tokens=n, min_new_tokens=n, eos_token_id=None, pad_token_id=0)
best_prefill, best_generate = float("inf"), float("inf")
with torch.no_grad():
    run_generate(2)
    for _ in range(args["repeat"]):
        sync(); t = time.perf_counter(); model(ids, attention_mask=mask, use_cache=True, logits_to_keep=1); sync()
        best_prefill = min(best_prefill, time.perf_counter() - t)
        sync(); t = time.perf_counter(); out = run_generate(args["new"]); sync()
        best_generate = min(best_generate, time.perf_counter() - t)
        assert out.shape[1] == ids.shape[1] + args["new"], out.shape
print(json.dumps({"prefill_s": best_prefill, "generate_s": best_generate, "threads": torch.get_num_threads()}))
"#;

struct Args {
    config: String,
    batch: i64,
    prompt: i64,
    new: usize,
    dtype: String,
    device: String,
    repeat: usize,
    hf: bool,
    greedy: bool,
    /// Intra-op threads for both implementations; 0 keeps torch's default.
    threads: i64,
    /// Completions per distinct prompt.
    group: i64,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        config: "small".into(),
        batch: 8,
        prompt: 64,
        new: 64,
        dtype: "f32".into(),
        device: "cpu".into(),
        repeat: 2,
        hf: true,
        greedy: false,
        threads: 0,
        group: 1,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        let number = |v: String| v.parse::<i64>().map_err(|e| format!("{flag} {v}: {e}"));
        match flag.as_str() {
            "--config" => args.config = value()?,
            "--batch" => args.batch = number(value()?)?,
            "--prompt" => args.prompt = number(value()?)?,
            "--new" => args.new = number(value()?)? as usize,
            "--dtype" => args.dtype = value()?,
            "--device" => args.device = value()?,
            "--repeat" => args.repeat = number(value()?)?.max(1) as usize,
            "--threads" => args.threads = number(value()?)?,
            "--group" => args.group = number(value()?)?.max(1),
            "--no-hf" => args.hf = false,
            "--greedy" => args.greedy = true,
            "--help" | "-h" => {
                return Err(include_str!("bench_generate.rs").lines().take(20).collect::<Vec<_>>().join("\n"))
            }
            other => return Err(format!("unknown flag {other} (see --help)")),
        }
    }
    if args.batch % args.group != 0 {
        return Err(format!("--batch {} is not a multiple of --group {}", args.batch, args.group));
    }
    Ok(args)
}

fn device_of(name: &str) -> Result<Device, String> {
    match name {
        "cpu" => Ok(Device::Cpu),
        "cuda" => Ok(Device::Cuda(0)),
        other => other
            .strip_prefix("cuda:")
            .and_then(|i| i.parse().ok())
            .map(Device::Cuda)
            .ok_or_else(|| format!("unknown device {other}: use cpu, cuda or cuda:N")),
    }
}

fn sync(device: Device) {
    if let Device::Cuda(index) = device {
        tch::Cuda::synchronize(index as i64);
    }
}

/// Best-of-`repeat` seconds for a prefill pass (last-position logits) and a full generation.
/// `prompts` are the distinct prompts; each is generated from `args.group` times, with one prefill
/// per group when `grouped`, else one per row (the prompts repeated in place first).
/// How ours generates a batch of groups.
#[derive(Clone, Copy, PartialEq)]
enum Route {
    /// The prompts repeated in place, one prefill per row.
    PerRow,
    /// One prefill per group, then one static batch (`generate_groups_from_embeds`).
    PerGroup,
    /// The rollout engine: decode slots groups flow through (`ContinuousBatch`).
    Continuous,
}

fn bench_ours(
    model: &Llama,
    prompts: &[Vec<i64>],
    args: &Args,
    device: Device,
    path: Route,
) -> Result<(f64, f64), String> {
    let params = SamplingParams { max_new_tokens: args.new, greedy: args.greedy, seed: 1, ..Default::default() };
    let g = args.group;
    let ids = Tensor::from_slice2(prompts).to_device(device);
    let mask = ids.ones_like();
    let run = |params: &SamplingParams| -> Result<Generation, String> {
        let embeds = tch::no_grad(|| model.embed_tokens(&ids));
        match path {
            Route::PerGroup => generate_groups_from_embeds(model, &embeds, &mask, g, params),
            Route::PerRow => {
                let repeat = |t: &Tensor| t.repeat_interleave_self_int(g, 0, None::<i64>);
                generate_from_embeds(model, &repeat(&embeds), &repeat(&mask), params)
            }
            Route::Continuous => return continuous(model, &embeds, g, params, device),
        }
        .map_err(|e| e.to_string())
    };
    run(&SamplingParams { max_new_tokens: 2, ..params.clone() })?;
    let prefill_rows =
        if path == Route::PerRow { ids.repeat_interleave_self_int(g, 0, None::<i64>) } else { ids.shallow_clone() };
    let (mut prefill, mut total) = (f64::INFINITY, f64::INFINITY);
    for _ in 0..args.repeat {
        let start = Instant::now();
        tch::no_grad(|| {
            let rows = prefill_rows.size()[0];
            let mut cache = model.new_cache(rows, args.prompt);
            let hidden =
                model.forward_hidden(&model.embed_tokens(&prefill_rows), &prefill_rows.ones_like(), Some(&mut cache));
            let _ = model.logits(&hidden.narrow(1, args.prompt - 1, 1));
        });
        sync(device);
        prefill = prefill.min(start.elapsed().as_secs_f64());
        let start = Instant::now();
        let generation = run(&params)?;
        sync(device);
        total = total.min(start.elapsed().as_secs_f64());
        if generation.tokens.len() as i64 != args.batch || generation.tokens.iter().any(|row| row.len() != args.new) {
            return Err("a row stopped early".into());
        }
    }
    Ok((prefill, total))
}

/// Every prompt (`embeds` `[n, t, d]`) as a group of `g` through a continuous batch with a slot
/// per row; the rows in group order.
fn continuous(
    model: &Llama,
    embeds: &Tensor,
    g: i64,
    params: &SamplingParams,
    device: Device,
) -> Result<Generation, String> {
    let n = embeds.size()[0];
    let mut batch = ContinuousBatch::new((n * g) as usize, params, device).map_err(|e| e.to_string())?;
    for i in 0..n {
        let request =
            GroupRequest { id: i as u64, embeds: embeds.get(i), group_size: g as usize, seed: params.seed + i as u64 };
        batch.submit(request).map_err(|e| e.to_string())?;
    }
    let mut groups = Vec::new();
    while !batch.is_idle() {
        groups.extend(batch.step(model, 0).map_err(|e| e.to_string())?);
    }
    groups.sort_by_key(|f| f.id);
    let mut all = Generation { tokens: Vec::new(), logprobs: Vec::new(), finished_by_eos: Vec::new() };
    for group in groups {
        all.tokens.extend(group.generation.tokens);
        all.logprobs.extend(group.generation.logprobs);
        all.finished_by_eos.extend(group.generation.finished_by_eos);
    }
    Ok(all)
}

fn bench_hf(dir: &Path, prompts: &[Vec<i64>], args: &Args) -> Result<(f64, f64, i64), String> {
    // MEDTVT_PYTHON: a python with transformers where `.venv` is not (e.g. the GPU check's machine).
    let python = std::env::var_os("MEDTVT_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python"));
    let request = serde_json::json!({
        "dir": dir, "ids": prompts, "new": args.new, "dtype": args.dtype, "device": args.device,
        "repeat": args.repeat, "greedy": args.greedy, "threads": args.threads,
    });
    let out = Command::new(&python)
        .args(["-c", HF_BENCH, &request.to_string()])
        .output()
        .map_err(|e| format!("cannot run {}: {e}", python.display()))?;
    if !out.status.success() {
        return Err(format!("transformers run failed: {}", String::from_utf8_lossy(&out.stderr)));
    }
    let reply: serde_json::Value =
        serde_json::from_slice(&out.stdout).map_err(|e| format!("bad reply from python: {e}"))?;
    let get = |k: &str| reply[k].as_f64().ok_or_else(|| format!("python reply lacks {k}"));
    Ok((get("prefill_s")?, get("generate_s")?, get("threads")? as i64))
}

fn run() -> Result<(), String> {
    let args = parse_args()?;
    let device = device_of(&args.device)?;
    let kind = kind_from_name(&args.dtype).map_err(|e| e.to_string())?;
    check_device_kind(device, kind).map_err(|e| e.to_string())?;
    if args.threads > 0 {
        tch::set_num_threads(args.threads as i32);
    }
    let scratch_dir = tempfile::tempdir().map_err(|e| format!("cannot create a scratch directory: {e}"))?;
    let scratch = scratch_dir.path().to_path_buf();
    let (vs, model, dir): (nn::VarStore, Llama, PathBuf) = match LlamaConfig::bench_shape(&args.config) {
        Some(config) => {
            tch::manual_seed(0);
            let mut vs = nn::VarStore::new(device);
            vs.set_kind(kind);
            let model = Llama::new(&vs.root(), &config);
            if args.hf {
                save_hf(&vs, &config, &scratch).map_err(|e| e.to_string())?;
            }
            (vs, model, scratch.clone())
        }
        None => {
            let dir = PathBuf::from(&args.config);
            let (vs, model) = load_llama(&dir, device, kind).map_err(|e| e.to_string())?;
            (vs, model, dir)
        }
    };
    let c = model.config();
    let params: i64 = vs.trainable_variables().iter().map(|t| t.numel() as i64).sum();
    println!(
        "config {} ({:.1} M params: vocab {}, hidden {}, layers {}, heads {}/{} kv), batch {}, prompt {}, new {}, {} on {:?}, {}, torch threads {}",
        args.config, params as f64 / 1e6, c.vocab_size, c.hidden_size, c.num_hidden_layers, c.num_attention_heads,
        c.num_key_value_heads, args.batch, args.prompt, args.new, args.dtype, device,
        if args.greedy { "greedy" } else { "sampling T=1" }, tch::get_num_threads(),
    );
    let distinct: Vec<Vec<i64>> = (0..args.batch / args.group)
        .map(|r| (0..args.prompt).map(|i| (r * 7919 + i * 104729 + 3) % c.vocab_size).collect())
        .collect();
    let rate = |tokens: i64, s: f64| tokens as f64 / s;
    // Prompt tokens the batch holds (every row's), whichever way they were prefilled.
    let (prompt_tokens, new_tokens) = (args.batch * args.prompt, args.batch * args.new as i64);
    println!("\n| implementation | prefill tok/s | generation tok/s (end to end) | generate wall s |");
    println!("|---|---:|---:|---:|");
    let mut ours = Vec::new();
    let variants: &[(Route, &str)] = if args.group > 1 {
        &[
            (Route::PerRow, "medtvt (tch), one prefill per row"),
            (Route::Continuous, "medtvt (tch), rollout engine (continuous batching, one prefill per group)"),
            (Route::PerGroup, "medtvt (tch), one prefill per group"),
        ]
    } else {
        &[(Route::PerGroup, "medtvt (tch)")]
    };
    for &(path, name) in variants {
        let (prefill, total) = bench_ours(&model, &distinct, &args, device, path)?;
        println!("| {name} | {:.0} | {:.0} | {:.3} |", rate(prompt_tokens, prefill), rate(new_tokens, total), total);
        ours.push((name, prefill, total));
    }
    if let [(_, _, old), (_, _, engine), (_, _, new)] = ours[..] {
        println!("| ratio one prefill per group / per row | | {:.2}x | |", old / new);
        println!("| ratio rollout engine / per row | | {:.2}x | |", old / engine);
    }
    let (_, prefill, total) = *ours.last().ok_or("nothing measured")?;
    if args.hf {
        let prompts: Vec<Vec<i64>> =
            distinct.iter().flat_map(|p| std::iter::repeat_n(p.clone(), args.group as usize)).collect();
        let (hf_prefill, hf_total, threads) = bench_hf(&dir, &prompts, &args)?;
        println!(
            "| HF transformers generate ({threads} threads) | {:.0} | {:.0} | {:.3} |",
            rate(prompt_tokens, hf_prefill),
            rate(new_tokens, hf_total),
            hf_total
        );
        println!("| ratio medtvt (last row) / HF | {:.2}x | {:.2}x | |", hf_prefill / prefill, hf_total / total);
    }
    Ok(())
}

fn main() {
    if let Err(message) = run() {
        eprintln!("bench_generate: {message}");
        std::process::exit(2);
    }
}
