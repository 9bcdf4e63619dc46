"""The module-swap pass: replace a built model's Linears and stacked Experts by quantised modules.

It matches by type only (`isinstance(m, nn.Linear)`, `isinstance(m, dsv2.model.moe.Experts)`), so it
works on any model built from those, and applies from outside the model as the parallel wrappers do.
Two kinds of Linear are left as they are (`SKIP`): the MoE router `mlp.gate` (routing is computed
in fp32 from its weight; 0.01% of V2-Lite's parameters) and MLA's `kv_b_proj`, whose weight the
absorbed decode path reads as two matrices (W_UK, W_UV) rather than calling it (0.4%).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from dsv2.model.moe import Experts
from dsv2.quant.kernels import QuantError, check_group_size
from dsv2.quant.modules import WEIGHT_FORMATS, QuantExperts, QuantLinear, check_format

SKIP = (r"(^|\.)mlp\.gate$", r"(^|\.)kv_b_proj$")
QUANT_METHOD = "dsv2"
# config.json's model_type in a quantised folder: readers that do not know dsv2's int8/int4 layout
# (transformers, vLLM, an older dsv2) stop with "unrecognised model type" instead of loading garbage
# (transformers only warns about an unknown quant_method and initialises the missing weights randomly)
QUANT_MODEL_TYPE = "deepseek_v2_dsv2_quantized"
FORMAT_VERSION = 1
# int4 codes: `kernels.pack_int4`'s layout, the same on every machine. Folders written before it was named
# say "aten_cpu_int4pack": aten's packing on the machine that wrote them, which is this layout wherever
# PyTorch ran its AVX512 kernels (every folder measured in BENCHMARKS.md); on an AVX2-only machine it was not.
INT4_PACKING = "dsv2_blocks64"
_INT4_PACKINGS = (INT4_PACKING, "aten_cpu_int4pack")


@dataclass(frozen=True)
class QuantConfig:
    """What `quantization_config` in a quantised folder's config.json records."""

    weights: str
    group_size: int = 128
    skip: tuple[str, ...] = field(default=SKIP)

    def __post_init__(self) -> None:
        check_format(self.weights)
        if self.weights == "int4":
            check_group_size(self.group_size)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"quant_method": QUANT_METHOD, "format_version": FORMAT_VERSION, "weights": self.weights,
                             "skip_modules": list(self.skip)}
        if self.weights == "int4":
            d.update(group_size=self.group_size, int4_packing=INT4_PACKING)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "quantization_config") -> QuantConfig:
        method = d.get("quant_method")
        if method != QUANT_METHOD:
            raise QuantError(f"{where}: quant_method={method!r} is not one dsv2 reads (only {QUANT_METHOD!r})")
        if d.get("format_version") != FORMAT_VERSION:
            raise QuantError(f"{where}: format_version={d.get('format_version')!r}, this dsv2 reads {FORMAT_VERSION}")
        if d.get("weights") not in WEIGHT_FORMATS:
            raise QuantError(f"{where}: weights={d.get('weights')!r}, expected one of {WEIGHT_FORMATS}")
        if d["weights"] == "int4" and d.get("int4_packing", INT4_PACKING) not in _INT4_PACKINGS:
            raise QuantError(f"{where}: int4_packing={d.get('int4_packing')!r}, this dsv2 reads {INT4_PACKING!r}")
        return cls(d["weights"], int(d.get("group_size", 128)), tuple(d.get("skip_modules", SKIP)))


def resolve(weights: str | None, group_size: int | None, stored: QuantConfig | None,
            where: str = "the checkpoint") -> QuantConfig | None:
    """The format to load: the folder's own, a request, or None (float); conflicts are errors.

    weights: None (as stored), "bf16" (float weights, as stored in the folder's dtype), "int8", "int4".
    """
    if weights is not None and weights != "bf16":
        check_format(weights)
    if group_size is not None and weights != "int4" and not (weights is None and stored and stored.weights == "int4"):
        raise QuantError(f"group_size={group_size} applies to weights='int4' only (weights={weights!r})")
    if stored is None:
        return None if weights in (None, "bf16") else QuantConfig(weights, 128 if group_size is None else group_size)
    if weights in (None, stored.weights) and group_size in (None, stored.group_size):
        return stored
    want = f"weights={weights!r}" + (f", group_size={group_size}" if group_size is not None else "")
    have = f"weights={stored.weights!r}" + (f", group_size={stored.group_size}" if stored.weights == "int4" else "")
    raise QuantError(f"{where} is already quantised ({have}); it cannot be loaded with {want}. "
                     "Load it without weights=/group_size= (or with the same values), or load the "
                     "float original with the format you want")


def targets(model: nn.Module, skip: tuple[str, ...] = SKIP) -> list[tuple[str, nn.Module]]:
    """(qualified name, module) of every Linear / Experts the pass replaces, in model order."""
    pats = [re.compile(p) for p in skip]
    out = []
    for name, m in model.named_modules():
        if isinstance(m, Experts) or (isinstance(m, nn.Linear) and not any(p.search(name) for p in pats)):
            out.append((name, m))
    return out


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def empty_like_target(m: nn.Module, qc: QuantConfig, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """The quantised module for `m` with uninitialised buffers (on `device`, e.g. meta)."""
    if isinstance(m, Experts):
        e, i, d = m.gate_proj.shape
        return QuantExperts(e, d, i, qc.weights, qc.group_size, dtype, device=device)
    return QuantLinear(m.in_features, m.out_features, qc.weights, qc.group_size, dtype,
                       bias=m.bias is not None, device=device)


@torch.no_grad()
def quantize_model(model: nn.Module, weights: str | QuantConfig, group_size: int = 128,
                   dtype: torch.dtype | None = None) -> nn.Module:
    """Replace (in place) every Linear except `SKIP` and every stacked Experts by its quantised form.

    Activations run in `dtype` (default: each module's weight dtype). Returns the model, with the
    format recorded in `model.quant_config`.
    """
    qc = weights if isinstance(weights, QuantConfig) else QuantConfig(weights, group_size)
    for name, m in targets(model, qc.skip):
        dt = dtype or (m.gate_proj.dtype if isinstance(m, Experts) else m.weight.dtype)
        new = (QuantExperts.from_experts(m, qc.weights, qc.group_size, dt) if isinstance(m, Experts)
               else QuantLinear.from_linear(m, qc.weights, qc.group_size, dt))
        _set_module(model, name, new)
    model.quant_config = qc
    return model


def swap_empty(model: nn.Module, qc: QuantConfig, dtype: torch.dtype) -> list[tuple[str, nn.Module]]:
    """Replace the targets of a meta-device model by empty quantised modules; returns (name, new module)."""
    out = []
    for name, m in targets(model, qc.skip):
        new = empty_like_target(m, qc, dtype, torch.device("meta"))
        _set_module(model, name, new)
        out.append((name, new))
    model.quant_config = qc
    return out


def quantised_modules(model: nn.Module) -> list[nn.Module]:
    """Every int8/int4 module of `model` (QuantLinear, QuantExperts), in model order."""
    from dsv2.quant.modules import _Quantised

    return [m for m in model.modules() if isinstance(m, _Quantised)]


def set_int8_activations(model: nn.Module, on: bool = True) -> int:
    """Turn int8 activations on (or off) in every quantised module of `model`: each product then multiplies
    its activations rounded to int8 per 32 values (llama.cpp's Q8_0 rounding) by integer dot products,
    faster on CPUs without native bf16 and not the exact product. Returns how many modules it set; turning
    it on in a model with no int8/int4 weights raises a QuantError (there is nothing it could apply to)."""
    mods = quantised_modules(model)
    if on and not mods:
        raise QuantError("int8 activations apply to int8/int4 weights; this model has float weights "
                         "(load it with weights='int8' or 'int4', or quantize it first)")
    for m in mods:
        m.int8_activations = bool(on)
    return len(mods)


def quant_config_of(model: nn.Module) -> QuantConfig | None:
    return getattr(model, "quant_config", None)
