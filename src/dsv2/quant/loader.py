"""The streaming fill behind `checkpoint.load_pretrained`: one stored tensor at a time into a meta model.

Each stored tensor is mapped (`TensorFiles.get`), put where it belongs, and released before the next:
- a quantised module swapped in by `swap_empty` gets its float weight(s) quantised into its buffers
  (read -> quantise -> release: only the quantised model accumulates);
- a routed expert's tensor is copied into its slot of the layer's stacked parameter, allocated once
  (no list of per-expert tensors is stacked into a second copy);
- anything else is kept as the mapped view when its dtype is the one asked for (file-backed memory,
  no copy: how a quantised folder loads in seconds), or cast.
"""

from __future__ import annotations

import torch
from torch import nn

from dsv2.quant.modules import QuantExperts, QuantLinear
from dsv2.tensorfile import TensorFiles

_PROJS = ("gate_proj", "up_proj", "down_proj")


def _hub(name: str) -> str:
    return name if name.startswith("lm_head.") else f"model.{name}"


def _cast(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return t.to(dtype) if dtype is not None and t.is_floating_point() and t.dtype != dtype else t


def quantise_from(files: TensorFiles, name: str, m: nn.Module, tied: bool, device: torch.device) -> None:
    """Materialise the empty quantised module `m` (at `name`) and quantise its float weights into it."""
    m.to_empty(device=device)
    if isinstance(m, QuantExperts):
        for e in range(m.n_experts):
            gate, up, down = (files.get(_hub(f"{name}.{e}.{p}.weight")) for p in _PROJS)
            m.set_expert(e, gate, up, down)
            del gate, up, down  # unmapped before the next expert is read
    elif isinstance(m, QuantLinear):
        src = "model.embed_tokens.weight" if tied and name == "lm_head" else _hub(f"{name}.weight")
        bias = files.get(_hub(f"{name}.bias")) if m.bias is not None else None
        m.set_weight(files.get(src), bias)
    else:
        raise TypeError(f"{name}: {type(m).__name__} is not a quantised module")


@torch.no_grad()
def fill_model(model: nn.Module, files: TensorFiles, shapes: dict[str, tuple[tuple[int, ...], str, int]],
               swapped: list[tuple[str, nn.Module]], dtype: torch.dtype | None, device: torch.device,
               quantise: bool) -> None:
    """Fill every parameter and buffer of the meta `model` from `files`.

    shapes: hub key -> (shape, state name, expert index or -1) for `model` as it is now (after the swap).
    quantise: the swapped modules' sources are float weights (else their buffers are stored as such).
    """
    tied = bool(model.config.tie_word_embeddings)
    state: dict[str, torch.Tensor] = {}
    owned: tuple[str, ...] = ()
    if quantise:
        for name, m in swapped:
            quantise_from(files, name, m, tied, device)
            state.update({f"{name}.{b}": t for b, t in m.named_buffers() if t is not None})
        owned = tuple(f"{name}." for name, _ in swapped)
    for key, (shape, sname, e) in shapes.items():
        if owned and sname.startswith(owned):
            continue
        t = files.get(key)
        if e < 0:
            state[sname] = _cast(t, dtype)
            continue
        if sname not in state:  # the layer's stacked (E, ...) parameter, filled expert by expert
            n = model.get_parameter(sname).shape[0]
            state[sname] = torch.empty((n, *shape), dtype=dtype or t.dtype)
        state[sname][e].copy_(t)
        del t
    plain_head = isinstance(model.lm_head, nn.Linear)  # (a QuantLinear's .weight would dequantise)
    if tied and plain_head:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    if tied and plain_head:
        model.lm_head.weight = model.embed_tokens.weight
