"""The CPU low-precision policy, applied to a built model from outside by a module-swap pass.

On CPUs without native bf16/fp16 matrix units (no AVX512-BF16 / AMX), PyTorch's bf16 GEMM falls back
to a path 30-50x slower than fp32. `prepare(model)` swaps the model's `nn.Linear` and routed `Experts`
for subclasses that run such matmuls in fp32 (weights stay stored as they are, results come back in
the input's dtype), so `dsv2.model` itself stays plain PyTorch. Where the CPU has native bf16, or the
model runs on another device, the swapped modules do exactly what the plain ones do. The same pass makes
each RMSNorm, MLA's RoPE and the MLP's SwiGLU gating one C call in CPU inference (`CpuRMSNorm`, `CpuMLA.rope`,
`CpuMLP.gating`: the same fp32 arithmetic in place of 2-15 PyTorch ops each, whose dispatch was ~0.3 ms of a
small model's decode step).

    model = prepare(DeepseekV2(cfg, dtype=torch.bfloat16))   # in place; returns the model

Shapes: N rows, D in features, O out features, E experts, I expert hidden size.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from dsv2.model.attention import MLA
from dsv2.model.layers import MLP, RMSNorm, derived, silu_mul
from dsv2.model.moe import Experts
from dsv2.model.rope import apply_rope
from dsv2.quant import native

_LOW = (torch.bfloat16, torch.float16)


def _mkldnn_native(dtype: torch.dtype) -> bool:
    query = torch.ops.mkldnn._is_mkldnn_bf16_supported if dtype == torch.bfloat16 else \
        torch.ops.mkldnn._is_mkldnn_fp16_supported
    return bool(query())


# asked on every matmul of a step, and while Dynamo traces one (it cannot trace the mkldnn query, but reads a
# dict of constants): the query once per dtype, at import. (Not `torch.compiler.assume_constant_result`: that
# decorator imports Dynamo, ~70 MiB of resident memory and ~1 s of start-up in every process that never compiles.)
_NATIVE: dict[torch.dtype, bool] = {dt: _mkldnn_native(dt) for dt in _LOW}


def native_low_precision(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether matmuls in `dtype` run natively fast on `device` (always, off the CPU and for fp32)."""
    return dtype not in _LOW or device.type != "cpu" or _NATIVE[dtype]


def upcast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype a matmul on x would run in (autocast's if active), or None when that is native here."""
    dt = torch.get_autocast_dtype("cpu") if x.device.type == "cpu" and torch.is_autocast_enabled("cpu") else x.dtype
    return None if native_low_precision(x.device, dt) else dt


GEMV_ROWS = 4  # up to this many rows: dsv2's C GEMV (1.4-1.9x PyTorch's bf16 GEMM at 2-4 rows, 2 Zen 4 cores)
# where bf16 is not native (AVX2): up to this many rows the C GEMV on the bf16 weight instead of the fp32 GEMM
# on a packed fp32 copy (2.4-3.3x at 2-4 rows, 1.4-1.8x at 8, 1.1-1.3x at 16; 2 Zen 4 cores capped at AVX2;
# since then 9-16 rows run x-stationary tiles on AVX2 builds: 1.11-1.46x the packed copy, 1.20-1.36x dsv2's C
# GEMM at 16 rows, `benchmarks/kernels.py --only emulated`). At 17-32 rows
# passes of those tiles ran 0.95-1.3x dsv2's C GEMM, which takes them (the next step for batched decode)
UPCAST_GEMV_ROWS = 16


def _rows(x: torch.Tensor) -> int:
    return x.numel() // x.shape[-1] if x.dim() and x.shape[-1] else 0


def _gemv_library(x: torch.Tensor, w: torch.Tensor, rows: int, max_rows: int = GEMV_ROWS) -> ctypes.CDLL | None:
    """dsv2's C kernel library when `rows` rows of x (bf16 or fp32) times a bf16 weight w are a GEMV it takes
    (CPU, inference, eager, at most max_rows rows); else None."""
    return _gemv_library_for(x.dtype, x.device, w, rows, max_rows)


def _gemv_library_for(x_dtype: torch.dtype, device: torch.device, w: torch.Tensor, rows: int,
                      max_rows: int) -> ctypes.CDLL | None:
    """`_gemv_library` for activations of this dtype and device that do not exist yet."""
    if (w.dtype == torch.bfloat16 and x_dtype in (torch.bfloat16, torch.float32) and 0 < rows <= max_rows
            and device.type == "cpu" and not torch.is_grad_enabled() and not torch.compiler.is_compiling()):
        return native.library()
    return None


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None,
           max_rows: int = GEMV_ROWS) -> torch.Tensor:
    """F.linear, except a few rows (<= max_rows: decode) times a bf16 weight on the CPU in inference:
    dsv2's C GEMV (`dsv2.quant.native`), which reads the weight at memory speed where PyTorch's bf16 GEMV
    reads it at a fraction of that (one row: 4.3 vs ~20 GB/s on one Zen 4 core, no AMX). Same result up to
    the order of the fp32 sums; F.linear wherever the C library is missing or off."""
    lib = _gemv_library(x, w, _rows(x), max_rows)
    return F.linear(x, w, b) if lib is None else _gemv(lib, x, w, b)


def _gemv(lib: ctypes.CDLL, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """x @ wᵀ (+ b) by dsv2's C GEMV, in x's dtype and shape."""
    y = native.bf16_gemv(lib, x.reshape(-1, x.shape[-1]), w).view(*x.shape[:-1], w.shape[0])
    return (y if b is None else y + b.float()).to(x.dtype)


def _gemm_library(w: torch.Tensor) -> ctypes.CDLL | None:
    """dsv2's C kernel library when its GEMM on w as stored (bf16) is the one to use: inference and eager on the
    CPU, a build whose GEMM has its vector path on a CPU without AVX512F (`native.gemm_kind`); else None."""
    return None if torch.compiler.is_compiling() else _gemm_library_traced(w)


def _gemm_library_traced(w: torch.Tensor) -> ctypes.CDLL | None:
    """`_gemm_library`, also while torch.compile traces (where the products go through `emulated_linear_op`)."""
    if w.dtype == torch.bfloat16 and w.device.type == "cpu" and not torch.is_grad_enabled():
        lib = native.library()
        if lib is not None and native.gemm_kind(lib) == 2:
            return lib
    return None


def upcast_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """x @ wᵀ (+ b) in fp32 for a low-precision w whose GEMMs are emulated here: dsv2's C GEMM on w as stored
    where it is the one to use (`_gemm_library`: fp32 products of the bf16 weight, no copy of it), else F.linear
    on fp32 copies made for the call. Either way the exact fp32 products, summed in fp32."""
    lib = _gemm_library(w)
    if lib is None:
        with torch.autocast("cpu", enabled=False):
            return F.linear(x.float(), w.float(), None if b is None else b.float())
    return _c_gemm(lib, x, w, b)


def _c_gemm(lib: ctypes.CDLL, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """x @ wᵀ (+ b) by dsv2's C GEMM, fp32, in x's shape."""
    y = native.gemm(lib, x.reshape(-1, x.shape[-1]), w).view(*x.shape[:-1], w.shape[0])
    return y if b is None else y + b.float()


def bmm_nt(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ bᵀ per batch, (B,M,K) x (B,N,K) -> (B,M,N) in a's dtype, except a few rows times a bf16 b on the CPU
    in inference: dsv2's batched C GEMV (MLA's per-head W_UK / W_UV products of a decode step: PyTorch's bf16
    bmm reads those weights at ~4.5 GB/s here), which also takes fp32 rows against the bf16 b (up to
    UPCAST_GEMV_ROWS of them). torch.bmm wherever the C library is missing or off (b cast to a's dtype)."""
    mixed = a.dtype != b.dtype
    lib = _gemv_library(a, b, a.shape[1], UPCAST_GEMV_ROWS if mixed else GEMV_ROWS) if b.stride(-1) == 1 else None
    if lib is not None:
        return native.bf16_bgemv(lib, a, b).to(a.dtype)
    return torch.bmm(a, b.transpose(1, 2).to(a.dtype))


def _emulated_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None,
                     gemm: bool = True) -> torch.Tensor | None:
    """CpuLinear's inference product of x (x.dtype == w.dtype) where bf16 is emulated, by dsv2's C kernels on
    the weight as stored: a few rows through the C GEMV, more through the C GEMM (unless `gemm` is off: under
    autocast); None where neither is there."""
    lib = _gemv_library(x, w, _rows(x), UPCAST_GEMV_ROWS)
    if lib is not None:
        return _gemv(lib, x, w, b)
    lib = _gemm_library(w) if gemm else None
    return None if lib is None else _c_gemm(lib, x, w, b).to(x.dtype)


# Under torch.compile (the engine's compiled decode step) the same products as one opaque op: tracing would stop
# at the ctypes calls, and inductor would freeze an fp32 copy of every weight into the graph (twice the memory of
# the bf16 model) for its own GEMMs. The op runs eagerly, so its routing is `_emulated_linear`'s.
@torch.library.custom_op("dsv2::emulated_linear", mutates_args=())
def emulated_linear_op(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    y = _emulated_linear(x, w, b)
    if y is None:  # (the library went away between tracing and the call: fp32 products all the same)
        y = upcast_linear(x, w, b).to(x.dtype)
    return y.contiguous()


@emulated_linear_op.register_fake
def _(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], w.shape[0])


def _onednn_packing() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class CpuLinear(nn.Linear):
    """nn.Linear (same parameters, same state-dict keys) whose low-precision matmuls run in fp32 where
    the CPU has no native support for them. Where it has (AVX512_BF16, AMX), `linear`: up to GEMV_ROWS
    rows through dsv2's C GEMV, more through PyTorch's bf16 GEMM. Where it has not:

    - one row in inference (decode): the low-precision GEMV is not on the slow path and reads half the
      bytes, so it runs as stored (bf16: dsv2's C GEMV, `linear`; also where bf16 GEMMs are native);
      up to UPCAST_GEMV_ROWS rows too, where the C GEMV is there;
    - more rows in inference: dsv2's C GEMM on the bf16 weight as stored (`upcast_linear`: fp32 FMAs, the
      weight packed a cache-sized block at a time; as fast as oneDNN on an fp32 copy, without the copy's
      memory), where the C library has it (AVX2 builds); else fp32 GEMM on a cached fp32 copy pre-packed in
      oneDNN's blocked layout (for the 2..~100-row GEMMs of batched decode MKL's plain sgemm re-reads the
      weight almost once per row; the packed weight runs 1.6-3.3x faster there and no slower at prefill sizes);
    - training / autocast: upcast on the fly, so gradients reach the stored weight.
    The cached copy is dropped when the module is moved or cast, and never pickled or deep-copied
    (a packed oneDNN tensor has no storage).
    """

    CACHES = ("_packed",)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.weight, self.bias
        out = upcast_dtype(x)
        if out is None and native_low_precision(w.device, w.dtype):
            return linear(x, w, b)
        inference = not torch.is_grad_enabled()
        autocast = x.device.type == "cpu" and torch.is_autocast_enabled("cpu")
        if inference and x.dtype == w.dtype:
            if not autocast and torch.compiler.is_compiling() and _gemm_library_traced(w) is not None:
                return emulated_linear_op(x, w, b)  # the C kernels below, as one opaque op of the graph
            # a few rows through the C GEMV, more through the C GEMM (`upcast_linear`), on the weight as stored
            y = _emulated_linear(x, w, b, gemm=not autocast)
            if y is not None:
                return y
            if x.numel() == x.shape[-1]:  # one row: as stored
                return F.linear(x, w, b)
        if (inference and not autocast and x.dtype == w.dtype and _onednn_packing()
                and not torch.compiler.is_compiling()):  # inductor cannot take an opaque packed weight
            pw = derived(w, self, "_packed",
                         lambda t: torch.ops.mkldnn._reorder_linear_weight(t.float().contiguous(), 16))
            bf = None if b is None else b.float()
            y = torch.ops.mkldnn._linear_pointwise(x.float().contiguous(), pw, bf, "none", [], "")
            return y.to(x.dtype)
        out = out or x.dtype
        with torch.autocast("cpu", enabled=False):
            y = F.linear(x.float(), w.float(), None if b is None else b.float())
        return y.to(out)

    def _apply(self, fn, recurse=True):  # .to() / .float() / .cuda(): the cached copy is stale
        for name in self.CACHES:
            self.__dict__.pop(name, None)
        return super()._apply(fn, recurse)

    def __getstate__(self) -> dict:
        return {k: v for k, v in super().__getstate__().items() if k not in self.CACHES}


class CpuExperts(Experts):
    """Routed experts whose low-precision matmuls run in fp32 where the CPU has no native support.

    In inference no fp32 copy of the experts is kept (it would double the memory of a MoE model): an
    expert with few rows runs bf16 GEMVs on the stored weights (PyTorch's bf16 matmul costs about one
    weight pass per row on AVX2), one with more rows `upcast_linear` (dsv2's C GEMM on the weights as stored;
    without it, fp32 copies made on the fly: ~3-4 passes)."""

    GEMV_ROWS = 4
    linear = staticmethod(linear)  # one-token matmuls: bf16 weights through dsv2's C GEMV

    def forward(self, x: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor,
                keep: torch.Tensor | None = None) -> torch.Tensor:
        out = upcast_dtype(x)
        if out is None:
            return super().forward(x, idx, weight, keep)  # one token through `linear`: bf16 GEMVs in C
        if not torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu") and x.dtype == self.gate_proj.dtype:
            gu = self.fused_gate_up()
            if x.shape[0] == 1 and keep is None:  # one token: GEMVs as stored (<= GEMV_ROWS rows each)
                return self.one_token(x, idx, weight, self.gate_proj, self.up_proj, self.down_proj,
                                      out_dtype=torch.float32, gu=gu, linear=self.linear).to(out)
            token, order, counts = self.plan(idx, keep)
            y = self.dispatch(x, token, order, counts, weight, self.gate_proj, self.up_proj, self.down_proj,
                              upcast_rows=self.GEMV_ROWS, gu=gu, upcast_linear=upcast_linear)
            return y.to(out)
        token, order, counts = self.plan(idx, keep)
        with torch.autocast("cpu", enabled=False):
            y = self.dispatch(x.float(), token, order, counts, weight,
                              self.gate_proj.float(), self.up_proj.float(), self.down_proj.float())
        return y.to(out)


def _one_call_library(x: torch.Tensor) -> ctypes.CDLL | None:
    """dsv2's C library when x's elementwise work (RMSNorm, RoPE, SwiGLU's gating) may run there in one call: CPU
    inference, eager, no autocast, fp32 / bf16."""
    if (x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16) and not torch.is_grad_enabled()
            and not torch.compiler.is_compiling() and not torch.is_autocast_enabled("cpu")):
        return native.library()
    return None


def _in_one_call(kernel: Callable[..., torch.Tensor | None], model_fn: Callable[..., torch.Tensor],
                 x: torch.Tensor, *args: torch.Tensor) -> torch.Tensor:
    """model_fn(x, *args) as `kernel(lib, x, *args)` computes it in one C call where it can run there
    (`_one_call_library`), else (or where the kernel returns None: shapes it does not take) the model's own."""
    lib = _one_call_library(x)
    y = kernel(lib, x, *args) if lib is not None else None
    return y if y is not None else model_fn(x, *args)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """`apply_rope`, in one C call where it can run there (the same fp32 arithmetic and rounding)."""
    return _in_one_call(native.rope, apply_rope, x, cos, sin)


def gating(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """`silu_mul` (SwiGLU's silu(g) · u), in one C call where it can run there: PyTorch's silu alone ran
    ~0.2-0.6 ms on a 32-token prompt's (32, 10,944) bf16 gate on 2 AVX2 cores."""
    return _in_one_call(native.silu_mul, silu_mul, g, u)


class CpuMLP(MLP):
    """The SwiGLU MLP whose gating runs in one C call in CPU inference (`gating`)."""

    gating = staticmethod(gating)


class CpuRMSNorm(RMSNorm):
    """RMSNorm whose inference on the CPU is one C call (`native.rms_norm`: the same fp32 normalisation, the same
    casts) instead of ~8 PyTorch ops: ~25 us of dispatch a call, 7 calls in a decode step of a 2-layer model."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lib = _one_call_library(x)
        if lib is not None and self.weight.dtype in (torch.float32, torch.bfloat16):
            return native.rms_norm(lib, x, self.weight, self.eps)
        return super().forward(x)


class CpuMLA(MLA):
    """MLA whose absorbed per-head products (W_UK / W_UV, a decode step's few rows) run through `bmm_nt`.
    Where bf16 is emulated the engine computes decode attention in fp32: up to UPCAST_GEMV_ROWS rows of it
    then meet the bf16 weights as stored in the C GEMV (exact fp32 products), not a cached fp32 copy read at
    twice the bytes through torch.bmm."""

    bmm_nt = staticmethod(bmm_nt)
    rope = staticmethod(rope)

    def absorbed_operand_dtype(self, dtype: torch.dtype, rows: int) -> torch.dtype:
        w = self.kv_b_proj.weight
        if dtype == torch.float32 and _gemv_library_for(dtype, w.device, w, rows, UPCAST_GEMV_ROWS):
            return w.dtype
        return dtype


_SWAPS: dict[type, type] = {nn.Linear: CpuLinear, Experts: CpuExperts, MLA: CpuMLA, RMSNorm: CpuRMSNorm,
                           MLP: CpuMLP}


def prepare(model: nn.Module, device: torch.device | str | None = None,
            autocast: torch.dtype | None = None) -> nn.Module:
    """Apply the CPU low-precision policy to `model` in place (and return it).

    Swaps the class of every plain `nn.Linear`, `Experts`, `MLA`, `RMSNorm` and `MLP` (parameters, hooks and
    state-dict keys are untouched, so optimizers, checkpoints and parallel wrappers see the same module) when the
    model will run matmuls in a low-precision dtype on the CPU: the dtype of its floating parameters, or
    `autocast` (the dtype a training loop autocasts to). Where that dtype is native, the swapped modules differ
    from the plain ones only in few-row bf16 GEMVs (dsv2's C GEMV: `linear`, `bmm_nt`) and in CPU inference's
    one-call norms, RoPE and gating. Does nothing for an fp32 model without autocast or on another device, so
    such models keep plain modules and pay no per-call policy
    check. Quantised or otherwise specialised modules are left alone. Idempotent.
    """
    p = next(model.parameters(), None)
    dev = torch.device(device) if device is not None else (p.device if p is not None else torch.device("cpu"))
    dtypes = {t.dtype for t in model.parameters() if t.is_floating_point()} | ({autocast} if autocast else set())
    if dev.type != "cpu" or not dtypes & set(_LOW):
        return model
    for m in model.modules():
        new = _SWAPS.get(type(m))
        if new is not None:
            m.__class__ = new
    return model
