#!/usr/bin/env python3
"""Writes learner/tests/fixtures/grpo_loss.json: TRL's GRPO loss on fixed log-probs.

For fixed per-token log-probs (policy, old, reference), advantages and a completion mask with
padding, the loss, its gradient with respect to the policy log-probs, the mean KL and the clip
fractions are computed by TRL's own `GRPOTrainer._compute_loss`, in each loss type we have an
aggregation mode for:

    TRL loss_type   ours (grpo.loss_aggregation)
    grpo            seq_mean_token_mean
    bnpo            token_mean
    dr_grpo         seq_mean_token_sum (divisor = max_completion_length)
    dapo            token_mean (normaliser = tokens of the generation batch, one process)

Only the model forward is replaced: `_get_per_token_logps_and_entropies` returns the fixed
log-probs (a leaf tensor, so the gradient can be read back); everything after it, from the ratio
to the aggregation, is TRL's code. A trainer object is made without `__init__` and given just the
attributes `_compute_loss` reads. learner/tests/grpo_trl_parity.rs compares medtvt's loss with it.

Deterministic (fixed seed). Needs trl (scripts/requirements-bench.txt). From the repository root:
    .venv/bin/python scripts/make_grpo_loss_fixtures.py
"""

import json
import types
from collections import defaultdict
from pathlib import Path

import torch
from trl import GRPOTrainer

OUT = Path(__file__).resolve().parent.parent / "learner" / "tests" / "fixtures" / "grpo_loss.json"
SEED = 20261202
B, T = 6, 7  # 3 groups of 2 completions, up to 7 tokens
BETA = 0.04
EPS_LOW, EPS_HIGH = 0.2, 0.28


class _Accelerator:
    """The single-process accelerator `_compute_loss` talks to."""

    num_processes = 1

    def gather(self, x):
        return x

    def reduce(self, x, reduction="sum"):
        return x


def trl_trainer(loss_type, logp):
    trainer = object.__new__(GRPOTrainer)
    trainer._get_per_token_logps_and_entropies = lambda *args, **kwargs: (logp, torch.zeros_like(logp), None)
    trainer.aux_loss_enabled = False
    trainer.top_entropy_quantile = 1.0
    trainer.off_policy_mask_threshold = None
    trainer.importance_sampling_level = "token"
    trainer.beta = BETA
    trainer.loss_type = loss_type
    trainer.epsilon_low = EPS_LOW
    trainer.epsilon_high = EPS_HIGH
    trainer.use_vllm = False
    trainer.max_completion_length = T
    trainer.current_gradient_accumulation_steps = 1
    trainer._entropy_bonus_enabled = False
    trainer._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    trainer.args = types.SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1)
    trainer.accelerator = _Accelerator()
    trainer.model = types.SimpleNamespace(training=True)
    return trainer


def main():
    torch.manual_seed(SEED)
    lengths = [7, 5, 3, 7, 1, 4]
    mask = torch.zeros(B, T)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1.0
    logp = -torch.rand(B, T, dtype=torch.float64) * 3.0 - 0.05
    # Old log-probs near the policy's, some far enough for either clip to act.
    old = logp + torch.randn(B, T, dtype=torch.float64) * 0.4
    ref = logp + torch.randn(B, T, dtype=torch.float64) * 0.3
    rewards = torch.tensor([[1.0, 0.0], [0.3, 0.9], [0.5, 0.2]], dtype=torch.float64)
    mean = rewards.mean(dim=1, keepdim=True)
    std = rewards.std(dim=1, keepdim=True)
    advantages = ((rewards - mean) / (std + 1e-4)).reshape(-1)
    cases = []
    for loss_type in ["grpo", "bnpo", "dr_grpo", "dapo"]:
        leaf = logp.clone().requires_grad_(True)
        trainer = trl_trainer(loss_type, leaf)
        inputs = {
            "prompt_ids": torch.zeros(B, 1, dtype=torch.long),
            "prompt_mask": torch.ones(B, 1, dtype=torch.long),
            "completion_ids": torch.zeros(B, T, dtype=torch.long),
            "completion_mask": mask.to(torch.long),
            "advantages": advantages,
            "old_per_token_logps": old,
            "ref_per_token_logps": ref,
            "num_items_in_batch": mask.sum(),
        }
        loss = GRPOTrainer._compute_loss(trainer, None, inputs)
        loss.backward()
        metrics = trainer._metrics["train"]
        cases.append(
            {
                "loss_type": loss_type,
                "loss": loss.item(),
                "grad_logp": leaf.grad.tolist(),
                "kl_mean": metrics["kl"][0],
                "clip_low_fraction": metrics["clip_ratio/low_mean"][0],
                "clip_high_fraction": metrics["clip_ratio/high_mean"][0],
                "clip_fraction": metrics["clip_ratio/region_mean"][0],
            }
        )
    fixture = {
        "about": "TRL 1.16 GRPOTrainer._compute_loss on fixed log-probs; made by scripts/make_grpo_loss_fixtures.py",
        "beta": BETA,
        "eps_low": EPS_LOW,
        "eps_high": EPS_HIGH,
        "max_completion_length": T,
        "logp": logp.tolist(),
        "logp_old": old.tolist(),
        "logp_ref": ref.tolist(),
        "mask": mask.tolist(),
        "advantages": advantages.tolist(),
        "cases": cases,
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(fixture, indent=1) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
