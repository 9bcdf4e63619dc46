"""Small building blocks shared by attention, MoE and the decoder: RMSNorm and the SwiGLU MLP.

Plain PyTorch: platform policies (CPU precision, quantised weights) are applied by module-swap passes
from outside (dsv2.precision, dsv2.quant).

Shapes: B batch, T tokens, D hidden_size, I intermediate size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """x / rms(x) · w, normalised in fp32 and cast back before the weight (as the checkpoints expect)."""

    def __init__(self, dim: int, eps: float = 1e-6, device: torch.device | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)  # x·rsqrt(mean(x²) + eps), one aten call
        return self.weight * xf.to(x.dtype)


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) · up(x)). Used dense and as the shared experts."""

    def __init__(self, dim: int, hidden: int, device: torch.device | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        kw = dict(bias=False, device=device, dtype=dtype)
        self.gate_proj = nn.Linear(dim, hidden, **kw)
        self.up_proj = nn.Linear(dim, hidden, **kw)
        self.down_proj = nn.Linear(hidden, dim, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
