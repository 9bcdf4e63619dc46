"""DeepSeekMoE (DeepSeek-V2 §2.2): shared experts + fine-grained routed experts, and the balance losses.

Shapes: N tokens (B*T flattened), D hidden, I moe_intermediate_size, E routed experts, K top-k,
G groups (devices, n_group), M kept groups (topk_group).

Routing, the balance losses and token dropping are pure functions so they can be tested against
hand-written references; `MoE` owns the parameters and the sorted dispatch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dsv2.config import ModelConfig
from dsv2.model.layers import MLP, derived, halves_of, silu_mul


@dataclass
class Routing:
    scores: torch.Tensor  # (N, E) fp32 softmax affinities s_i,t
    idx: torch.Tensor  # (N, K) chosen experts
    weight: torch.Tensor  # (N, K) fp32 gate values g_i,t


def route(logits: torch.Tensor, top_k: int, method: str = "greedy", n_group: int = 1, topk_group: int = 1,
          norm_topk_prob: bool = False, routed_scaling_factor: float = 1.0) -> Routing:
    """Softmax gate over all experts, then greedy or group-limited top-k.

    Ties are broken towards the lower expert (and group) index: a stable descending sort.
    """
    scores = logits.float().softmax(dim=-1)  # (N,E)
    masked = scores
    if method == "group_limited_greedy":
        n, e = scores.shape
        group_best = scores.view(n, n_group, e // n_group).amax(dim=-1)  # (N,G)
        keep = torch.sort(group_best, dim=-1, descending=True, stable=True).indices[:, :topk_group]  # (N,M)
        group_mask = torch.zeros_like(group_best, dtype=torch.bool).scatter_(1, keep, True)
        masked = scores.masked_fill(~group_mask.repeat_interleave(e // n_group, dim=1), -1.0)
    elif method != "greedy":
        raise ValueError(f"unknown topk_method {method!r}")
    idx = torch.sort(masked, dim=-1, descending=True, stable=True).indices[:, :top_k]  # (N,K)
    weight = scores.gather(1, idx)
    if top_k > 1 and norm_topk_prob:
        weight = weight / (weight.sum(dim=-1, keepdim=True) + 1e-20)
    else:
        weight = weight * routed_scaling_factor
    return Routing(scores, idx, weight)


# ---- balance losses (per sequence of T tokens, averaged over the B sequences) ------------------
def _counts(idx: torch.Tensor, n: int) -> torch.Tensor:
    """(B, T, K) indices -> (B, n) number of (token, slot) picks of each index."""
    return F.one_hot(idx, n).sum(dim=(1, 2))


def expert_balance_loss(scores: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Σ_i f_i P_i with f_i = E/(K T) Σ_t 1[t picks i], P_i = mean_t s_i,t. scores (B,T,E), idx (B,T,K)."""
    b, t, e = scores.shape
    f = _counts(idx, e).to(scores.dtype) * e / (idx.shape[-1] * t)  # (B,E)
    return (f * scores.mean(dim=1)).sum(dim=-1).mean()


def device_balance_loss(scores: torch.Tensor, idx: torch.Tensor, n_group: int) -> torch.Tensor:
    """Σ_d f'_d P'_d, f'_d = mean of f_i over the experts of device d, P'_d = Σ of their P_i."""
    b, t, e = scores.shape
    f = _counts(idx, e).to(scores.dtype) * e / (idx.shape[-1] * t)  # (B,E)
    f_dev = f.view(b, n_group, e // n_group).mean(dim=-1)  # (B,G)
    p_dev = scores.mean(dim=1).view(b, n_group, e // n_group).sum(dim=-1)  # (B,G)
    return (f_dev * p_dev).sum(dim=-1).mean()


def comm_balance_loss(scores: torch.Tensor, idx: torch.Tensor, n_group: int, topk_group: int) -> torch.Tensor:
    """Σ_d f''_d P''_d, f''_d = G/(M T) Σ_t 1[t sends to device d], P''_d = Σ_{i on d} P_i."""
    b, t, e = scores.shape
    dev = idx // (e // n_group)  # (B,T,K)
    sent = F.one_hot(dev, n_group).amax(dim=2).to(scores.dtype)  # (B,T,G): token t reaches device d
    f = sent.sum(dim=1) * n_group / (topk_group * t)  # (B,G)
    p_dev = scores.mean(dim=1).view(b, n_group, e // n_group).sum(dim=-1)  # (B,G)
    return (f * p_dev).sum(dim=-1).mean()


def drop_tokens(routing: Routing, n_group: int, capacity_factor: float,
                exempt: torch.Tensor | None = None) -> torch.Tensor:
    """Device-level token dropping (training only): (N, K) bool, True = keep this (token, expert) pick.

    Each of the G devices takes at most ceil(capacity_factor · N·K / G) picks; beyond that the picks
    with the lowest affinity are dropped. Picks of exempt tokens (N,) bool are never dropped and go first.
    """
    n, k = routing.idx.shape
    e = routing.scores.shape[1]
    dev = (routing.idx // (e // n_group)).flatten()  # (N*K,)
    affinity = routing.scores.gather(1, routing.idx).flatten()  # (N*K,) in [0, 1]
    if exempt is not None:
        affinity = affinity + 2.0 * exempt.to(affinity.dtype).repeat_interleave(k)
    capacity = int(torch.ceil(torch.tensor(capacity_factor * n * k / n_group)).item())
    # rank of each pick inside its device, by affinity (highest first)
    order = torch.sort(affinity, descending=True, stable=True).indices
    order = order[torch.sort(dev[order], stable=True).indices]  # grouped by device, affinity-descending
    starts = torch.cumsum(torch.bincount(dev, minlength=n_group), 0) - torch.bincount(dev, minlength=n_group)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(n * k, device=order.device) - starts[dev[order]]
    keep = rank < capacity
    if exempt is not None:
        keep |= exempt.repeat_interleave(k)
    return keep.view(n, k)


def swiglu(x: torch.Tensor, g: torch.Tensor, u: torch.Tensor, d: torch.Tensor, gu: torch.Tensor | None = None,
           linear: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.linear) -> torch.Tensor:
    """One expert: down(silu(x gᵀ) · x uᵀ); with gu = [g; u] (2I,D) one matmul gives both halves.
    linear: the matmul (a platform policy's hook, e.g. dsv2.precision.linear)."""
    if gu is not None:
        a, b = linear(x, gu).chunk(2, dim=-1)
    else:
        a, b = linear(x, g), linear(x, u)
    return linear(silu_mul(a, b), d)


class Experts(nn.Module):
    """E SwiGLU experts stored stacked, dispatched by sorting the (token, slot) picks by expert."""

    # the matmul of a one-token (decode) pass; a platform policy's subclass may replace it (dsv2.precision)
    linear: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = staticmethod(F.linear)

    def __init__(self, n_experts: int, dim: int, hidden: int, device: torch.device | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.gate_proj = nn.Parameter(torch.empty(n_experts, hidden, dim, **kw))  # (E,I,D)
        self.up_proj = nn.Parameter(torch.empty(n_experts, hidden, dim, **kw))  # (E,I,D)
        self.down_proj = nn.Parameter(torch.empty(n_experts, dim, hidden, **kw))  # (E,D,I)

    def plan(self, idx: torch.Tensor, keep: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """The sorted dispatch of (token, slot) picks idx (N,K): (token of each sorted pick (P,), the sorted
        pick order (P,), picks per expert). Dropped picks (keep (N,K) False) are left out."""
        k = idx.shape[1]
        flat = idx.flatten()  # (N*K,)
        order = torch.argsort(flat, stable=True)
        if keep is not None:  # dropped picks are never computed
            order = order[keep.flatten()[order]]
        counts = torch.bincount(flat[order], minlength=self.gate_proj.shape[0]).tolist()
        return order // k, order, counts

    def forward(self, x: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor,
                keep: torch.Tensor | None = None) -> torch.Tensor:
        """x (N,D), idx/weight (N,K) -> Σ_k weight·expert_idx(x), (N,D). keep (N,K) bool skips picks."""
        gu = self.fused_gate_up()
        if x.shape[0] == 1 and keep is None and not torch.is_grad_enabled():
            return self.one_token(x, idx, weight, self.gate_proj, self.up_proj, self.down_proj, gu=gu,
                                  linear=self.linear)
        token, order, counts = self.plan(idx, keep)
        return self.dispatch(x, token, order, counts, weight, self.gate_proj, self.up_proj, self.down_proj, gu=gu)

    def fused_gate_up(self) -> torch.Tensor | None:
        """(E,2I,D) = [gate; up] per expert when `dsv2.fuse` stored them so (in inference), else None."""
        return gu if halves_of(self.gate_proj, self.up_proj, gu := self.__dict__.get("_gate_up")) else None

    @staticmethod
    def one_token(x: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor, wg: torch.Tensor, wu: torch.Tensor,
                  wd: torch.Tensor, out_dtype: torch.dtype | None = None, gu: torch.Tensor | None = None,
                  linear: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.linear) -> torch.Tensor:
        """`dispatch` for one token (inference) without its sort, gather and scatter, and with the same
        arithmetic: each pick's output times its weight in the output's dtype, summed by ascending expert
        in fp32 (as index_add_ does), returned in out_dtype (default x's). x (1,D), idx/weight (1,K)."""
        picks = sorted(zip(idx[0].tolist(), weight[0].unbind(0)), key=lambda p: p[0])
        acc = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        for e, w in picks:
            y = swiglu(x, wg[e], wu[e], wd[e], None if gu is None else gu[e], linear)
            y = y if out_dtype is None else y.to(out_dtype)
            acc += (y * w.to(y.dtype)).float()
        return acc.to(out_dtype or x.dtype)

    @staticmethod
    def gathered(x: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor, wg: torch.Tensor, wu: torch.Tensor,
                 wd: torch.Tensor) -> torch.Tensor:
        """`dispatch` for a few tokens with static shapes (no sort, no host read of the counts: what a
        compiled graph needs): each token's K experts' weights read by index and the SwiGLU written as
        elementwise products and sums, which inductor fuses into one loop per projection reading the picked
        rows in place (a matmul over gathered weights would copy them first). x (N,D), idx/weight (N,K)."""
        xk = x[:, None, None, :]  # (N,1,1,D)
        h = F.silu((wg[idx] * xk).sum(-1)) * (wu[idx] * xk).sum(-1)  # (N,K,I)
        y = (wd[idx] * h[:, :, None, :]).sum(-1)  # (N,K,D)
        return (y * weight[..., None].to(y.dtype)).sum(1).to(x.dtype)

    @staticmethod
    def dispatch(x: torch.Tensor, token: torch.Tensor, order: torch.Tensor, counts: list[int],
                 weight: torch.Tensor, wg: torch.Tensor, wu: torch.Tensor, wd: torch.Tensor,
                 upcast_rows: int | None = None, gu: torch.Tensor | None = None,
                 upcast_linear: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """Σ_k weight·expert(x) over the sorted picks. upcast_rows (a platform policy's hook): experts with
        more rows than that compute in fp32, the others as stored; the result is then fp32. upcast_linear:
        those experts' matmul, given fp32 rows and the weights as stored (default: F.linear on fp32 copies).
        gu: [wg; wu] stacked (E,2I,D) (inference, `fused_gate_up`), one matmul for both."""
        xs = x[token]  # (P,D) picks grouped by expert
        if torch.is_grad_enabled():
            # unbind, not wg[e]: indexing would give each expert's gradient as a full (E,I,D) tensor in backward
            wg, wu, wd = wg.unbind(0), wu.unbind(0), wd.unbind(0)
        outs = []
        for e, xe in enumerate(xs.split(counts)):
            if not counts[e]:
                continue
            g, u, d, gue = wg[e], wu[e], wd[e], None if gu is None else gu[e]
            mm: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.linear
            if upcast_rows is not None and counts[e] > upcast_rows:
                xe = xe.float()
                if upcast_linear is not None:
                    mm = upcast_linear
                else:
                    g, u, d = g.float(), u.float(), d.float()
                    gue = None if gue is None else gue.float()
            ye = swiglu(xe, g, u, d, gue, linear=mm)
            outs.append(ye if upcast_rows is None else ye.float())
        if not outs:
            return torch.zeros_like(x, dtype=torch.float32 if upcast_rows is not None else None)
        ys = torch.cat(outs)
        ys = ys * weight.flatten()[order, None].to(ys.dtype)  # (P,D)
        return torch.zeros(x.shape, dtype=ys.dtype, device=x.device).index_add_(0, token, ys)

    def forward_reference(self, x: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Readable per-token loop, for tests."""
        out = torch.zeros_like(x)
        for i in range(x.shape[0]):
            for e, w in zip(idx[i].tolist(), weight[i]):
                h = F.silu(self.gate_proj[e] @ x[i]) * (self.up_proj[e] @ x[i])
                out[i] += w.to(x.dtype) * (self.down_proj[e] @ h)
        return out


class MoE(nn.Module):
    """DeepSeekMoE layer: shared experts on every token + gated routed experts."""

    def __init__(self, cfg: ModelConfig, device: torch.device | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        e, d = cfg.n_routed_experts, cfg.hidden_size
        self.gate = nn.Linear(d, e, bias=False, device=device, dtype=dtype)  # router W_g (E,D)
        self.experts = Experts(e, d, cfg.moe_intermediate_size, device=device, dtype=dtype)
        self.shared_experts = (MLP(d, cfg.moe_intermediate_size * cfg.n_shared_experts, device, dtype)
                               if cfg.n_shared_experts else None)
        self.last_routing: Routing | None = None  # kept for the balance losses when asked
        self.last_keep: torch.Tensor | None = None  # (N,K) picks that survived token dropping

    def route(self, x: torch.Tensor) -> Routing:
        c = self.cfg
        w = self.gate.weight
        if w.dtype != torch.float32 and not torch.is_grad_enabled() and not torch.compiler.is_compiling():
            w = derived(w, self, "_gate_fp32", lambda t: t.float())  # inference: one fp32 copy, not one per call
        with torch.autocast(x.device.type, enabled=False):  # the gate is computed in fp32
            logits = F.linear(x.float(), w.float())  # (N,E)
        return route(logits, c.num_experts_per_tok, c.topk_method, c.n_group or 1, c.topk_group or 1,
                     c.norm_topk_prob, c.routed_scaling_factor)

    def forward(self, x: torch.Tensor, capacity_factor: float | None = None,
                drop_exempt: torch.Tensor | None = None, keep_routing: bool = False) -> torch.Tensor:
        """x (B,T,D). capacity_factor (training only) drops picks per device; drop_exempt (B,) bool."""
        b, t, d = x.shape
        flat = x.reshape(b * t, d)  # (N,D)
        r = self.route(flat)
        keep = None
        if capacity_factor is not None and self.training:  # token dropping never happens at evaluation
            exempt = None if drop_exempt is None else drop_exempt.repeat_interleave(t)
            keep = drop_tokens(r, self.cfg.n_group or 1, capacity_factor, exempt)
        self.last_routing, self.last_keep = (r, keep) if keep_routing else (None, None)
        out = self.experts(flat, r.idx, r.weight, keep).view(b, t, d)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out
