"""Shared by the 2-process worker and the single-process references in the tests (same builders,
same batches, so the only difference is the parallelism)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dsv2 import DeepseekV2, ModelConfig

GLOBAL_BATCH, SEQ = 4, 12
LR, CLIP = 0.05, 0.5


def config(**kw) -> ModelConfig:
    """tiny, shrunk; groups = 2 ranks (n_group 2, topk_group 1), all balance losses on."""
    base = dict(vocab_size=96, num_hidden_layers=2, hidden_size=32, intermediate_size=64, n_routed_experts=8,
                num_experts_per_tok=2, moe_intermediate_size=16, n_group=2, topk_group=1,
                aux_loss_alpha=0.01, device_aux_loss_alpha=0.05, comm_aux_loss_alpha=0.02)
    base.update(kw)
    return ModelConfig.from_preset("tiny", **base)


def build_model(cfg: ModelConfig | None = None, seed: int = 0) -> DeepseekV2:
    torch.manual_seed(seed)
    model = DeepseekV2(cfg or config(), dtype=torch.float32)
    with torch.no_grad():  # decisive routing: near-ties would flip on batch-size-dependent rounding
        for moe in model.moe_layers():
            moe.gate.weight.mul_(40.0)
    return model


def batches(n: int, cfg: ModelConfig | None = None, seed: int = 1) -> list[torch.Tensor]:
    """n global batches (GLOBAL_BATCH, SEQ + 1) of token ids."""
    g = torch.Generator().manual_seed(seed)
    v = (cfg or config()).vocab_size
    return [torch.randint(0, v, (GLOBAL_BATCH, SEQ + 1), generator=g) for _ in range(n)]


def exempt_mask(rows: int, step: int) -> torch.Tensor:
    """Sequences never dropped (the first of every 4, shifted by step)."""
    return (torch.arange(rows) + step) % 4 == 0


def loss_fn(model, rows: torch.Tensor, capacity_factor: float | None = None,
            exempt: torch.Tensor | None = None, adjust=None):
    ids, tgt = rows[:, :-1], rows[:, 1:]
    logits, aux = model(ids, return_aux=True, capacity_factor=capacity_factor, drop_exempt=exempt)
    if adjust is not None:
        aux = adjust(aux)
    ce = F.cross_entropy(logits.flatten(0, 1), tgt.flatten())
    return ce + aux["aux_loss"], ce, aux


def moe_input(n_tokens: int, dim: int, seed: int = 3) -> torch.Tensor:
    return torch.randn(n_tokens, dim, generator=torch.Generator().manual_seed(seed))


def build_moe(cfg: ModelConfig, seed: int = 5):
    """A lone MoE layer with N(0, 0.02) weights and a decisive router."""
    from dsv2.model.moe import MoE

    torch.manual_seed(seed)
    moe = MoE(cfg)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0.0, 0.02)
        moe.gate.weight.mul_(40.0)
    return moe
