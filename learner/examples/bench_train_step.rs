//! Learner throughput: one training step (forward, backward, AdamW with f32 masters) of the
//! decoder on a `--batch` x `--seq` token batch, as tokens/s and model TFLOP/s, side by side with
//! the same step in plain PyTorch (same shapes, dtype, device and threads) when `.venv` has torch.
//!
//! ```sh
//! cargo run --release -p medtvt-learner --example bench_train_step -- \
//!     --config llama-1b --batch 16 --seq 1024 --dtype bf16 --device cuda
//! ```
//!
//! `--config` is `tiny`, `small` or `llama-1b` (random weights). FLOPs per step follow the usual
//! count for a decoder: 6 x parameters x tokens for the matrix products of forward and backward,
//! plus 12 x layers x hidden x seq x tokens for attention scores and values (causal attention
//! counted in full, as Megatron's and PaLM's MFU formulas do). `--steps N` timed steps after one
//! warm-up step; the best is reported. `--no-torch` skips the PyTorch row.

use anyhow::{bail, Context, Result};
use medtvt_learner::optim::{AdamW, AdamWConfig};
use medtvt_model::llama::{kind_from_name, Llama, LlamaConfig};
use std::process::Command;
use std::time::Instant;
use tch::{nn, Device, Kind, Tensor};

const TORCH_BENCH: &str = r#"
import json, sys, time, torch, torch.nn.functional as F
a = json.loads(sys.argv[1])
dev = torch.device(a["device"]); dtype = {"f32": torch.float32, "bf16": torch.bfloat16}[a["dtype"]]
if a["threads"] > 0: torch.set_num_threads(a["threads"])
try:
    from transformers import LlamaConfig, LlamaForCausalLM
except ImportError:
    print(json.dumps({"error": "transformers is not installed"})); sys.exit(0)
c = a["cfg"]
cfg = LlamaConfig(vocab_size=c["vocab"], hidden_size=c["hidden"], intermediate_size=c["inter"],
                  num_hidden_layers=c["layers"], num_attention_heads=c["heads"], num_key_value_heads=c["kv"],
                  tie_word_embeddings=True, attn_implementation="sdpa")
model = LlamaForCausalLM(cfg).to(dev, dtype).train()
opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
ids = torch.randint(0, c["vocab"], (a["batch"], a["seq"]), device=dev)
def sync():
    if dev.type == "cuda": torch.cuda.synchronize()
best = float("inf")
for i in range(a["steps"] + 1):
    sync(); t = time.perf_counter()
    out = model(input_ids=ids, labels=ids)
    out.loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
    sync(); dt = time.perf_counter() - t
    if i > 0: best = min(best, dt)
print(json.dumps({"step_s": best}))
"#;

struct Args {
    config: String,
    batch: i64,
    seq: i64,
    dtype: String,
    device: String,
    steps: usize,
    threads: i32,
    torch: bool,
}

fn parse_args() -> Result<Args> {
    let mut args = Args {
        config: "tiny".into(),
        batch: 4,
        seq: 256,
        dtype: "f32".into(),
        device: "cpu".into(),
        steps: 2,
        threads: 0,
        torch: true,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--config" => args.config = value()?,
            "--batch" => args.batch = value()?.parse()?,
            "--seq" => args.seq = value()?.parse()?,
            "--dtype" => args.dtype = value()?,
            "--device" => args.device = value()?,
            "--steps" => args.steps = value()?.parse::<usize>()?.max(1),
            "--threads" => args.threads = value()?.parse()?,
            "--no-torch" => args.torch = false,
            other => bail!("unknown flag {other} (see the doc at the top of bench_train_step.rs)"),
        }
    }
    Ok(args)
}

fn device_of(name: &str) -> Result<Device> {
    Ok(match name {
        "cpu" => Device::Cpu,
        "cuda" => Device::Cuda(0),
        other => Device::Cuda(
            other.strip_prefix("cuda:").and_then(|i| i.parse().ok()).context("device: cpu, cuda or cuda:N")?,
        ),
    })
}

fn sync(device: Device) {
    if let Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
}

fn main() -> Result<()> {
    let args = parse_args()?;
    let device = device_of(&args.device)?;
    let kind = kind_from_name(&args.dtype)?;
    if args.threads > 0 {
        tch::set_num_threads(args.threads);
    }
    let config = LlamaConfig::bench_shape(&args.config)
        .with_context(|| format!("unknown --config {}: tiny, small or llama-1b", args.config))?;
    tch::manual_seed(0);
    let mut vs = nn::VarStore::new(device);
    let model = Llama::new(&vs.root(), &config);
    vs.set_kind(kind);
    let params: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    let n_params: i64 = params.iter().map(|(_, t)| t.numel() as i64).sum();
    let mut optimizer = AdamW::new(params, AdamWConfig::default());
    let ids = Tensor::randint(config.vocab_size, [args.batch, args.seq], (Kind::Int64, device));
    let mask = ids.ones_like();
    let mut best = f64::INFINITY;
    for step in 0..=args.steps {
        sync(device);
        let start = Instant::now();
        let logits = model.forward(&ids, &mask, None); // [b, t, vocab] f32
        let vocab = config.vocab_size;
        let loss = logits
            .narrow(1, 0, args.seq - 1)
            .reshape([-1, vocab])
            .cross_entropy_for_logits(&ids.narrow(1, 1, args.seq - 1).reshape([-1]));
        optimizer.zero_grad();
        loss.backward();
        optimizer.step(1e-5);
        sync(device);
        if step > 0 {
            best = best.min(start.elapsed().as_secs_f64());
        }
    }
    let tokens = (args.batch * args.seq) as f64;
    let flops = 6.0 * n_params as f64 * tokens
        + 12.0 * (config.num_hidden_layers * config.hidden_size) as f64 * args.seq as f64 * tokens;
    println!(
        "config {} ({:.1} M params), batch {} x seq {}, {} on {:?}, torch threads {}",
        args.config,
        n_params as f64 / 1e6,
        args.batch,
        args.seq,
        args.dtype,
        device,
        tch::get_num_threads()
    );
    println!("\n| implementation | step s | tokens/s | model TFLOP/s |");
    println!("|---|---:|---:|---:|");
    println!(
        "| medtvt learner (tch, AdamW with f32 masters) | {best:.3} | {:.0} | {:.2} |",
        tokens / best,
        flops / best / 1e12
    );
    if args.torch {
        // MEDTVT_PYTHON: a python with torch and transformers where `.venv` is not.
        let python = std::env::var_os("MEDTVT_PYTHON")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python"));
        let request = serde_json::json!({
            "device": args.device, "dtype": args.dtype, "threads": args.threads, "batch": args.batch,
            "seq": args.seq, "steps": args.steps,
            "cfg": {"vocab": config.vocab_size, "hidden": config.hidden_size, "inter": config.intermediate_size,
                    "layers": config.num_hidden_layers, "heads": config.num_attention_heads,
                    "kv": config.num_key_value_heads},
        });
        let out = Command::new(&python).args(["-c", TORCH_BENCH, &request.to_string()]).output()?;
        let reply: serde_json::Value = serde_json::from_slice(&out.stdout)
            .with_context(|| format!("python said: {}", String::from_utf8_lossy(&out.stderr)))?;
        match reply["step_s"].as_f64() {
            Some(s) => println!(
                "| PyTorch + transformers (torch.optim.AdamW) | {s:.3} | {:.0} | {:.2} |",
                tokens / s,
                flops / s / 1e12
            ),
            None => println!("| PyTorch + transformers | {} | | |", reply["error"].as_str().unwrap_or("failed")),
        }
    }
    Ok(())
}
