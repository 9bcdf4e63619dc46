"""Weight-only int8 / int4 formats and the PyTorch kernels that multiply by them.

Shapes: M activation rows, N output features, K input features, g group size (int4).

int8: symmetric per output channel. scale_n = max|w_n| / 127, q = round(w / scale) in [-127, 127];
  w ≈ q · scale. Kernel: `aten._weight_int8pack_mm(x (M,K), q (N,K) int8, scale (N,))`, all in the
  activation dtype (CPU and CUDA).
int4: asymmetric per group of g input features. scale = (max - min) / 15, q = round((w - min) / scale)
  in [0, 15], stored as scales_and_zeros (K/g, N, 2) = [scale, zero] with zero = min + 8·scale, so that
  w ≈ (q - 8) · scale + zero (the convention of `aten._weight_int4pack_mm_for_cpu`, checked against a
  float64 reference in tests/quant). q is packed by `pack_int4` to (N, K/2) uint8 (aten's AVX512 layout,
  the same on every machine); the kernels want N % 16 == 0 and g in {32, 64, 128, 256}: `Int4Weight` pads
  N with zero rows and K (when g does not divide it, e.g. V2-Lite's dense 10944) by repeating the
  last column, and pads x with zeros, so padding never changes a result.
int8 activations (opt-in, `int8_act=True`): x is first rounded per 32 columns to int8 codes times one fp32 scale
  d = amax/127 (`round_activations_q8`, llama.cpp's Q8_0 rounding), and the C kernels multiply the codes with
  integer dot products (no weight conversion: ~2-3x the exact kernels' speed on AVX2). The result is the exact
  product of the rounded x (int4's zero-point term uses the exact x); it is not the exact product of x.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dsv2.quant import native

GROUP_SIZES = (32, 64, 128, 256)
_ROWS = 4096  # rows quantised at a time: bounds the fp32 temporaries for a (102400, 2048) lm_head
# Above this many activation rows a weight is dequantised a panel at a time and multiplied by the dense
# GEMM: the one-row kernels cost about one pass over the weight per row (aten's per 1-4 rows, dsv2's C
# kernel per 4), the GEMM a fraction of one. With the C library the panels are dequantised in C (int8:
# ~8 bytes/ns, int4: ~3 weights/ns per core); without it in PyTorch, whole, which pays off later. Where the
# GEMM runs in fp32 on a CPU without AVX512F, the rows go to dsv2's C GEMM on the weight as stored instead
# (`native.gemm` / `int4_gemm`: int8 codes as they are, int4 dequantised a cache-sized block at a time).
INT8_DEQUANT_ROWS = 16
# bf16 activations on CPUs with AVX512_BF16: int8 weights by bf16 dot products on their nibbles, for 1-2 rows
# whose x stays in L1 (1.2-1.6x the fp32 GEMV on one Zen 4 core; slower beyond these bounds)
INT8_BF16_ROWS, INT8_BF16_K = 2, 4096
INT4_DEQUANT_ROWS = 24
# int8 activations: the integer-dot-product GEMVs up to these many rows, above them the rounded x goes the
# exact way (the exact GEMVs, panels and the dense GEMM). Where the kernels are the AVX2 build (no AVX512_BF16)
# they take every row count: at 512 rows int4 ran 144-184 GFLOPS and int8 150-163 against the panels' ~125-145
# (2 Zen 4 cores capped at AVX2). With AVX512_BF16 the exact int4 GEMV (bf16 dot products) is as fast at one
# row and far faster at more (4 sequences' decode: 0.63x vs 1.11x llama.cpp's), so int4 takes the integer
# kernel for single rows only there; int8 (VNNI dot products) up to 32 rows.
INT8_Q8_ROWS = 32
INT4_Q8_ROWS = 1
Q8_ROWS_AVX2 = 1 << 30
# ... but int8 weights on the AVX2 build send the rounded x of more rows than this to dsv2's C GEMM (fp32 FMAs on
# the codes as stored: the same product) instead of the integer GEMVs: 0.94-1.20x them at 192-1,024 rows, three
# MLP / attention shapes, 2 Zen 4 cores capped at AVX2 (session 10; 0.86-1.05x at 64-128 rows)
INT8_Q8_ROWS_AVX2 = 256
# ... and above this many rows the AVX2 build's int4 takes the integer GEMM (`native.int4_gemm_q8`: 3 x 16
# tiles of vpmaddubsw on unpacked panels) instead of the 4-row GEMVs: against them, 2 Zen 4 cores capped at
# AVX2, g128, three MLP / attention shapes (`benchmarks/kernels.py --only gemm`): 0.7-0.95x at 4-16 rows,
# 1.05-1.25x at 17, 1.14-1.39x at 32-64, 1.07-1.45x at 512 (152-283 GFLOPS-equivalent from 17 rows: above
# the fp32 FMA peak of those cores, 226)
INT4_Q8_GEMM_ROWS = 16
Q8_BLOCK = 32
# bf16 activations and scales, on CPUs with AVX512_BF16 + VBMI: dsv2's int4 GEMV (the codes become bf16 in
# registers, one dot-product instruction per 32 multiply-adds; a 64-row block stays in L2 while every 4 rows
# pass over it) up to this many rows, instead of either above: 1.2-2.5x the dequantise + bf16 GEMM path from
# 16 to 128 rows on 2 Zen 4 cores; at 512-row prefill the model ran 10-20% slower through it than through
# the panels (isolated matrices were level there)
INT4_GEMV_ROWS = 128
# the AVX2 build's GEMV (codes widened to fp32) against the panels, 2 Zen 4 cores capped at AVX2: 1.0-1.3x at
# 96 rows, 0.95-1.1x at 128 (three MLP / attention shapes, g128); against dsv2's C GEMM (where it is used,
# `native.gemm_kind` 2): 2.1-2.6x at 4 rows, 1.0-1.1x at 16, 0.8-1.0x at 24, 0.7-0.8x at 64
INT4_GEMV_ROWS_AVX2 = 96
INT4_GEMV_ROWS_GEMM = 16
_FALLBACK_DEQUANT_ROWS = {"int8": 128, "int4": 192}
_PANEL = 1 << 20  # weight elements dequantised per panel (2 MiB in bf16: stays in the L2/L3 cache)
# ... but never fewer rows than this: a panel of 64 rows (1M elements at K = 10,944) left the GEMM at 55-60%
# of its speed on 384+ rows (512-row x 2,048 x 10,944 product, 2 Zen 4 cores: 72 -> 123 GFLOPS capped at
# AVX2, 204 -> 322 native)
_PANEL_MIN_ROWS = 384


class QuantError(ValueError):
    """A weight format request that cannot be honoured (unknown format, bad group size, shape)."""


def check_group_size(group_size: int) -> int:
    if group_size not in GROUP_SIZES:
        raise QuantError(f"group_size must be one of {GROUP_SIZES} (the CPU int4 kernel's), got {group_size!r}")
    return group_size


# ---- int8 -------------------------------------------------------------------------------------
def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N,K) float -> q (N,K) int8, scale (N,) fp32, row chunk by row chunk."""
    if w.dim() != 2:
        raise QuantError(f"quantize_int8 expects a (out_features, in_features) weight, got shape {tuple(w.shape)}")
    q = torch.empty(w.shape, dtype=torch.int8, device=w.device)
    scale = torch.empty(w.shape[0], dtype=torch.float32, device=w.device)
    for i in range(0, w.shape[0], _ROWS):
        rows = w[i:i + _ROWS].float()
        s = rows.abs().amax(dim=1).clamp_min(1e-12) / 127.0  # (n,)
        q[i:i + _ROWS] = torch.round(rows / s[:, None]).clamp_(-127, 127).to(torch.int8)
        scale[i:i + _ROWS] = s
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (q.to(dtype) * scale.to(dtype)[:, None]).to(dtype)


def _gemm_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a dense GEMM on x's rows runs in: x's where that is native, else fp32 (AVX2 and bf16)."""
    from dsv2.precision import native_low_precision

    return x.dtype if native_low_precision(x.device, x.dtype) else torch.float32


def _rows_limit(lib, avx2_rows: int, rows: int) -> int:
    """A C kernel's row limit: `avx2_rows` where the library is the AVX2 build (no AVX512_BF16 paths), else
    `rows`."""
    return avx2_rows if native.int4_gemv_kind(lib) == 2 else rows


def _c_gemm(lib, x: torch.Tensor) -> bool:
    """Whether x's many-row products go to dsv2's C GEMM on the weight as stored: its vector path on a CPU
    without AVX512F (`native.gemm_kind` 2), where the dense GEMM would run in fp32."""
    return native.gemm_kind(lib) == 2 and _gemm_dtype(x) == torch.float32


def panel_mm(x: torch.Tensor, n: int, dequant: Callable[[int, int, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """x (M,K) @ Wᵀ -> (M,n) in x.dtype, for a weight W (n,K) that `dequant(r0, r1, out)` writes rows of:
    a panel of rows at a time into one reused buffer (cache-sized), each multiplied by the dense GEMM."""
    dt = _gemm_dtype(x)
    k = x.shape[1]
    xt = x.to(dt).t()  # (K,M)
    rows = max(_PANEL_MIN_ROWS, _PANEL // k // 64 * 64)
    buf = torch.empty(min(rows, n), k, dtype=dt, device=x.device)
    yt = torch.empty(n, x.shape[0], dtype=dt, device=x.device)  # (N,M): each panel's rows are contiguous
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        torch.mm(dequant(r0, r1, buf[: r1 - r0]), xt, out=yt[r0:r1])
    return yt.t().to(x.dtype).contiguous()


# ---- int8 activations ----------------------------------------------------------------------------
def quantize_activations_q8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M,K) float -> (codes (M,K) int8, d (M, ceil(K/32)) fp32): per 32 columns (the last block may be
    shorter) d = amax/127 and codes = round(x · (1/d)) to nearest even (d = 0: codes 0), all in fp32. The C
    kernels' `dsv2_quant_q8` computes the same bits."""
    m, k = x.shape
    pad = -k % Q8_BLOCK
    xb = F.pad(x.float(), (0, pad)).view(m, -1, Q8_BLOCK)  # (M,nb,32): zero padding leaves amax as it is
    d = xb.abs().amax(dim=2) / 127.0  # (M,nb)
    inv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
    codes = torch.round(xb * inv[..., None]).to(torch.int8).view(m, -1)[:, :k]
    return codes, d


def round_activations_q8(x: torch.Tensor) -> torch.Tensor:
    """x (M,K) replaced by its int8-rounded copy codes · d, in x.dtype: what the int8-activation kernels
    multiply, for the rows that go another way (many rows; no C kernels). One pass in C where it is built."""
    lib = native.library() if native.supports(x) else None
    if lib is not None:
        return native.round_q8(lib, x)
    codes, d = quantize_activations_q8(x)
    k = x.shape[1]
    return (codes.float() * d.repeat_interleave(Q8_BLOCK, dim=1)[:, :k]).to(x.dtype)


def int8_mm(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, int8_act: bool = False) -> torch.Tensor:
    """x (M,K) @ dequant(q)ᵀ -> (M,N) in x.dtype; scale must be in x.dtype. int8_act: x rounded to int8 first."""
    lib = native.library() if native.supports(x, scale) else None
    if int8_act:
        if lib is not None and native.fast_q8(lib) and x.shape[0] <= _rows_limit(lib, INT8_Q8_ROWS_AVX2, INT8_Q8_ROWS):
            return native.int8_gemv_q8(lib, x, q, scale).to(x.dtype)
        x = round_activations_q8(x)
    if lib is None:
        if x.shape[0] > _FALLBACK_DEQUANT_ROWS["int8"]:
            dt = _gemm_dtype(x)
            return F.linear(x.to(dt), dequantize_int8(q, scale, dt)).to(x.dtype)
        return torch.ops.aten._weight_int8pack_mm(x, q, scale)
    q, scale = q.contiguous(), scale.contiguous()
    if (x.shape[0] <= INT8_BF16_ROWS and x.shape[1] <= INT8_BF16_K and x.dtype == torch.bfloat16
            and native.fast_int8_bf16_gemv(lib)):
        return native.int8_gemv_bf16(lib, x, q, scale).to(x.dtype)
    if x.shape[0] <= INT8_DEQUANT_ROWS:
        return native.int8_gemv(lib, x, q, scale).to(x.dtype)
    if _c_gemm(lib, x):  # fp32 FMAs on the codes as stored
        return native.gemm(lib, x, q, scale).to(x.dtype)
    return panel_mm(x, q.shape[0], lambda r0, r1, out: native.int8_dequant(lib, q, scale, r0, r1, out))


# ---- int4 -------------------------------------------------------------------------------------
def quantize_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N,K) float -> q (N,K) uint8 in [0,15], scale (N,K/g) fp32, zero (N,K/g) fp32: w ≈ (q-8)·scale + zero."""
    check_group_size(group_size)
    if w.dim() != 2 or w.shape[1] % group_size:
        raise QuantError(f"int4 group_size={group_size} must divide in_features; weight shape {tuple(w.shape)}")
    n, k = w.shape
    q = torch.empty(n, k, dtype=torch.uint8, device=w.device)
    scale = torch.empty(n, k // group_size, dtype=torch.float32, device=w.device)
    zero = torch.empty_like(scale)
    for i in range(0, n, _ROWS):
        rows = w[i:i + _ROWS].float().unflatten(1, (k // group_size, group_size))  # (n,K/g,g)
        lo, hi = rows.amin(dim=2), rows.amax(dim=2)  # (n,K/g)
        s = ((hi - lo) / 15.0).clamp_min(1e-12)
        q[i:i + _ROWS] = torch.round((rows - lo[..., None]) / s[..., None]).clamp_(0, 15).flatten(1).to(torch.uint8)
        scale[i:i + _ROWS], zero[i:i + _ROWS] = s, lo + 8.0 * s
    return q, scale, zero


def dequantize_int4(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(q - 8)·scale + zero with the group's scale/zero broadcast over its g columns, (N,K)."""
    g = q.shape[1] // scale.shape[1]
    s = scale.to(dtype).repeat_interleave(g, dim=1)
    z = zero.to(dtype).repeat_interleave(g, dim=1)
    return (q.to(dtype) - 8) * s + z


def unpack_int4(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """Inverse of `pack_int4`: (n, k/2) packed -> (n, k) uint8 codes. dsv2's layout (aten's CPU packing under
    AVX512, found by experiment; tests/quant checks it against aten's where they agree): rows in blocks of
    64, each block a (k, 32) byte array whose low nibbles are rows 0..31 and high nibbles rows 32..63 of the
    block; a last block of fewer rows (16, 32 or 48) holds even rows in the low and odd rows in the high
    nibbles."""
    flat = packed.reshape(-1)
    full = n // 64
    out = torch.empty(n, k, dtype=torch.uint8, device=packed.device)
    if full:
        blocks = flat[: full * 32 * k].view(full, k, 32)  # (B,K,32)
        both = torch.stack((blocks & 15, blocks >> 4), dim=1)  # (B,2,K,32)
        out[: full * 64] = both.permute(0, 1, 3, 2).reshape(full * 64, k)  # (B*64,K)
    if n > full * 64:
        tail = flat[full * 32 * k:].view(k, (n - full * 64) // 2)  # (K,t/2)
        out[full * 64:] = torch.stack((tail & 15, tail >> 4), dim=-1).reshape(k, -1).t()  # (t,K)
    return out


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """(N,K) codes in [0,15] -> dsv2's (N, K/2) uint8 layout (N % 16 == 0, K even), the inverse of
    `unpack_int4`. It is the layout of `aten._convert_weight_to_int4pack_for_cpu` where PyTorch runs its
    AVX512 kernels, written here in plain PyTorch because aten's packing follows the CPU it runs on (AVX2 and
    the portable build pack 32-row blocks): a quantised folder must read the same on every machine."""
    n, k = q.shape
    if n % 16 or k % 2:
        raise QuantError(f"pack_int4 needs rows a multiple of 16 and an even column count, got {tuple(q.shape)}")
    q = q.to(torch.uint8)
    full = n // 64
    parts = []
    if full:
        halves = q[: full * 64].view(full, 2, 32, k)  # (B,2,32,K): rows 0..31 and 32..63 of each block
        parts.append((halves[:, 0] | halves[:, 1] << 4).transpose(1, 2).reshape(-1))  # (B,K,32) bytes
    if n > full * 64:
        tail = q[full * 64:]  # (t,K): even rows in the low, odd rows in the high nibbles
        parts.append((tail[0::2] | tail[1::2] << 4).t().reshape(-1))  # (K,t/2) bytes
    return torch.cat(parts).view(n, k // 2)


_ATEN_LAYOUT: list[bool] = []


def aten_int4_layout() -> bool:
    """Whether aten's CPU int4 kernel (`_weight_int4pack_mm_for_cpu`) reads dsv2's layout on this machine:
    true where PyTorch runs its AVX512 kernels. Elsewhere int4 products never reach that kernel."""
    if not _ATEN_LAYOUT:
        probe = (torch.arange(80 * 64) * 7 % 16).view(80, 64)  # one full 64-row block and a 16-row tail
        try:
            theirs = torch.ops.aten._convert_weight_to_int4pack_for_cpu(probe.to(torch.int32), 1)
            _ATEN_LAYOUT.append(torch.equal(theirs.reshape(-1), pack_int4(probe).reshape(-1)))
        except RuntimeError:
            _ATEN_LAYOUT.append(False)
    return _ATEN_LAYOUT[0]


@dataclass
class Int4Weight:
    """A padded, packed int4 weight: packed (Np, Kp/2) uint8, scales_and_zeros (Kp/g, Np, 2)."""

    packed: torch.Tensor
    scales_and_zeros: torch.Tensor
    n: int
    k: int
    group_size: int

    @staticmethod
    def padded_shape(n: int, k: int, group_size: int) -> tuple[int, int]:
        return -(-n // 16) * 16, -(-k // group_size) * group_size

    @classmethod
    def quantize(cls, w: torch.Tensor, group_size: int, dtype: torch.dtype) -> Int4Weight:
        """Quantise a float (N,K) weight; scales/zeros are kept in `dtype` (the activation dtype)."""
        check_group_size(group_size)
        n, k = w.shape
        np_, kp = cls.padded_shape(n, k, group_size)
        if kp > k:  # repeat the last column: the padded group's range stays that of its real columns
            w = torch.cat((w, w[:, -1:].expand(n, kp - k)), dim=1)  # (N,Kp)
        if np_ > n:
            w = torch.cat((w, w.new_zeros(np_ - n, kp)))  # (Np,Kp)
        q, scale, zero = quantize_int4(w, group_size)
        sz = torch.stack((scale, zero), dim=-1).transpose(0, 1).contiguous().to(dtype)  # (Kp/g,Np,2)
        return cls(pack_int4(q), sz, n, k, group_size)

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        """The (N,K) weight in `dtype`: (q - 8)·scale + zero, padding dropped."""
        np_, kp = self.packed.shape[0], self.packed.shape[1] * 2
        q = unpack_int4(self.packed, np_, kp)[: self.n]  # (N,Kp)
        sz = self.scales_and_zeros[:, : self.n].to(dtype)  # (Kp/g,N,2)
        w = q.to(dtype).unflatten(1, (kp // self.group_size, self.group_size)) - 8  # (N,Kp/g,g)
        w = w * sz[..., 0].t()[..., None] + sz[..., 1].t()[..., None]
        return w.flatten(1)[:, : self.k]

    def _panels(self, lib, x: torch.Tensor) -> torch.Tensor:
        """x @ Wᵀ by the dense GEMM on panels of W dequantised in C."""
        packed, sz, g, kp = self.packed.contiguous(), self.scales_and_zeros.contiguous(), self.group_size, \
            self.packed.shape[1] * 2
        padded: list[torch.Tensor] = []  # K padded to the group: one (rows, Kp) panel, reused

        def dequant(r0: int, r1: int, out: torch.Tensor) -> torch.Tensor:
            if kp == self.k:
                return native.int4_dequant(lib, packed, sz, g, r0, r1, out)
            if not padded:
                padded.append(torch.empty(out.shape[0], kp, dtype=out.dtype))
            full = native.int4_dequant(lib, packed, sz, g, r0, r1, padded[0][: r1 - r0])
            return out.copy_(full[:, : self.k])
        return panel_mm(x, self.n, dequant)

    def mm(self, x: torch.Tensor, int8_act: bool = False) -> torch.Tensor:
        """x (M,K) -> (M,N) in x.dtype (scales_and_zeros must be in x.dtype). int8_act: x rounded to int8
        first (`round_activations_q8`)."""
        lib = native.library() if native.supports(x, self.scales_and_zeros) else None
        kp = self.packed.shape[1] * 2
        q8 = (int8_act and lib is not None and self.scales_and_zeros.dtype == torch.bfloat16 and native.fast_q8(lib)
              and x.shape[0] <= _rows_limit(lib, Q8_ROWS_AVX2, INT4_Q8_ROWS))
        if int8_act and not q8:
            x = round_activations_q8(x)
        gemv = (not q8 and lib is not None and x.dtype == self.scales_and_zeros.dtype == torch.bfloat16
                and native.fast_int4_gemv(lib) and x.shape[0] <= _rows_limit(
                    lib, INT4_GEMV_ROWS_GEMM if native.gemm_kind(lib) == 2 else INT4_GEMV_ROWS_AVX2, INT4_GEMV_ROWS))
        gemm = False
        if not (q8 or gemv):  # many rows, or aten's kernel would misread the bytes (another layout): dequantised
            aten = aten_int4_layout()
            if lib is not None and (x.shape[0] > INT4_DEQUANT_ROWS or not aten):
                gemm = _c_gemm(lib, x)
                if not gemm:
                    return self._panels(lib, x)
            if lib is None and (x.shape[0] > _FALLBACK_DEQUANT_ROWS["int4"] or not aten):
                dt = _gemm_dtype(x)
                return F.linear(x.to(dt), self.dequantize(dt)).to(x.dtype)
        xp = F.pad(x, (0, kp - self.k)) if kp > self.k else x  # (M,Kp): zero activations, padding vanishes
        if q8:  # (zero columns round to zero codes and add nothing to the group sums; more than one row: AVX2)
            q8_mm = native.int4_gemm_q8 if x.shape[0] > INT4_Q8_GEMM_ROWS else native.int4_gemv_q8
            y = q8_mm(lib, xp, self.packed, self.scales_and_zeros, self.group_size).to(x.dtype)
        elif gemv:
            y = native.int4_gemv(lib, xp, self.packed, self.scales_and_zeros, self.group_size).to(x.dtype)
        elif gemm:  # fp32 FMAs, the weight dequantised a cache-sized block at a time
            y = native.int4_gemm(lib, xp, self.packed, self.scales_and_zeros, self.group_size).to(x.dtype)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(xp.contiguous(), self.packed, self.group_size,
                                                           self.scales_and_zeros)
        return y if y.shape[1] == self.n else y[:, : self.n]


# ---- under torch.compile ----------------------------------------------------------------------------
# The two products above as opaque custom ops (dsv2::int8_mm, dsv2::int4_mm): a compiled graph (the engine's
# compiled decode step) calls back into them, C kernels and routing included, where tracing would stop at
# the ctypes calls. Eagerly, the modules call the functions directly.
@torch.library.custom_op("dsv2::int8_mm", mutates_args=())
def int8_mm_op(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, int8_act: bool) -> torch.Tensor:
    return int8_mm(x, q, scale, int8_act).contiguous()


@int8_mm_op.register_fake
def _(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, int8_act: bool) -> torch.Tensor:
    return x.new_empty(x.shape[0], q.shape[0])


@torch.library.custom_op("dsv2::int4_mm", mutates_args=())
def int4_mm_op(x: torch.Tensor, packed: torch.Tensor, scales_and_zeros: torch.Tensor, n: int, k: int,
               group_size: int, int8_act: bool) -> torch.Tensor:
    return Int4Weight(packed, scales_and_zeros, n, k, group_size).mm(x, int8_act).contiguous()


@int4_mm_op.register_fake
def _(x: torch.Tensor, packed: torch.Tensor, scales_and_zeros: torch.Tensor, n: int, k: int,
      group_size: int, int8_act: bool) -> torch.Tensor:
    return x.new_empty(x.shape[0], n)
