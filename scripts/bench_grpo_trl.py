"""The TRL half of the side-by-side GRPO benchmark (cli/examples/bench_grpo.rs runs it).

Loads the decoder of a MedTVT checkpoint directory (config.json + model.safetensors in the HF
Llama layout, tokenizer.json) into transformers, trains it with TRL's GRPOTrainer on the given
prompts with the Jaccard + format reward of the spec (shared/docs/medtvt.md), and prints one JSON
line: wall time and completion tokens of every step after the first (warm-up).

    .venv/bin/python scripts/bench_grpo_trl.py --checkpoint DIR --prompts prompts.json \
        --group 8 --prompts-per-step 4 --max-new 64 --steps 5 --threads 2
"""

import argparse
import json
import re
import time

import torch
import trl
from datasets import Dataset
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast, TrainerCallback
from trl import GRPOConfig, GRPOTrainer

ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
FORMAT = re.compile(r"<think>.*?</think>\s*<answer>.*?</answer>", re.DOTALL)


def answer_set(text):
    m = ANSWER.search(text)
    if m is None:
        return None
    return {item.strip().lower() for item in m.group(1).split(";") if item.strip()}


def jaccard(completion, reference):
    p, t = answer_set(completion), answer_set(reference)
    if p is None or t is None or not (p | t):
        return 0.0
    return len(p & t) / len(p | t)


def reward(prompts, completions, reference, **_):
    return [jaccard(c, r) + (1.0 if FORMAT.fullmatch(c.lstrip()) else 0.0) for c, r in zip(completions, reference)]


class StepTimer(TrainerCallback):
    def __init__(self):
        self.started = None
        self.times = []

    def on_step_begin(self, args, state, control, **kwargs):
        self.started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self.started)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--prompts", required=True, help="JSON list of {prompt, reference}")
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--prompts-per-step", type=int, default=4)
    ap.add_argument("--max-new", type=int, default=64)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--beta", type=float, default=0.04)
    ap.add_argument("--out", default="/tmp/bench_grpo_trl")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    ap.add_argument("--dtype", default="f32", choices=["f32", "bf16", "f16"])
    a = ap.parse_args()

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    with open(f"{a.checkpoint}/config.json") as f:
        config = json.load(f)
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=f"{a.checkpoint}/tokenizer.json")
    eos = config.get("eos_token_id")
    eos = eos[0] if isinstance(eos, list) else eos
    if eos is None:  # checkpoints written before config.json named it: the tiny model's end token
        eos = tokenizer.convert_tokens_to_ids("<eos>")
    pad = config.get("pad_token_id")
    tokenizer.eos_token = tokenizer.convert_ids_to_tokens(eos)
    tokenizer.pad_token = tokenizer.convert_ids_to_tokens(pad if pad is not None else eos)
    dtype = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}[a.dtype]
    model = LlamaForCausalLM.from_pretrained(a.checkpoint, dtype=dtype)
    if a.device.startswith("cuda"):
        model = model.to(a.device)

    with open(a.prompts) as f:
        rows = json.load(f)
    needed = (a.steps + 1) * a.prompts_per_step
    rows = (rows * (needed // len(rows) + 1))[:needed]
    dataset = Dataset.from_list(rows)
    prompt_tokens = sum(len(tokenizer(r["prompt"], add_special_tokens=False)["input_ids"]) for r in rows) / len(rows)

    args = GRPOConfig(
        output_dir=a.out,
        per_device_train_batch_size=a.prompts_per_step * a.group,
        num_generations=a.group,
        max_completion_length=a.max_new,
        learning_rate=a.lr,
        lr_scheduler_type="constant",
        beta=a.beta,
        temperature=1.0,
        top_p=1.0,
        max_steps=a.steps + 1,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=not a.device.startswith("cuda"),
        bf16=a.dtype == "bf16",
        seed=0,
        shuffle_dataset=False,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    timer = StepTimer()
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=dataset, processing_class=tokenizer, callbacks=[timer])
    trainer.train()
    # TRL logs the mean completion length per step; completions per step = prompts x group.
    lengths = [h["completions/mean_length"] for h in trainer.state.log_history if "completions/mean_length" in h]
    tokens = [length * a.prompts_per_step * a.group for length in lengths]
    print(json.dumps({
        "trl_version": trl.__version__,
        "step_s": timer.times[1:],
        "completion_tokens": tokens[1:],
        "prompt_tokens": prompt_tokens,
    }))


if __name__ == "__main__":
    main()
