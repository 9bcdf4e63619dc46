"""Expert parallelism: each rank holds E / world_size routed experts; tokens travel by all-to-all.

Shapes: N local tokens (B*T), D hidden, K top-k, E routed experts, El = E / W local experts,
W world size (ranks), R rows sent by this rank, Rr rows received.

Dispatch sends each token's hidden state ONCE per destination rank (not once per expert pick):
with device-limited routing a token reaches at most topk_group ranks, so the volume is bounded by
M·N·D instead of K·N·D. The receiving rank runs the picks that landed on its experts, applies the
gate weights, sums them per row and sends one partial output row back (combine). Token dropping
happens on the receiving rank, per expert group, with the capacity of the single-device model on
the concatenated batch (ceil(cf · N_global · K / n_group)), so EP reproduces the single-process
MoE exactly. All hidden-state traffic uses an autograd-aware all_to_all_single.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from dsv2.model.moe import MoE

from .dist import ParallelContext


class _AllToAll(torch.autograd.Function):
    """all_to_all_single whose backward is the reverse all_to_all (splits swapped)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
        ctx.splits, ctx.group = (out_splits, in_splits), group
        return _a2a(x, out_splits, in_splits, group)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        out_splits, in_splits = ctx.splits
        return _a2a(g, in_splits, out_splits, ctx.group), None, None, None


def _a2a(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    x = x.contiguous()
    out = x.new_empty((sum(out_splits), *x.shape[1:]))
    dist.all_to_all_single(out, x, out_splits, in_splits, group=group)
    return out


def all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group=None) -> torch.Tensor:
    """Autograd-aware all_to_all_single over dim 0 (rows to rank j = in_splits[j])."""
    if x.requires_grad:
        return _AllToAll.apply(x, out_splits, in_splits, group)
    return _a2a(x, out_splits, in_splits, group)


def _keep_by_capacity(group_id: torch.Tensor, priority: torch.Tensor, capacity: int,
                      exempt: torch.Tensor) -> torch.Tensor:
    """(P,) picks in global flat order -> keep mask: the `capacity` highest-priority picks per group.

    Same ordering as dsv2.model.moe.drop_tokens (priority descending, ties by position), so the
    receiving rank makes the decision the single-device model makes on the whole batch.
    """
    p = group_id.numel()
    if p == 0:
        return torch.zeros(0, dtype=torch.bool, device=group_id.device)
    order = torch.sort(priority, descending=True, stable=True).indices
    order = order[torch.sort(group_id[order], stable=True).indices]
    gid, counts = torch.unique_consecutive(group_id[order], return_counts=True)
    starts = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(p, device=order.device) - starts
    return (rank < capacity) | exempt


class ExpertParallelMoE(MoE):
    """A MoE layer whose routed experts are split over ranks. Drop-in for `MoE` (same forward)."""

    def __init__(self, moe: MoE, ctx: ParallelContext, grad_scale: float | None = None) -> None:
        nn.Module.__init__(self)
        cfg = moe.cfg
        e, w = cfg.n_routed_experts, ctx.world_size
        if e % w:
            raise ValueError(f"n_routed_experts={e} is not divisible by world_size={w}: expert parallelism "
                             "puts E / world_size experts on each rank")
        g = cfg.n_group or 1
        if cfg.topk_method == "group_limited_greedy" and g % w:
            raise ValueError(f"n_group={g} is not a multiple of world_size={w}: device-limited routing needs "
                             f"whole expert groups on each rank (use --override n_group={w})")
        self.cfg, self.gate = cfg, moe.gate
        self.rank, self.world_size, self.group = ctx.rank, w, ctx.ep_group
        self.n_local = e // w
        lo = ctx.rank * self.n_local
        full = moe.experts
        self.experts = type(full)(self.n_local, full.gate_proj.shape[2], full.gate_proj.shape[1],
                                  device=full.gate_proj.device, dtype=full.gate_proj.dtype)
        with torch.no_grad():
            for name in ("gate_proj", "up_proj", "down_proj"):
                getattr(self.experts, name).copy_(getattr(full, name)[lo:lo + self.n_local])
        self.shared_experts = moe.shared_experts  # registered after the experts, as in MoE (same order)
        if grad_scale is not None and grad_scale != 1.0:
            # Each rank's expert grads sum the contributions of every rank's (locally averaged) loss;
            # data parallelism averages the replicated grads, so scale these to the same mean.
            for p in self.experts.parameters():
                p.register_hook(lambda grad, s=grad_scale: grad * s)
        # ranks a token can reach: device-limited routing bounds it by topk_group
        k = cfg.num_experts_per_tok
        limited = cfg.topk_method == "group_limited_greedy"
        self.max_ranks = min(w, cfg.topk_group or 1) if limited else min(w, k)
        self.last_routing = None
        self.last_keep = None
        self.last_device_loss: torch.Tensor | None = None
        self.last_comm_loss: torch.Tensor | None = None
        self.reset_stats()

    def reset_stats(self) -> None:
        z = torch.zeros
        self.stats = {"expert_load": z(self.n_local, dtype=torch.float64), "rows_sent": z(self.world_size),
                      "rows_recv": z(self.world_size), "a2a_bytes": z((), dtype=torch.float64),
                      "a2a_bytes_off_rank": z((), dtype=torch.float64), "picks": z(()), "forwards": 0}

    def forward(self, x: torch.Tensor, capacity_factor: float | None = None,
                drop_exempt: torch.Tensor | None = None, keep_routing: bool = False) -> torch.Tensor:
        b, t, d = x.shape
        n = b * t
        flat = x.reshape(n, d)  # (N,D)
        drop = capacity_factor is not None and self.training  # as MoE: never drop at evaluation
        r = self.route(flat)
        k, w, el = r.idx.shape[1], self.world_size, self.n_local
        dest = r.idx // el  # (N,K) rank of each pick
        sent = F.one_hot(dest, w).amax(dim=1).bool()  # (N,W) token t goes to rank j
        row_rank, row_tok = sent.t().nonzero(as_tuple=True)  # (R,) rows grouped by destination rank
        send = sent.sum(dim=0)  # (W,)
        on = dest[row_tok] == row_rank[:, None]  # (R,K) slot k of this row is an expert on that rank
        local_e = torch.where(on, r.idx[row_tok] - row_rank[:, None] * el, -1)  # (R,K)
        weight = torch.where(on, r.weight[row_tok], 0.0)  # (R,K) fp32, carries the gate's gradient
        prio = r.scores.gather(1, r.idx)[row_tok]  # (R,K) affinity, the dropping order
        if drop_exempt is not None:
            prio = prio + 2.0 * drop_exempt.repeat_interleave(t)[row_tok, None].to(prio.dtype)

        # counts (and each source's token count, for the global capacity) first
        head = torch.stack([send, torch.full_like(send, n)], dim=1)  # (W,2)
        got = torch.empty_like(head)
        dist.all_to_all_single(got, head.contiguous(), group=self.group)
        recv = got[:, 0].tolist()
        n_global = int(got[:, 1].sum())
        send_l = send.tolist()

        x_send = flat[row_tok]  # (R,D)
        if torch.is_autocast_enabled(x.device.type):  # the experts' first matmul casts anyway: send half
            x_send = x_send.to(torch.get_autocast_dtype(x.device.type))
        x_in = all_to_all(x_send, recv, send_l, self.group)  # (Rr,D)
        w_in = all_to_all(weight, recv, send_l, self.group)  # (Rr,K)
        meta = _a2a(torch.cat([local_e.to(prio.dtype), prio], dim=1), recv, send_l, self.group)  # (Rr,2K)
        e_in, p_in = meta[:, :k].long(), meta[:, k:]
        valid = e_in >= 0  # (Rr,K)
        keep = valid
        if drop:
            g = self.cfg.n_group or 1
            per_group = self.cfg.n_routed_experts // g
            vflat = valid.flatten()
            gid = (self.rank * el + e_in.flatten()[vflat]) // per_group
            cap = int(torch.ceil(torch.tensor(capacity_factor * n_global * k / g)).item())  # as drop_tokens
            pv = p_in.flatten()[vflat]
            kept = _keep_by_capacity(gid, pv, cap, pv >= 2.0)
            keep = torch.zeros_like(vflat)
            keep[vflat] = kept
            keep = keep.view_as(valid)
        y_in = self.experts(x_in, e_in.clamp(min=0), w_in, keep)  # (Rr,D) Σ over this rank's picks
        if x_in.requires_grad and not y_in.requires_grad:  # no picks here: stay in the graph, because
            y_in = y_in + 0.0 * x_in  # the combine's backward all-to-all must run on every rank
        y = all_to_all(y_in, send_l, recv, self.group)  # (R,D)
        out = torch.zeros_like(flat).index_add_(0, row_tok, y.to(flat.dtype)).view(b, t, d)

        keep_tok = None
        if drop:
            back = _a2a(keep.to(torch.uint8), send_l, recv, self.group).bool()  # (R,K)
            keep_tok = torch.zeros_like(r.idx, dtype=torch.bool)
            rr, kk = on.nonzero(as_tuple=True)
            keep_tok[row_tok[rr], kk] = back[rr, kk]
        self.last_routing, self.last_keep = (r, keep_tok) if keep_routing else (None, None)
        if keep_routing:
            self._rank_losses(r, sent, b, t)
        self._record(send, got[:, 0], e_in, keep, d * (x_send.element_size() + y.element_size()), k)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out

    def _rank_losses(self, r, sent: torch.Tensor, b: int, t: int) -> None:
        """Device and communication balance losses with devices = ranks, from the real dispatch."""
        w, e = self.world_size, self.cfg.n_routed_experts
        k = r.idx.shape[1]
        scores = r.scores.view(b, t, e)
        p_rank = scores.mean(dim=1).view(b, w, e // w).sum(dim=-1)  # (B,W) P'_d = P''_d
        f = F.one_hot(r.idx.view(b, t, k), e).sum(dim=(1, 2)).float() * e / (k * t)  # (B,E)
        self.last_device_loss = (f.view(b, w, e // w).mean(-1) * p_rank).sum(-1).mean()
        f_comm = sent.view(b, t, w).float().sum(dim=1) * w / (self.max_ranks * t)  # (B,W) f''_d
        self.last_comm_loss = (f_comm * p_rank).sum(-1).mean()

    def _record(self, send: torch.Tensor, recv: torch.Tensor, e_in: torch.Tensor, keep: torch.Tensor,
                row_hidden_bytes: int, k: int) -> None:
        s = self.stats
        with torch.no_grad():
            s["expert_load"] += torch.bincount(e_in[keep], minlength=self.n_local).double().cpu()
            s["rows_sent"] += send.float().cpu()
            s["rows_recv"] += recv.float().cpu()
            # per row: hidden state out + partial output back, fp32 gate weights + metadata (3K·4)
            row = row_hidden_bytes + 3 * k * 4
            total = float(send.sum()) * row + 16 * self.world_size
            s["a2a_bytes"] += total
            s["a2a_bytes_off_rank"] += total - float(send[self.rank]) * row
            s["picks"] += float(keep.sum())
            s["forwards"] += 1


def apply_expert_parallel(model: nn.Module, ctx: ParallelContext, grad_scale: float | None = None
                          ) -> list[ExpertParallelMoE]:
    """Replace every MoE layer of `model` by an ExpertParallelMoE holding this rank's experts.

    All ranks must hold identical weights beforehand (same seed or the same checkpoint). grad_scale
    multiplies the expert gradients (1/world_size when the rest is averaged by DDP/FSDP).
    """
    if not ctx.distributed:
        raise ValueError("expert parallelism needs a process group with world_size > 1 "
                         "(launch with torchrun)")
    if ctx.ep_group is None:
        # a communicator of its own: the all-to-alls in backward then never interleave with the
        # gradient all-reduces / reduce-scatters of DDP / FSDP on the default group
        ctx.ep_group = dist.new_group(list(range(ctx.world_size)))
    out = []
    for layer in getattr(model, "layers", []):
        if isinstance(layer.mlp, MoE) and not isinstance(layer.mlp, ExpertParallelMoE):
            layer.mlp = ExpertParallelMoE(layer.mlp, ctx, grad_scale)
            out.append(layer.mlp)
    if not out:
        raise ValueError("expert parallelism: the model has no MoE layers (dense config?)")
    return out


def ep_layers(model: nn.Module) -> list[ExpertParallelMoE]:
    return [m for m in model.modules() if isinstance(m, ExpertParallelMoE)]


def adjust_aux(model: nn.Module, aux: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Replace the device/communication balance losses by the per-rank ones measured in the dispatch.

    With n_group == world_size they equal the model's group-level values; with n_group a multiple of
    world_size they balance the real ranks instead of the finer groups.
    """
    layers = ep_layers(model)
    if not layers or layers[0].last_comm_loss is None:
        return aux
    cfg = layers[0].cfg
    aux = dict(aux)
    aux["device_loss"] = torch.stack([m.last_device_loss for m in layers]).sum()
    aux["comm_loss"] = torch.stack([m.last_comm_loss for m in layers]).sum()
    aux["aux_loss"] = (cfg.aux_loss_alpha * aux["expert_loss"]
                       + cfg.device_aux_loss_alpha * aux["device_loss"]
                       + cfg.comm_aux_loss_alpha * aux["comm_loss"])
    return aux


def gather_stats(model: nn.Module, ctx: ParallelContext, reset: bool = True) -> dict[str, object] | None:
    """Per-rank expert load and all-to-all volume since the last call (a collective; rank 0 gets it).

    Returns on rank 0: expert_load (L_moe, E) kept picks per expert (concatenated over ranks, so
    columns are global expert ids), rank_load (W,) picks computed per rank, a2a_bytes (W,) bytes each
    rank put into all-to-all (dispatch + combine + metadata), a2a_bytes_off_rank (W,) the part that
    left the rank, forwards (micro-batches counted).
    """
    layers = ep_layers(model)
    if not layers:
        return None
    loads = torch.stack([m.stats["expert_load"] for m in layers])  # (L,El)
    vol = torch.stack([sum(m.stats["a2a_bytes"] for m in layers),
                       sum(m.stats["a2a_bytes_off_rank"] for m in layers)])  # (2,)
    local = torch.cat([loads.flatten(), vol]).to(ctx._comm_device())
    parts = [torch.empty_like(local) for _ in range(ctx.world_size)]
    with ctx.guard("gather_stats"):
        dist.all_gather(parts, local, group=ctx.group)
    forwards = layers[0].stats["forwards"]
    if reset:
        for m in layers:
            m.reset_stats()
    if not ctx.is_main:
        return None
    el = loads.shape[1]
    per = [p.cpu()[:-2].view(len(layers), el) for p in parts]
    return {"expert_load": torch.cat(per, dim=1), "rank_load": torch.stack([p.sum() for p in per]),
            "a2a_bytes": torch.stack([p.cpu()[-2] for p in parts]),
            "a2a_bytes_off_rank": torch.stack([p.cpu()[-1] for p in parts]), "forwards": forwards}
