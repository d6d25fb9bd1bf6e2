#!/usr/bin/env python3
"""Builds the Llama parity fixtures under model/tests/fixtures/<name>/ with HF transformers.

Each fixture is a small random-weight LlamaForCausalLM saved the HF way (config.json,
model.safetensors) plus what transformers computes on it, for `model/tests/llama_parity.rs`:

  expected.safetensors
    single_ids      [1, 12]   i64   one unpadded prompt
    single_logits   [1, 12, V] f32  logits of that prompt
    batch_ids       [3, T]    i64   a ragged batch, left-padded with pad id 0
    batch_mask      [3, T]    i64   1 = real token, 0 = padding
    batch_logits    [3, T, V] f32   logits, positions = cumsum(mask) - 1 (what generate uses)
    greedy_tokens   [3, N]    i64   greedy continuation of each batch row, computed one row at a
                                    time without padding (do_sample=False, EOS disabled)
  expected.json     the same prompts as lists, N, and the transformers/torch versions.

Config A (`gqa_llama3`): grouped-query attention (4 heads, 2 KV heads), llama3 rope scaling, tied
embeddings. Config B (`mha_untied`): multi-head attention, head_dim 32 != hidden/heads, untied
lm_head, no rope scaling. Weights are drawn with a larger std than HF's init so logits are far from
ties and greedy decoding is a meaningful check.

Run with the project venv: `.venv/bin/python scripts/make_llama_fixtures.py` (or `make fixtures`).
"""

import json
import os
import sys

import torch
import transformers
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "model", "tests", "fixtures")
NEW_TOKENS = 10
PAD_ID = 0

CONFIGS = {
    "gqa_llama3": dict(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-5,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        },
        bos_token_id=1,
        eos_token_id=[2, 3],
        seed=1234,
    ),
    "mha_untied": dict(
        vocab_size=280,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        head_dim=32,
        rms_norm_eps=1e-6,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        bos_token_id=1,
        eos_token_id=2,
        seed=4321,
    ),
}


def build_model(params):
    params = dict(params)
    seed = params.pop("seed")
    torch.manual_seed(seed)
    config = LlamaConfig(**params, dtype="float32")
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.15)
    return model


def left_pad(rows):
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), PAD_ID, dtype=torch.int64)
    mask = torch.zeros((len(rows), width), dtype=torch.int64)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
    return ids, mask


def greedy(model, prompt):
    ids = torch.tensor([prompt])
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        do_sample=False,
        max_new_tokens=NEW_TOKENS,
        min_new_tokens=0,
        eos_token_id=None,
        pad_token_id=PAD_ID,
    )
    new = out[0, len(prompt):].tolist()
    assert len(new) == NEW_TOKENS, f"generate stopped early: {new}"
    return new


def make(name, params):
    out_dir = os.path.join(ROOT, name)
    os.makedirs(out_dir, exist_ok=True)
    model = build_model(params)
    model.generation_config.eos_token_id = None
    model.save_pretrained(out_dir)

    gen = torch.Generator().manual_seed(params["seed"] + 1)
    vocab = params["vocab_size"]
    rand = lambda n: torch.randint(4, vocab, (n,), generator=gen).tolist()
    single = rand(12)
    batch_rows = [rand(9), rand(4), rand(7)]
    batch_ids, batch_mask = left_pad(batch_rows)
    positions = (batch_mask.cumsum(-1) - 1).clamp(min=0)

    with torch.no_grad():
        single_logits = model(torch.tensor([single])).logits.float()
        batch_logits = model(batch_ids, attention_mask=batch_mask, position_ids=positions).logits.float()
        greedy_tokens = [greedy(model, row) for row in batch_rows]

    save_file(
        {
            "single_ids": torch.tensor([single]),
            "single_logits": single_logits.contiguous(),
            "batch_ids": batch_ids,
            "batch_mask": batch_mask,
            "batch_logits": batch_logits.contiguous(),
            "greedy_tokens": torch.tensor(greedy_tokens),
        },
        os.path.join(out_dir, "expected.safetensors"),
    )
    with open(os.path.join(out_dir, "expected.json"), "w") as f:
        json.dump(
            {
                "single": single,
                "batch": batch_rows,
                "pad_id": PAD_ID,
                "new_tokens": NEW_TOKENS,
                "greedy_tokens": greedy_tokens,
                "transformers": transformers.__version__,
                "torch": torch.__version__,
            },
            f,
            indent=1,
        )
        f.write("\n")
    print(f"{name}: wrote {out_dir}")


def main():
    torch.use_deterministic_algorithms(True)
    for name, params in CONFIGS.items():
        make(name, params)
    return 0


if __name__ == "__main__":
    sys.exit(main())
