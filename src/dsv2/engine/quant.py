"""How cache rows are stored: plain floats or group-wise quantised codes with per-group scales.

Shapes: N rows (tokens), W row width (C + R for MLA, 2·Hkv·Dh for the baselines), G groups per segment.

A row is split into segments (MLA: c_kv = [0, C) and k_R = [C, C+R)); each segment is stored one way:
  fp32 / bf16 / fp16   the values themselves
  fp8                  float8 e4m3 codes, one fp32 scale per `group` elements (FlashMLA-style, amax/448)
  int8                 symmetric int8 codes in [-127, 127], one fp16 scale per group (amax/127)
  int4                 symmetric codes in [-7, 7] stored +8 as nibbles, two per byte (even element in
                       the low nibble), one fp16 scale per group (amax/7)
Every stored byte is counted in `bytes_per_row`, scales included, so bytes/token is exact.
"""

from __future__ import annotations

import math
import mmap
from dataclasses import dataclass

import torch

from dsv2.units import DTYPES

KINDS = ("fp32", "bf16", "fp16", "fp8", "int8", "int4")
CACHE_DTYPES = ("auto", "fp32", "bf16", "fp16", "fp8", "int8", "int4", "mixed")
_FLOAT = DTYPES
_QMAX = {"fp8": 448.0, "int8": 127.0, "int4": 7.0}
_SCALE_DTYPE = {"fp8": torch.float32, "int8": torch.float16, "int4": torch.float16}
DEFAULT_GROUP = {"fp8": 128, "int8": 64, "int4": 32}


def zeros_on_demand(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str | None) -> torch.Tensor:
    """A zero tensor. On the CPU its memory is an anonymous mapping that the kernel fills with zero pages as
    they are first written, so a cache pool costs resident memory only for the blocks in use (torch.zeros
    would write, and so hold, the whole budget at start-up)."""
    if torch.device(device or "cpu").type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    nbytes = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
    if nbytes == 0:
        return torch.zeros(shape, dtype=dtype)
    buf = mmap.mmap(-1, nbytes)  # private anonymous: zero-filled on first touch; the tensor keeps it alive
    return torch.frombuffer(buf, dtype=torch.uint8).view(dtype).view(shape)


class KVFormatError(ValueError):
    """An unknown or inconsistent cache storage format (the message names the argument)."""


@dataclass(frozen=True)
class Segment:
    """Columns [start, stop) of a row, stored as `kind` with one scale per `group` columns."""

    start: int
    stop: int
    kind: str
    group: int = 0

    @property
    def width(self) -> int:
        return self.stop - self.start

    @property
    def quantised(self) -> bool:
        return self.kind in _QMAX

    @property
    def n_groups(self) -> int:
        return self.width // self.group if self.quantised else 0

    @property
    def data_width(self) -> int:
        return self.width // 2 if self.kind == "int4" else self.width

    @property
    def data_dtype(self) -> torch.dtype:
        return {"fp8": torch.float8_e4m3fn, "int8": torch.int8, "int4": torch.uint8}.get(
            self.kind, _FLOAT.get(self.kind, torch.float32))

    def bytes_per_row(self) -> int:
        data = self.data_width * torch.empty((), dtype=self.data_dtype).element_size()
        scales = self.n_groups * _SCALE_DTYPE[self.kind].itemsize if self.quantised else 0
        return data + scales


def quantise(x: torch.Tensor, kind: str, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x (N, W) -> (codes (N, W or W/2), scales (N, W/group)). Symmetric, amax per group."""
    n, w = x.shape
    xg = x.float().view(n, w // group, group)  # (N,G,g)
    amax = xg.abs().amax(dim=-1)  # (N,G)
    scale = (amax / _QMAX[kind]).to(_SCALE_DTYPE[kind])
    # divide by the *stored* scale so that dequantise(quantise(x)) uses exactly what was rounded to
    s = scale.float().clamp_min(torch.finfo(torch.float32).tiny)[..., None]  # (N,G,1)
    y = (xg / s).view(n, w)  # (N,W)
    if kind == "fp8":
        return y.clamp(-448.0, 448.0).to(torch.float8_e4m3fn), scale
    q = torch.round(y).clamp(-_QMAX[kind], _QMAX[kind])
    if kind == "int8":
        return q.to(torch.int8), scale
    u = (q + 8).to(torch.uint8).view(n, w // 2, 2)  # (N,W/2,2) nibble pairs
    return u[..., 0] | (u[..., 1] << 4), scale


def dequantise(codes: torch.Tensor, scale: torch.Tensor, kind: str, group: int,
               dtype: torch.dtype) -> torch.Tensor:
    """Inverse of `quantise`: (N, W) values in `dtype`."""
    n = codes.shape[0]
    if kind == "int4":
        low, high = codes & 0x0F, codes >> 4
        v = torch.stack((low, high), dim=-1).view(n, -1).to(torch.float32) - 8.0  # (N,W)
    else:
        v = codes.to(torch.float32)
    g = scale.shape[-1]
    return (v.view(n, g, -1) * scale.float()[..., None]).view(n, -1).to(dtype)


class KVFormat:
    """Storage of cache rows of width W: a list of segments, each plain or quantised.

    Pools are per layer: for each segment a data tensor (num_blocks, block_size, data_width) and,
    when quantised, a scale tensor (num_blocks, block_size, n_groups).
    """

    def __init__(self, segments: list[Segment], compute_dtype: torch.dtype, name: str) -> None:
        self.segments = tuple(segments)
        self.width = segments[-1].stop
        self.compute_dtype = compute_dtype
        self.name = name
        for seg in segments:
            if seg.quantised and (seg.group <= 0 or seg.width % seg.group or seg.group % 2):
                raise KVFormatError(f"kv group size {seg.group} must be even and divide the segment "
                                    f"width {seg.width} ({name})")

    @property
    def plain(self) -> bool:
        """One unquantised segment in the compute dtype: the pool *is* the rows (zero-copy reads)."""
        s = self.segments
        return len(s) == 1 and not s[0].quantised and s[0].data_dtype == self.compute_dtype

    def bytes_per_row(self) -> int:
        return sum(s.bytes_per_row() for s in self.segments)

    def bits_per_element(self) -> float:
        return 8.0 * self.bytes_per_row() / self.width

    def allocate(self, num_blocks: int, block_size: int, device: torch.device | str | None
                 ) -> list[torch.Tensor]:
        out: list[torch.Tensor] = []
        for s in self.segments:
            out.append(zeros_on_demand((num_blocks, block_size, s.data_width), s.data_dtype, device))
            if s.quantised:
                out.append(zeros_on_demand((num_blocks, block_size, s.n_groups), _SCALE_DTYPE[s.kind], device))
        return out

    def encode(self, rows: torch.Tensor) -> list[torch.Tensor]:
        """rows (N, W) -> tensors matching the pool list, each (N, ...)."""
        out: list[torch.Tensor] = []
        for s in self.segments:
            x = rows[:, s.start: s.stop]
            if s.quantised:
                out.extend(quantise(x, s.kind, s.group))
            else:
                out.append(x.to(s.data_dtype))
        return out

    def decode(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """Tensors like the pool list, each (N, ...) -> rows (N, W) in the compute dtype."""
        cols: list[torch.Tensor] = []
        i = 0
        for s in self.segments:
            if s.quantised:
                cols.append(dequantise(parts[i], parts[i + 1], s.kind, s.group, self.compute_dtype))
                i += 2
            else:
                cols.append(parts[i].to(self.compute_dtype))
                i += 1
        return cols[0] if len(cols) == 1 else torch.cat(cols, dim=-1)


def make_format(kv_cache_dtype: str, width: int, compute_dtype: torch.dtype, split: int | None = None,
                rope_bf16: bool = False, group: int | None = None) -> KVFormat:
    """The storage for `kv_cache_dtype` (one of CACHE_DTYPES) of rows of width W.

    split: where the MLA row splits into c_kv | k_R (None for the baselines). rope_bf16 keeps k_R in
    bf16 while c_kv is quantised (FlashMLA's choice: RoPE'd keys are outlier-heavy and tiny).
    "mixed" = int4 c_kv (group 32, fp16 scales) + bf16 k_R: 5.78 bits/element on V2 shapes.
    """
    if kv_cache_dtype not in CACHE_DTYPES:
        raise KVFormatError(f"kv_cache_dtype must be one of {CACHE_DTYPES}, got {kv_cache_dtype!r}")
    kind = kv_cache_dtype
    if kind == "auto":
        kind = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(compute_dtype)
        if kind is None:
            raise KVFormatError(f"kv_cache_dtype 'auto' needs a float32/bf16/fp16 model, got {compute_dtype}")
    name = kv_cache_dtype
    if kind == "mixed":
        if split is None:
            raise KVFormatError("kv_cache_dtype 'mixed' splits c_kv | k_R and needs an MLA model")
        kind, rope_bf16 = "int4", True
    if rope_bf16 and split is None:
        raise KVFormatError("kv_rope_bf16 needs an MLA model (the baselines have no separate k_R)")
    if kind in _FLOAT:
        return KVFormat([Segment(0, width, kind)], compute_dtype, kind)
    g = group or DEFAULT_GROUP[kind]
    if rope_bf16:
        segs = [Segment(0, split, kind, min(g, split)), Segment(split, width, "bf16")]
        return KVFormat(segs, compute_dtype, name if name == "mixed" else f"{name}+rope_bf16")
    if split is not None:  # quantise c_kv and k_R as separate groups so no group straddles both
        gr = min(g, width - split)
        segs = [Segment(0, split, kind, min(g, split)), Segment(split, width, kind, gr)]
        return KVFormat(segs, compute_dtype, kv_cache_dtype)
    return KVFormat([Segment(0, width, kind, min(g, width))], compute_dtype, kv_cache_dtype)
