"""Data parallelism (DDP or FSDP2) plus optional expert parallelism, applied to a built model.

`setup(model, mode, expert_parallel)` is the one call a trainer makes; it returns the model to run
forward/backward on and a ParallelContext with rank, world size, batch sharding, rank-0 logging,
gradient clipping over all ranks and the checkpoint helpers of dsv2.parallel.state.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .dist import ParallelContext, init_distributed
from .expert_parallel import apply_expert_parallel

MODES = ("none", "ddp", "fsdp")


class DataParallel(DistributedDataParallel):
    """DDP that forwards unknown attributes to the wrapped model (model.config, model.moe_layers(), ...)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.module, name)


def unwrap(model: nn.Module) -> nn.Module:
    """The DeepseekV2 inside a DDP wrapper (FSDP2 modifies the model in place: nothing to unwrap)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def is_expert_param(p: torch.Tensor) -> bool:
    """True for routed-expert weights sharded by expert parallelism (local to this rank)."""
    return bool(getattr(p, "_dsv2_expert_parallel", False))


def setup(model: nn.Module, mode: str = "ddp", expert_parallel: bool = False,
          ctx: ParallelContext | None = None, reshard_after_forward: bool = True
          ) -> tuple[nn.Module, ParallelContext]:
    """Make `model` (identical on every rank: same seed or same checkpoint) train on all ranks.

    mode: "none" (one process), "ddp" (replicated weights, gradients all-reduced) or "fsdp" (FSDP2
    `fully_shard` per decoder block + root: weights, grads and optimizer state sharded).
    expert_parallel: each rank keeps E / world_size routed experts and exchanges tokens by
    all-to-all (see dsv2.parallel.expert_parallel); the rest follows `mode`.
    The model is moved to ctx.device. Returns (model to train, ctx).
    """
    if mode not in MODES:
        raise ValueError(f"parallel mode must be one of {MODES}, got {mode!r}")
    ctx = ctx or init_distributed()
    ctx.mode, ctx.expert_parallel = mode, expert_parallel
    if ctx.world_size > 1 and mode == "none":
        raise ValueError(f"world_size={ctx.world_size} but parallel mode 'none': every rank would train "
                         "its own copy. Use mode 'ddp' or 'fsdp'")
    model = model.to(ctx.device)
    ignored: set[nn.Parameter] = set()
    if expert_parallel:
        if mode == "none":
            raise ValueError("expert parallelism needs data parallelism over the same ranks: "
                             "mode 'ddp' or 'fsdp'")
        for layer in apply_expert_parallel(model, ctx, grad_scale=1.0 / ctx.world_size):
            for p in layer.experts.parameters():
                p._dsv2_expert_parallel = True  # type: ignore[attr-defined]
                ignored.add(p)
    if mode == "ddp" and ctx.distributed:
        names = [n for n, p in model.named_parameters() if p in ignored]
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, names)
        ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        model = DataParallel(model, device_ids=ids, process_group=ctx.group)
    elif mode == "fsdp" and ctx.distributed:
        from torch.distributed.fsdp import fully_shard

        for layer in model.layers:
            fully_shard(layer, reshard_after_forward=reshard_after_forward, ignored_params=ignored or None)
        fully_shard(model, reshard_after_forward=reshard_after_forward, ignored_params=ignored or None)
    return model, ctx


# ---- gradient clipping over all ranks ----------------------------------------------------------
@torch.no_grad()
def clip_grad_norm_(model: nn.Module, max_norm: float, ctx: ParallelContext) -> torch.Tensor:
    """Clip by the global gradient norm of the whole (logical, unsharded) model; returns that norm as a
    0-d tensor (read it with float() only when it is logged: no host synchronisation here).

    Sharded pieces (FSDP2 DTensor shards, expert-parallel experts) contribute their squares summed
    over ranks; replicated grads (DDP, ignored params) are identical on every rank and count once.
    Same coefficient as torch.nn.utils.clip_grad_norm_: max_norm / (norm + 1e-6), at most 1.
    """
    from torch.distributed.tensor import DTensor

    if not ctx.distributed:  # one process: torch's own (bitwise what a plain trainer does)
        if max_norm > 0:
            return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        return _sum_squares(p.grad for p in model.parameters() if p.grad is not None).sqrt()
    grads_sharded, grads_repl, all_grads = [], [], []
    for p in model.parameters():
        if p.grad is None:
            continue
        g = p.grad
        all_grads.append(g)
        if isinstance(g, DTensor):
            grads_sharded.append(g.to_local())
        elif is_expert_param(p):
            grads_sharded.append(g)
        else:
            grads_repl.append(g)
    dev = ctx._comm_device()
    sq_sh = _sum_squares(grads_sharded, dev)
    with ctx.guard("clip_grad_norm (all_reduce)"):
        dist.all_reduce(sq_sh, group=ctx.group)
    total = (sq_sh + _sum_squares(grads_repl, dev)).sqrt()
    if max_norm > 0:
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)  # x 1.0 is exact: no branch on a device value
        for g in all_grads:
            g.mul_(coef.to(g.device))
    return total


def _sum_squares(grads, device: torch.device | None = None) -> torch.Tensor:
    """Σ ||g||² in float64, accumulated one tensor after the other, on `device` (default: the grads')."""
    total = None
    for g in grads:
        sq = g.detach().double().pow(2).sum()
        if device is not None:
            sq = sq.to(device)
        total = sq if total is None else total + sq
    if total is None:
        return torch.zeros((), dtype=torch.float64, device=device)
    return total
