"""AdamW as published for DeepSeek-V2 and its learning-rate schedules (pure functions of the step)."""

from __future__ import annotations

import math

import torch
from torch import nn

SCHEDULES = ("step", "cosine", "constant")
STEP_DECAY = 0.316  # the paper multiplies the LR by 0.316 at ~60% and again at ~90% of training
STEP_AT = (0.6, 0.9)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices (ndim >= 2: projections, stacked experts, router, embeddings) only;
    norms and biases are not decayed (shrinking an RMSNorm gain towards 0 is not regularisation)."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.1,
                    betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8) -> torch.optim.AdamW:
    # foreach=False on CPU: the per-tensor loop is bitwise reproducible and no slower at this size
    foreach = any(p.is_cuda for p in model.parameters())
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas, eps=eps,
                             foreach=foreach)


def lr_at(step: int, *, lr: float, total_steps: int, warmup: int, schedule: str = "step",
          min_lr_ratio: float = 0.1) -> float:
    """LR for optimizer step `step` (0-based).

    Linear warm-up over `warmup` steps, then
      step:     x0.316 from 60% of `total_steps`, x0.316 again from 90% (DeepSeek-V2),
      cosine:   cosine from lr to min_lr_ratio*lr at the last step,
      constant: lr.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if warmup > 0 and step < warmup:
        return lr * (step + 1) / warmup
    if schedule == "constant":
        return lr
    if schedule == "step":
        mult = 1.0
        for frac in STEP_AT:
            if step >= int(frac * total_steps):
                mult *= STEP_DECAY
        return lr * mult
    span = max(1, total_steps - 1 - warmup)
    t = min(1.0, (step - warmup) / span)
    return lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for g in opt.param_groups:
        g["lr"] = lr
