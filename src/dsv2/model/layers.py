"""Small building blocks shared by attention, MoE and the decoder: RMSNorm and the SwiGLU MLP.

Plain PyTorch: platform policies (CPU precision, quantised weights) are applied by module-swap passes
from outside (dsv2.precision, dsv2.quant).

Shapes: B batch, T tokens, D hidden_size, I intermediate size.
"""

from __future__ import annotations

from collections.abc import Callable

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


def silu_mul(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """SwiGLU's gating, silu(g) · u: the one definition the dense MLP, the routed experts and the quantised
    experts apply to their gate and up products."""
    return F.silu(g) * u


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) · up(x)). Used dense and as the shared experts."""

    # silu(g) · u as a class attribute, so that a precision pass can swap in a kernel that does the same in one
    # call (`dsv2.precision.CpuMLP`)
    gating = staticmethod(silu_mul)

    def __init__(self, dim: int, hidden: int, device: torch.device | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        kw = dict(bias=False, device=device, dtype=dtype)
        self.gate_proj = nn.Linear(dim, hidden, **kw)
        self.up_proj = nn.Linear(dim, hidden, **kw)
        self.down_proj = nn.Linear(hidden, dim, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.__dict__.get("_gate_up")  # set by dsv2.fuse: one Linear over [gate; up]
        if gate_up is not None and halves_of(self.gate_proj.weight, self.up_proj.weight, gate_up.weight):
            g, u = gate_up(x).chunk(2, dim=-1)
            return self.down_proj(self.gating(g, u))
        return self.down_proj(self.gating(self.gate_proj(x), self.up_proj(x)))


def halves_of(gate: torch.Tensor, up: torch.Tensor, whole: torch.Tensor | None) -> bool:
    """Whether, in inference, `gate` and `up` are still the two halves of `whole` along dim -2 (the
    layout `dsv2.fuse` gives them), so that one matmul by `whole` computes both."""
    if whole is None or torch.is_grad_enabled() or gate.shape != up.shape or torch.compiler.is_compiling():
        return False  # (a compiled graph reads the two halves; inductor fuses the matmuls its own way)
    i = gate.shape[-2]
    return (whole.shape[-2] == 2 * i and gate.data_ptr() == whole.data_ptr() and gate.stride() == whole.stride()
            and up.data_ptr() == whole.data_ptr() + i * whole.stride(-2) * whole.element_size()
            and gate.dtype == whole.dtype)


def derived(weight: torch.Tensor, owner: object, slot: str, make: Callable[[torch.Tensor], torch.Tensor]
            ) -> torch.Tensor:
    """make(weight), cached on `owner` under `slot` and rebuilt when the weight changes in place (its
    version counter moves: optimizer steps, load_state_dict, no_grad in-place ops), is replaced, moved
    or cast. Writes through `.data` bypass the version counter and are not seen."""
    key = (weight.data_ptr(), weight._version, weight.shape, weight.dtype, weight.device)
    cached = owner.__dict__.get(slot)
    if cached is None or cached[0] != key:
        cached = (key, make(weight.detach()))
        owner.__dict__[slot] = cached
    return cached[1]
