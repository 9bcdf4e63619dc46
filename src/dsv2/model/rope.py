"""Rotary position embedding as the DeepSeek-V2 checkpoints use it: interleaved pairs, YaRN scaling.

Shapes: T tokens, R rotary dim (pairs (2i, 2i+1) rotate at frequency i), R/2 frequencies.
Pure functions; the only state is the inverse-frequency vector, derived from the config.
"""

from __future__ import annotations

import math

import torch

from dsv2.config import ModelConfig, yarn_mscale


def _correction_dim(num_rotations: float, dim: int, base: float, max_pos: int) -> float:
    # the dimension whose wavelength completes `num_rotations` turns over `max_pos` positions
    return dim * math.log(max_pos / (num_rotations * 2 * math.pi)) / (2 * math.log(base))


def yarn_correction_range(beta_fast: float, beta_slow: float, dim: int, base: float,
                          max_pos: int) -> tuple[int, int]:
    """Frequency indices between which YaRN blends extrapolation into interpolation."""
    low = math.floor(_correction_dim(beta_fast, dim, base, max_pos))
    high = math.ceil(_correction_dim(beta_slow, dim, base, max_pos))
    return max(low, 0), min(high, dim - 1)


def rope_inv_freq(dim: int, base: float, scaling: dict | None) -> torch.Tensor:
    """(dim/2,) fp32 inverse frequencies, YaRN-blended when `scaling` is of type yarn."""
    exponent = torch.arange(0, dim, 2, dtype=torch.float64, device="cpu") / dim
    extrapolated = 1.0 / base**exponent
    if scaling is None or scaling.get("type", "default") == "default":
        return extrapolated.float()
    factor = float(scaling["factor"])
    low, high = yarn_correction_range(scaling.get("beta_fast", 32), scaling.get("beta_slow", 1), dim,
                                      base, scaling["original_max_position_embeddings"])
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float64, device="cpu") - low) / (high - low)).clamp(0, 1)
    keep_extrapolated = 1.0 - ramp  # 1 for high-frequency dims (< low), 0 past `high`
    inv = extrapolated / factor * (1 - keep_extrapolated) + extrapolated * keep_extrapolated
    return inv.float()


def rope_amplitude(scaling: dict | None) -> float:
    """cos/sin multiplier: mscale(s, mscale) / mscale(s, mscale_all_dim) under yarn, else 1."""
    if scaling is None or scaling.get("type", "default") != "yarn":
        return 1.0
    s = float(scaling["factor"])
    return yarn_mscale(s, scaling.get("mscale", 1.0)) / yarn_mscale(s, scaling.get("mscale_all_dim", 0.0))


def rope_dim(cfg: ModelConfig) -> int:
    """MLA rotates only the decoupled d_R part; the baselines rotate the whole head."""
    return cfg.qk_rope_head_dim if cfg.attention_type == "mla" else cfg.head_dim


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor,
                 amplitude: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape positions.shape + (R/2,), fp32."""
    angles = positions.to(torch.float32)[..., None] * inv_freq.to(positions.device)  # (..., T, R/2)
    return angles.cos() * amplitude, angles.sin() * amplitude


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of the last dim of x (..., R); cos/sin broadcast to (..., R/2).

    Complex multiplication (x_2i + i·x_2i+1)·e^{iθ_i}, computed in fp32, returned in x.dtype.
    """
    pairs = x.float().unflatten(-1, (-1, 2))  # (..., R/2, 2)
    even, odd = pairs[..., 0], pairs[..., 1]
    out = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1)  # (..., R/2, 2)
    return out.flatten(-2).to(x.dtype)  # (..., R)


class Rotary(torch.nn.Module):
    """Holds no parameters: derives cos/sin for any positions from the config on demand.

    On the CPU the rows are looked up in a table of positions 0..P-1 (P a power of two, grown as larger
    positions arrive), built by `rope_cos_sin` itself: a decode step then costs two row gathers instead of
    recomputing the angles. Elsewhere they are computed per call (growing the table would need the
    largest position on the host)."""

    MIN_TABLE = 256

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.dim = rope_dim(cfg)
        self.inv_freq = rope_inv_freq(self.dim, cfg.rope_theta, cfg.rope_scaling)  # plain attribute: no
        self.amplitude = rope_amplitude(cfg.rope_scaling)  # buffer, so meta-device builds stay exact
        self._table: tuple[torch.Tensor, torch.Tensor] | None = None  # cos, sin (P, R/2), CPU

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if positions.device.type != "cpu" or positions.numel() == 0 or torch.compiler.is_compiling():
            return rope_cos_sin(self.inv_freq, positions, self.amplitude)
        lo, hi = (int(v) for v in torch.aminmax(positions))
        if lo < 0:  # negative positions are not rows of the table: the formula says what they mean
            return rope_cos_sin(self.inv_freq, positions, self.amplitude)
        need = hi + 1
        if self._table is None or self._table[0].shape[0] < need:
            size = max(self.MIN_TABLE, 1 << (need - 1).bit_length())
            self._table = rope_cos_sin(self.inv_freq, torch.arange(size), self.amplitude)
        cos, sin = self._table
        idx = positions.reshape(-1)  # (index_select: a few us a call less than indexing by a tensor)
        return cos.index_select(0, idx).view(*positions.shape, -1), sin.index_select(0, idx).view(*positions.shape, -1)
