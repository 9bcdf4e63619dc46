"""Quantised replacements for `nn.Linear` and the stacked MoE `Experts`, swapped in by `quant.swap`.

Shapes: M rows, N out_features, K in_features, E experts, I expert hidden size, D hidden size,
P (token, expert) picks. Activations are computed in the module's `dtype` (the model's) and returned
in the caller's dtype, for any number of rows (prefill or one-row decode).

Every module counts the weight bytes its forward reads (`bytes_read`): the routed experts read
only the experts that some row picked, which is how `benchmarks/full_model.py` shows that one decode
token reads the active parameters, not all of them.
"""

from __future__ import annotations

import itertools
import weakref

import torch
from torch import nn

from dsv2.model.layers import silu_mul
from dsv2.quant.kernels import (
    Int4Weight,
    QuantError,
    check_group_size,
    dequantize_int8,
    int4_mm_op,
    int8_mm,
    int8_mm_op,
    quantize_int8,
)

WEIGHT_FORMATS = ("int8", "int4")


def check_format(weights: str) -> str:
    if weights not in WEIGHT_FORMATS:
        raise QuantError(f"weights must be one of {WEIGHT_FORMATS} (or bf16 / None for unquantised), got {weights!r}")
    return weights


class _Quantised(nn.Module):
    """Buffers of one (N,K) weight, or E stacked ones, in int8 or int4; `prefix` names them."""

    def __init__(self, weights: str, group_size: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.weights, self.group_size, self._dtype = check_format(weights), group_size, dtype
        if weights == "int4":
            check_group_size(group_size)
        self.bytes_read = 0
        # opt-in: activations rounded to int8 per 32 values before each product (quant.swap.set_int8_activations)
        self.int8_activations = False

    @property
    def dtype(self) -> torch.dtype:
        """The activation dtype: that of the scales (it follows `.to(dtype)` of the module)."""
        for name, buf in self._buffers.items():  # not named_buffers(): this runs on every forward
            if buf is not None and (name.endswith("scales") or name.endswith("scales_and_zeros")):
                return buf.dtype
        return self._dtype

    def _count(self, *ts: torch.Tensor) -> None:
        # straight into __dict__: nn.Module.__setattr__ costs ~10 us, per matmul of a decode step
        self.__dict__["bytes_read"] += sum(t.nbytes for t in ts)

    def _empty(self, prefix: str, lead: tuple[int, ...], n: int, k: int, device: torch.device | None) -> None:
        """Register uninitialised buffers for `lead` stacked (n,k) weights (meta on a meta device)."""
        if self.weights == "int8":
            self.register_buffer(f"{prefix}qweight", torch.empty(*lead, n, k, dtype=torch.int8, device=device))
            self.register_buffer(f"{prefix}scales", torch.empty(*lead, n, dtype=self._dtype, device=device))
        else:
            np_, kp = Int4Weight.padded_shape(n, k, self.group_size)
            self.register_buffer(f"{prefix}qweight", torch.empty(*lead, np_, kp // 2, dtype=torch.uint8, device=device))
            self.register_buffer(f"{prefix}scales_and_zeros",
                                 torch.empty(*lead, kp // self.group_size, np_, 2, dtype=self._dtype, device=device))

    def _set(self, prefix: str, index: tuple[int, ...], w: torch.Tensor) -> None:
        """Quantise the float (n,k) weight `w` into slot `index` of the `prefix` buffers."""
        q = getattr(self, f"{prefix}qweight")
        if self.weights == "int8":
            qw, s = quantize_int8(w)
            q[index].copy_(qw)
            getattr(self, f"{prefix}scales")[index].copy_(s)
        else:
            packed = Int4Weight.quantize(w, self.group_size, self.dtype)
            q[index].copy_(packed.packed)
            getattr(self, f"{prefix}scales_and_zeros")[index].copy_(packed.scales_and_zeros)

    def _mm(self, prefix: str, index: tuple[int, ...], x: torch.Tensor, n: int, k: int) -> torch.Tensor:
        """x (M,k) in self.dtype times the weight in slot `index` -> (M,n)."""
        q = _slot(getattr(self, f"{prefix}qweight"), index)
        compiling = torch.compiler.is_compiling()  # then the products are opaque ops, and nothing is counted
        act8 = self.int8_activations
        if self.weights == "int8":
            s = _slot(getattr(self, f"{prefix}scales"), index)
            if compiling:
                return int8_mm_op(x, q, s, act8)
            self._count(q, s)
            return int8_mm(x, q, s, act8)
        sz = _slot(getattr(self, f"{prefix}scales_and_zeros"), index)
        if x.device.type != "cpu":
            raise QuantError(f"int4 weights run on the CPU kernel only; got activations on {x.device}")
        if compiling:
            return int4_mm_op(x, q, sz, n, k, self.group_size, act8)
        self._count(q, sz)
        return Int4Weight(q, sz, n, k, self.group_size).mm(x, act8)

    def _dequantised(self, prefix: str, index: tuple[int, ...], n: int, k: int) -> torch.Tensor:
        q = getattr(self, f"{prefix}qweight")[index]
        if self.weights == "int8":
            return dequantize_int8(q, getattr(self, f"{prefix}scales")[index], self.dtype)
        sz = getattr(self, f"{prefix}scales_and_zeros")[index]
        return Int4Weight(q, sz, n, k, self.group_size).dequantize(self.dtype)


def _slot(t: torch.Tensor, index: tuple[int, ...]) -> torch.Tensor:
    """t[index]; t itself for the empty index (a Linear's one slot) without an alias op a call."""
    return t[index] if index else t


class QuantLinear(_Quantised):
    """y = x Wᵀ (+ b) with W stored in int8 or int4; drop-in for an `nn.Linear` at inference."""

    def __init__(self, in_features: int, out_features: int, weights: str, group_size: int = 128,
                 dtype: torch.dtype = torch.bfloat16, bias: bool = False, device: torch.device | None = None) -> None:
        super().__init__(weights, group_size, dtype)
        self.in_features, self.out_features = in_features, out_features
        self._empty("", (), out_features, in_features, device)
        self.bias: torch.Tensor | None
        self.register_buffer("bias", torch.empty(out_features, dtype=dtype, device=device) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, weights: str, group_size: int = 128,
                    dtype: torch.dtype | None = None) -> QuantLinear:
        return cls.from_weight(linear.weight.detach(), None if linear.bias is None else linear.bias.detach(),
                               weights, group_size, dtype or linear.weight.dtype)

    @classmethod
    def from_weight(cls, w: torch.Tensor, bias: torch.Tensor | None, weights: str, group_size: int = 128,
                    dtype: torch.dtype = torch.bfloat16) -> QuantLinear:
        """Quantise a float (N,K) weight (and keep the bias in `dtype`)."""
        n, k = w.shape
        m = cls(k, n, weights, group_size, dtype, bias=bias is not None, device=w.device)
        m.set_weight(w, bias)
        return m

    def set_weight(self, w: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        if tuple(w.shape) != (self.out_features, self.in_features):
            raise QuantError(f"weight of shape {tuple(w.shape)} given to a QuantLinear of "
                             f"({self.out_features}, {self.in_features})")
        self._set("", (), w)
        if bias is not None:
            self.bias.copy_(bias)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantised (N,K) weight in `dtype`: a fresh tensor each time, for code that reads `.weight`."""
        return self._dequantised("", (), self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)  # (M,K)
        y = self._mm("", (), x2 if x2.dtype == self.dtype else x2.to(self.dtype), self.out_features, self.in_features)
        if self.bias is not None:
            y = y + self.bias
        y = y.reshape(*lead, self.out_features)  # (...,N)
        return y if y.dtype == x.dtype else y.to(x.dtype)

    def extra_repr(self) -> str:
        g = f", group_size={self.group_size}" if self.weights == "int4" else ""
        a = ", int8 activations" if self.int8_activations else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.weights}{g}, {self.dtype}{a}"


class QuantExperts(_Quantised):
    """E SwiGLU experts in int8/int4: gate and up fused as one (2I, D) weight per expert, down (D, I).

    Same call as `dsv2.model.moe.Experts`: forward(x (N,D), idx (N,K), weight (N,K), keep (N,K) | None)
    = Σ_k weight · expert_idx(x). Only the experts that some row picked are read.
    """

    def __init__(self, n_experts: int, dim: int, hidden: int, weights: str, group_size: int = 128,
                 dtype: torch.dtype = torch.bfloat16, device: torch.device | None = None) -> None:
        super().__init__(weights, group_size, dtype)
        self.n_experts, self.dim, self.hidden = n_experts, dim, hidden
        self._empty("gate_up_", (n_experts,), 2 * hidden, dim, device)
        self._empty("down_", (n_experts,), dim, hidden, device)
        self._register()

    def _register(self) -> None:
        """A handle of its own, by which a compiled graph's dsv2::quant_experts op finds this module."""
        self._handle = next(_HANDLE_IDS)
        _BY_HANDLE[self._handle] = self

    def __setstate__(self, state: dict) -> None:  # deepcopy / unpickle: a new module, a new handle
        super().__setstate__(state)
        self._register()

    @classmethod
    def from_experts(cls, experts: nn.Module, weights: str, group_size: int = 128,
                     dtype: torch.dtype | None = None) -> QuantExperts:
        """Quantise a stacked `Experts` (gate_proj/up_proj (E,I,D), down_proj (E,D,I))."""
        e, i, d = experts.gate_proj.shape
        m = cls(e, d, i, weights, group_size, dtype or experts.gate_proj.dtype, device=experts.gate_proj.device)
        for j in range(e):
            m.set_expert(j, experts.gate_proj[j].detach(), experts.up_proj[j].detach(), experts.down_proj[j].detach())
        return m

    def set_expert(self, e: int, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> None:
        """Quantise expert e from its float gate (I,D), up (I,D) and down (D,I) weights."""
        want = {"gate": (self.hidden, self.dim), "up": (self.hidden, self.dim), "down": (self.dim, self.hidden)}
        for name, t in (("gate", gate), ("up", up), ("down", down)):
            if tuple(t.shape) != want[name]:
                raise QuantError(f"expert {e} {name}_proj has shape {tuple(t.shape)}, expected {want[name]}")
        self._set("gate_up_", (e,), torch.cat((gate, up)))  # (2I,D)
        self._set("down_", (e,), down)

    def forward(self, x: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor,
                keep: torch.Tensor | None = None) -> torch.Tensor:
        if torch.compiler.is_compiling():  # routing reads the picks on the host: one opaque op in a graph
            return quant_experts_op(x, idx, weight, keep, self._handle)
        n, k = idx.shape
        if n == 1 and keep is None:  # one-token decode: no sort / gather / scatter, just the K experts
            return self._one_token(x, idx[0].tolist(), weight[0])
        flat = idx.flatten()  # (N*K,)
        order = torch.argsort(flat, stable=True)
        if keep is not None:
            order = order[keep.flatten()[order]]
        counts = torch.bincount(flat[order], minlength=self.n_experts).tolist()
        token = order // k  # (P,) token of each sorted pick
        xs = x[token].to(self.dtype)  # (P,D)
        outs = []
        for e, xe in enumerate(xs.split(counts)):
            if not counts[e]:
                continue
            outs.append(self._expert(e, xe))  # (c,D)
        if not outs:
            return torch.zeros_like(x)
        ys = torch.cat(outs).float() * weight.flatten()[order, None].float()  # (P,D)
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device).index_add_(0, token, ys)
        return out.to(x.dtype)

    def _one_token(self, x: torch.Tensor, experts: list[int], weight: torch.Tensor) -> torch.Tensor:
        """x (1,D), K expert ids, weight (K,) -> (1,D): Σ_k weight_k · expert_k(x), summed in fp32."""
        x1 = x.to(self.dtype)
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        for e, w in zip(experts, weight.float()):
            out += w * self._expert(e, x1).float()
        return out.to(x.dtype)

    def _expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e's SwiGLU on its tokens x (c,D) in self.dtype -> (c,D): one product for gate and up."""
        gu = self._mm("gate_up_", (e,), x, 2 * self.hidden, self.dim)  # (c,2I)
        return self._mm("down_", (e,), silu_mul(gu[:, : self.hidden], gu[:, self.hidden:]), self.dim, self.hidden)

    def dequantised(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """gate (E,I,D), up (E,I,D), down (E,D,I) in `dtype`, for tests and references."""
        es = range(self.n_experts)
        gu = torch.stack([self._dequantised("gate_up_", (e,), 2 * self.hidden, self.dim) for e in es])  # (E,2I,D)
        down = torch.stack([self._dequantised("down_", (e,), self.dim, self.hidden) for e in es])  # (E,D,I)
        return gu[:, : self.hidden], gu[:, self.hidden:], down

    def extra_repr(self) -> str:
        g = f", group_size={self.group_size}" if self.weights == "int4" else ""
        return f"experts={self.n_experts}, dim={self.dim}, hidden={self.hidden}, {self.weights}{g}, {self.dtype}"


# ---- under torch.compile ----------------------------------------------------------------------------
# QuantExperts.forward as an opaque custom op (dsv2::quant_experts): its routing turns the picks into Python
# lists (which experts to read, how many rows each), which a graph cannot trace. The op names its module
# by a handle, so the graph calls back into the eager forward, kernels and byte counting included.
_HANDLE_IDS = itertools.count()
_BY_HANDLE: weakref.WeakValueDictionary[int, QuantExperts] = weakref.WeakValueDictionary()


@torch.library.custom_op("dsv2::quant_experts", mutates_args=())
def quant_experts_op(x: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor, keep: torch.Tensor | None,
                     handle: int) -> torch.Tensor:
    module = _BY_HANDLE.get(handle)
    if module is None:
        raise QuantError(f"dsv2::quant_experts: the QuantExperts module of handle {handle} no longer exists")
    return module.forward(x, idx, weight, keep).contiguous()


@quant_experts_op.register_fake
def _(x: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor, keep: torch.Tensor | None,
      handle: int) -> torch.Tensor:
    return torch.empty_like(x, memory_format=torch.contiguous_format)
