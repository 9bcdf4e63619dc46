"""Small building blocks shared by attention, MoE and the decoder: RMSNorm and the SwiGLU MLP.

Shapes: B batch, T tokens, D hidden_size, I intermediate size.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

_LOW = (torch.bfloat16, torch.float16)


def native_low_precision(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether matmuls in `dtype` run natively fast on `device`.

    On CPUs without AVX512-BF16/AMX, PyTorch's bf16/fp16 GEMM falls back to a path 30-50x slower
    than fp32, so dsv2 computes those matmuls in fp32 there (storage stays in the low precision).
    """
    if dtype not in _LOW or device.type != "cpu":
        return True
    if dtype == torch.bfloat16:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())


def compute_weight(weight: torch.Tensor, owner: object | None = None, slot: str = "_fp32") -> torch.Tensor:
    """The weight in the dtype its matmul should run in; an fp32 copy is cached on `owner` for inference."""
    if native_low_precision(weight.device, weight.dtype):
        return weight
    if owner is None or (torch.is_grad_enabled() and weight.requires_grad):
        return weight.float()  # training: upcast on the fly so gradients reach the stored weight
    return _derived(weight, owner, slot, lambda w: w.float())


def _derived(weight: torch.Tensor, owner: object, slot: str,
             make: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """make(weight), cached on `owner` under `slot` and rebuilt when the weight changes in place (its
    version counter moves: optimizer steps, load_state_dict, no_grad in-place ops), is replaced, moved
    or cast. Writes through `.data` bypass the version counter and are not seen."""
    key = (weight.data_ptr(), weight._version, weight.shape, weight.dtype, weight.device)
    cached = getattr(owner, slot, None)
    if cached is None or cached[0] != key:
        cached = (key, make(weight.detach()))
        setattr(owner, slot, cached)
    return cached[1]


def _onednn_packing() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def packed_weight(weight: torch.Tensor, owner: object, slot: str = "_packed") -> torch.Tensor:
    """An fp32 copy of `weight` pre-packed in oneDNN's blocked layout, cached on `owner` (inference only).

    For the M = 2..~100 row GEMMs of batched decode, MKL's plain sgemm re-reads the weight almost once
    per row (8 rows of a 2048x10944 weight: ~5x the one-row time); the packed weight keeps the rows'
    work in cache and runs 1.6-3.3x faster there (benchmarks/throughput.py --probe-only), and no
    slower for prefill-sized M. Kept fresh as `_derived` keeps every cached copy.
    """
    return _derived(weight, owner, slot,
                    lambda w: torch.ops.mkldnn._reorder_linear_weight(w.float().contiguous(), 16))


def upcast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype a matmul on x would run in (autocast's if active), or None when that is native here."""
    dt = torch.get_autocast_dtype("cpu") if x.device.type == "cpu" and torch.is_autocast_enabled("cpu") else x.dtype
    return None if native_low_precision(x.device, dt) else dt


def bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """torch.bmm under the same CPU low-precision policy as `linear`."""
    out = upcast_dtype(a)
    if out is None:
        return torch.bmm(a, b)
    with torch.autocast("cpu", enabled=False):
        return torch.bmm(a.float(), b.float()).to(out)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           owner: object | None = None, slot: str = "_fp32") -> torch.Tensor:
    """F.linear that runs low-precision matmuls in fp32 where the CPU has no native support for them.

    Under CPU autocast the result has autocast's dtype, as F.linear's would.
    """
    if x.numel() == x.shape[-1] and x.dtype == weight.dtype and not torch.is_grad_enabled():
        # one row (decode): a low-precision GEMV is not on the slow path and reads half the bytes
        return F.linear(x, weight, bias)
    autocast = x.device.type == "cpu" and torch.is_autocast_enabled("cpu")
    if (owner is not None and not autocast and not torch.is_grad_enabled() and x.dtype == weight.dtype
            and not native_low_precision(weight.device, weight.dtype) and _onednn_packing()
            and not torch.compiler.is_compiling()):  # inductor cannot take an opaque packed weight as input
        # inference on a CPU without native bf16: fp32 GEMM on a cached, pre-packed fp32 copy
        pw = packed_weight(weight, owner, slot + "_packed")
        b = None if bias is None else bias.float()
        return torch.ops.mkldnn._linear_pointwise(x.float().contiguous(), pw, b, "none", [], "").to(x.dtype)
    w = compute_weight(weight, owner, slot)
    out_dtype = x.dtype
    if autocast:
        out_dtype = torch.get_autocast_dtype("cpu")
        if native_low_precision(x.device, out_dtype):
            return F.linear(x, weight, bias)
    if w is weight and not autocast:
        return F.linear(x, weight, bias)
    with torch.autocast("cpu", enabled=False):
        y = F.linear(x.float(), w.float(), None if bias is None else bias.float())
    return y.to(out_dtype)


class Linear(nn.Linear):
    """nn.Linear with the CPU low-precision policy of `linear` (same parameters, same state-dict keys).

    The derived weight copies it caches for inference (`_fp32`, `_fp32_packed`) are dropped when the
    module is moved or cast, and never pickled or deep-copied (a packed oneDNN tensor has no storage).
    """

    CACHES = ("_fp32", "_fp32_packed")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, owner=self)

    def drop_caches(self) -> None:
        for name in self.CACHES:
            self.__dict__.pop(name, None)

    def _apply(self, fn, recurse=True):  # .to() / .float() / .cuda(): the cached copies are stale
        self.drop_caches()
        return super()._apply(fn, recurse)

    def __getstate__(self) -> dict:
        return {k: v for k, v in super().__getstate__().items() if k not in self.CACHES}


class RMSNorm(nn.Module):
    """x / rms(x) · w, normalised in fp32 and cast back before the weight (as the checkpoints expect)."""

    def __init__(self, dim: int, eps: float = 1e-6, device: torch.device | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) · up(x)). Used dense and as the shared experts."""

    def __init__(self, dim: int, hidden: int, device: torch.device | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        kw = dict(bias=False, device=device, dtype=dtype)
        self.gate_proj = Linear(dim, hidden, **kw)
        self.up_proj = Linear(dim, hidden, **kw)
        self.down_proj = Linear(hidden, dim, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
