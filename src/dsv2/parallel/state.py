"""Checkpoints of a parallel model in a world-size-independent form.

The model is saved once, by rank 0, in the hub layout (dsv2.checkpoint.save_pretrained), after
gathering FSDP2 shards and expert-parallel shards into full tensors. The optimizer state is saved
in the form `torch.optim.Optimizer.state_dict()` has for the single-process model (integer keys in
param_groups order, full tensors), so a checkpoint written by N processes resumes on M processes
(or one) whatever the modes.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .data_parallel import is_expert_param, unwrap
from .dist import ParallelContext
from .expert_parallel import ep_layers


def _gather_rows(t: torch.Tensor, ctx: ParallelContext) -> torch.Tensor:
    """Concatenate every rank's (El, ...) tensor along dim 0 -> (El * W, ...) on CPU."""
    dev = ctx._comm_device()
    local = t.detach().to(dev).contiguous()
    parts = [torch.empty_like(local) for _ in range(ctx.world_size)]
    with ctx.guard("gather expert shards"):
        dist.all_gather(parts, local, group=ctx.group)
    return torch.cat(parts).cpu()


def full_state_dict(model: nn.Module, ctx: ParallelContext) -> dict[str, torch.Tensor] | None:
    """Full (unsharded) model state dict on CPU on rank 0, None on the others. A collective."""
    m = unwrap(model)
    if ctx.mode == "fsdp" and ctx.distributed:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        with ctx.guard("gather FSDP state dict"):
            sd = get_model_state_dict(m, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        sd = {k: v.detach().cpu() for k, v in m.state_dict().items()} if ctx.is_main else {}
    for name, p in m.named_parameters():
        if is_expert_param(p):
            full = _gather_rows(p, ctx)
            if ctx.is_main:
                sd[name] = full
    return sd if ctx.is_main else None


def export_model(model: nn.Module, ctx: ParallelContext) -> nn.Module | None:
    """A plain single-process DeepseekV2 with the full weights on rank 0 (None elsewhere). A collective.

    Use it for everything that wants the ordinary model: `save_pretrained`, evaluation, generation.
    With no sharding (mode none/ddp without experts parallel) it is the trained model itself.
    """
    m = unwrap(model)
    if not ep_layers(m) and (ctx.mode != "fsdp" or not ctx.distributed):
        return m if ctx.is_main else None
    sd = full_state_dict(model, ctx)
    if sd is None:
        return None
    from dsv2.model import DeepseekV2

    plain = DeepseekV2(m.config, device="meta")
    plain.load_state_dict(sd, strict=True, assign=True)  # shares the gathered CPU tensors, no copy
    return plain


def save_pretrained(model: nn.Module, path: str | Path, ctx: ParallelContext, **kwargs: Any) -> None:
    """Gather and write the model once (rank 0) in the hub layout; every rank returns after it is written."""
    plain = export_model(model, ctx)
    if plain is not None:
        from dsv2.checkpoint import save_pretrained as _save

        _save(plain, path, **kwargs)
    ctx.barrier()


# ---- optimizer ---------------------------------------------------------------------------------
def _param_names(model: nn.Module, opt: torch.optim.Optimizer) -> list[str]:
    names = {id(p): n for n, p in unwrap(model).named_parameters()}
    try:
        return [names[id(p)] for g in opt.param_groups for p in g["params"]]
    except KeyError:
        raise ValueError("the optimizer holds parameters that are not the model's: build it after "
                         "dsv2.parallel.setup(), from the returned model's parameters") from None


def optimizer_state_dict(model: nn.Module, opt: torch.optim.Optimizer, ctx: ParallelContext
                         ) -> dict[str, Any] | None:
    """The optimizer state as the single-process model would have it (rank 0; None elsewhere)."""
    names = _param_names(model, opt)
    m = unwrap(model)
    if ctx.mode == "fsdp" and ctx.distributed:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        with ctx.guard("gather FSDP optimizer state"):
            fqn = get_optimizer_state_dict(m, opt, options=StateDictOptions(full_state_dict=True,
                                                                             cpu_offload=True))
        sd = _fqn_to_index(fqn, names) if ctx.is_main else None
    else:
        sd = copy.copy(opt.state_dict()) if ctx.is_main else None
        if sd is not None:
            sd["state"] = {i: {k: (v.detach().cpu() if torch.is_tensor(v) else v) for k, v in s.items()}
                           for i, s in sd["state"].items()}
    params = [p for g in opt.param_groups for p in g["params"]]
    for i, p in enumerate(params):
        if not is_expert_param(p):
            continue
        for key, v in sorted(opt.state.get(p, {}).items()):
            if torch.is_tensor(v) and v.dim() > 0 and v.shape == p.shape:
                full = _gather_rows(v, ctx)
                if sd is not None:
                    sd["state"].setdefault(i, {})[key] = full
            elif sd is not None:
                sd["state"].setdefault(i, {})[key] = v.detach().cpu() if torch.is_tensor(v) else v
    if sd is not None:
        sd["param_names"] = names  # lets a loader with another parameter order map by name
    return sd


def _fqn_to_index(fqn: dict[str, Any], names: list[str]) -> dict[str, Any]:
    index = {n: i for i, n in enumerate(names)}
    state = {index[n]: s for n, s in fqn["state"].items() if n in index}
    groups = []
    for g_fqn in fqn["param_groups"]:
        groups.append({**{k: v for k, v in g_fqn.items() if k != "params"},
                       "params": [index[n] for n in g_fqn["params"]]})
    return {"state": state, "param_groups": groups}


def load_optimizer_state_dict(model: nn.Module, opt: torch.optim.Optimizer, sd: dict[str, Any],
                              ctx: ParallelContext) -> None:
    """Load a state from `optimizer_state_dict` (or a single-process `opt.state_dict()`), any world size.

    Every rank passes the full state (each reads the checkpoint file); it is sliced or sharded here.
    """
    names = _param_names(model, opt)
    params = [p for g in opt.param_groups for p in g["params"]]
    n_saved = sum(len(g["params"]) for g in sd["param_groups"])
    if n_saved != len(params):
        raise ValueError(f"optimizer state holds {n_saved} parameters, this model has {len(params)}: "
                         "the checkpoint is from another model configuration")
    state = {int(i): dict(s) for i, s in sd["state"].items()}
    groups = sd["param_groups"]
    saved_names = sd.get("param_names")
    if saved_names is not None and saved_names != names:
        if sorted(saved_names) != sorted(names):
            raise ValueError("optimizer state: parameter names differ from this model's: "
                             f"{sorted(set(saved_names) ^ set(names))[:5]}")
        # torch pairs saved and current params by position: renumber the state in this model's order
        where = {n: i for i, n in enumerate(names)}
        state = {where[saved_names[i]]: s for i, s in state.items()}
        start, current = 0, []
        for g_saved, g_now in zip(groups, opt.param_groups):
            current.append({**g_saved, "params": list(range(start, start + len(g_now["params"])))})
            start += len(g_now["params"])
        groups = current
    sd = {"state": state, "param_groups": groups}
    for i, p in enumerate(params):
        if is_expert_param(p) and i in sd["state"]:
            lo = ctx.rank * p.shape[0]
            for key, v in sd["state"][i].items():
                sliceable = torch.is_tensor(v) and v.dim() > 0 and v.shape[1:] == p.shape[1:]
                if sliceable and v.shape[0] != p.shape[0]:
                    sd["state"][i][key] = v[lo:lo + p.shape[0]].clone()
    if ctx.mode == "fsdp" and ctx.distributed:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        fqn = {"state": {names[i]: s for i, s in sd["state"].items()},
               "param_groups": [{**{k: v for k, v in g.items() if k != "params"},
                                 "params": [names[i] for i in g["params"]]} for g in sd["param_groups"]]}
        with ctx.guard("load FSDP optimizer state"):
            set_optimizer_state_dict(unwrap(model), opt, fqn, options=StateDictOptions(full_state_dict=True))
    else:
        opt.load_state_dict(sd)
