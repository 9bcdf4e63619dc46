"""Inference fusion, applied to a built model from outside by a pass (the `Engine` runs it).

`fuse_gate_up(model)` stores the gate and up projections of every SwiGLU block -- dense MLPs, shared
experts, routed `Experts` -- as the two halves of one matrix, so that a token multiplies by both in one
matmul instead of two (a third fewer GEMV calls in a decode step of a small MoE model, where per-call
overhead dominates). The parameters stay the same objects with the same names, values and state-dict
keys; they just become views of the joined storage (same memory). The joined path is taken only in
inference (no autograd) and only while the parameters still are those views: a parameter replaced,
moved or cast afterwards makes its block fall back to the two matmuls, with the same results.

    from dsv2.fuse import fuse_gate_up
    fuse_gate_up(model)   # in place; returns the number of blocks joined
"""

from __future__ import annotations

import torch
from torch import nn

from dsv2.model.layers import MLP, halves_of
from dsv2.model.moe import Experts


def _joined_linear(like: nn.Linear, weight: torch.Tensor) -> nn.Linear:
    """A Linear of `like`'s class (so a platform policy such as dsv2.precision's applies) over `weight`."""
    lin = type(like).__new__(type(like))
    nn.Module.__init__(lin)
    lin.in_features, lin.out_features = weight.shape[1], weight.shape[0]
    lin.weight = nn.Parameter(weight, requires_grad=False)
    lin.register_parameter("bias", None)
    return lin


@torch.no_grad()
def fuse_gate_up(model: nn.Module) -> int:
    """Join gate/up of every MLP and Experts of `model` in place (idempotent). Returns the blocks joined
    now; blocks whose projections carry a bias, are not plain (or CPU-policy) Linears, e.g. quantised
    ones, or differ in dtype/device are left as they are."""
    n = 0
    for m in model.modules():
        if isinstance(m, MLP):
            g, u = m.gate_proj, m.up_proj
            if (not isinstance(g, nn.Linear) or type(g) is not type(u) or g.bias is not None or u.bias is not None
                    or g.weight.dtype != u.weight.dtype or g.weight.device != u.weight.device):
                continue
            joined = m.__dict__.get("_gate_up")
            if halves_of(g.weight, u.weight, None if joined is None else joined.weight):
                continue
            whole = torch.cat((g.weight, u.weight))  # (2I,D)
            i = g.weight.shape[0]
            g.weight.data, u.weight.data = whole[:i], whole[i:]
            m.__dict__["_gate_up"] = _joined_linear(g, whole)
            n += 1
        elif isinstance(m, Experts):
            if m.fused_gate_up() is not None or m.gate_proj.dtype != m.up_proj.dtype:
                continue
            whole = torch.cat((m.gate_proj, m.up_proj), dim=1)  # (E,2I,D)
            i = m.gate_proj.shape[1]
            m.gate_proj.data, m.up_proj.data = whole[:, :i], whole[:, i:]
            m.__dict__["_gate_up"] = whole
            n += 1
    return n


@torch.no_grad()
def unfuse_gate_up(model: nn.Module) -> int:
    """Undo `fuse_gate_up`: gate and up get storages of their own again (a copy) and the joined matmul
    goes. For consumers that want plain parameters, e.g. a compiled graph whose frozen weights must not
    be views of a shared storage. Returns the blocks separated."""
    n = 0
    for m in model.modules():
        if "_gate_up" not in m.__dict__:
            continue
        del m.__dict__["_gate_up"]
        if isinstance(m, MLP):
            m.gate_proj.weight.data = m.gate_proj.weight.data.clone()
            m.up_proj.weight.data = m.up_proj.weight.data.clone()
        else:
            m.gate_proj.data, m.up_proj.data = m.gate_proj.data.clone(), m.up_proj.data.clone()
        n += 1
    return n
