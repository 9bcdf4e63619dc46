"""Training statistics: routing balance, FLOPs/MFU estimate, the loss-curve plot.

Shapes: L_moe MoE layers, E routed experts.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dsv2.config import ModelConfig


def load_stats(expert_load: torch.Tensor) -> dict[str, float]:
    """Expert load (L_moe, E) token counts -> max/mean (1 = perfectly even, averaged over layers) and
    entropy of the load distribution normalised by ln E (1 = perfectly even)."""
    if expert_load.numel() == 0:
        return {}
    load = expert_load.double()
    e = load.shape[-1]
    ratio = (load.amax(-1) / load.mean(-1).clamp_min(1e-12)).mean()
    p = load / load.sum(-1, keepdim=True).clamp_min(1e-12)
    ent = -(p * p.clamp_min(1e-30).log()).sum(-1).mean() / math.log(e) if e > 1 else torch.ones(())
    return {"load_max_mean": float(ratio), "load_entropy": float(ent)}


def active_params(model: nn.Module, cfg: ModelConfig) -> tuple[int, int]:
    """(total, active per token) parameter counts; routed experts count K/E, the embedding table 0
    (a lookup, not a matmul), the lm_head fully."""
    total = sum(p.numel() for p in model.parameters())
    active = 0.0
    k, e = cfg.num_experts_per_tok or 0, cfg.n_routed_experts or 1
    for name, p in model.named_parameters():
        if name.startswith("embed_tokens"):
            continue
        if ".experts." in name and p.ndim == 3:  # stacked routed experts (E, ., .)
            active += p.numel() * k / e
        else:
            active += p.numel()
    return total, int(active)


def flops_per_token(model: nn.Module, cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6·N_active + 6·L·H·(d_qk + d_v)·T (PaLM's estimate, full attention)."""
    _, n_active = active_params(model, cfg)
    if cfg.attention_type == "mla":
        dqk, dv = cfg.qk_head_dim, cfg.v_head_dim
    else:
        dqk = dv = cfg.head_dim
    attn = 6 * cfg.num_hidden_layers * cfg.num_attention_heads * (dqk + dv) * seq_len
    return 6.0 * n_active + attn


_GPU_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0, "A10": 125.0}


def peak_tflops(device: torch.device, threads: int, dtype: str) -> float:
    """A rough dense peak for the MFU estimate (override with --peak-tflops).

    CPU: threads x 2.5 GHz x 32 FLOP/cycle (two 8-wide fp32 FMA pipes, AVX2); bf16 counted the same
    because CPUs without AMX run bf16 matmuls through fp32 FMAs.
    """
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tf in _GPU_PEAK_TFLOPS.items():
            if key in name:
                return tf if dtype == "bf16" else tf / 2
        return 100.0
    return threads * 2.5e9 * 32 / 1e12


def plot_curves(history: list[dict[str, Any]], path: Path, title: str = "") -> None:
    """Train loss (and validation loss where evaluated) against step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(h["step"], h["loss"]) for h in history if "loss" in h]
    val = [(h["step"], h["val_loss"]) for h in history if "val_loss" in h]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    if train:
        ax.plot(*zip(*train), lw=1, alpha=0.8, label="train loss")
    if val:
        ax.plot(*zip(*val), "o-", lw=1.5, ms=3, label="val loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
