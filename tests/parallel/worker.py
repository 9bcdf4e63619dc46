"""Run by the tests as 2 processes (RANK/WORLD_SIZE/MASTER_* set like torchrun does).

    python worker.py SCENARIO OUTDIR

Scenario "all": ddp, fsdp, ep layer (training and eval mode), ep+ddp step, checkpoint save/continue, results written to
OUTDIR/rank{r}.pt; then rank 1 SIGKILLs itself mid-training ("die"), and rank 0 must exit 1 with a
clear error. Scenario "hang": rank 1 stops answering instead; rank 0 must fail after the timeout.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402

from dsv2 import parallel  # noqa: E402


def sgd_steps(model, ctx, n: int, capacity_factor=None, adjust=False) -> list[float]:
    opt = torch.optim.SGD(model.parameters(), lr=common.LR)
    losses = []
    for step, rows in enumerate(common.batches(n)):
        ex = ctx.shard_batch(common.exempt_mask(rows.shape[0], step)) if capacity_factor else None
        fix = (lambda a: parallel.adjust_aux(model, a)) if adjust else None
        loss, ce, _ = common.loss_fn(model, ctx.shard_batch(rows), capacity_factor, ex, fix)
        loss.backward()
        parallel.clip_grad_norm_(model, common.CLIP, ctx)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(ctx.mean(loss.detach()))
    return losses


def data_parallel(ctx, mode: str, ep: bool = False, cf=None) -> dict:
    model, _ = parallel.setup(common.build_model(), mode=mode, expert_parallel=ep, ctx=ctx)
    losses = sgd_steps(model, ctx, 2, capacity_factor=cf, adjust=ep)
    sd = parallel.full_state_dict(model, ctx)
    stats = parallel.gather_stats(parallel.unwrap(model), ctx) if ep else None
    return {"losses": losses, "state": sd, "stats": stats}


def ep_layer(ctx, **cfg_kw) -> dict:
    """One MoE layer: EP forward/backward on this rank's half of the tokens."""
    cfg = common.config(**cfg_kw)
    moe = common.build_moe(cfg)
    ep = parallel.ExpertParallelMoE(moe, ctx)  # grad_scale None: raw per-rank sums
    x_all = common.moe_input(2 * 24, cfg.hidden_size)
    n = x_all.shape[0] // ctx.world_size
    x = x_all[ctx.rank * n:(ctx.rank + 1) * n].clone().view(2, n // 2, -1).requires_grad_(True)
    exempt = torch.tensor([ctx.rank == 0, False])
    out = ep(x, capacity_factor=0.75, drop_exempt=exempt, keep_routing=True)
    g_out = common.moe_input(x_all.shape[0], cfg.hidden_size, seed=4)[ctx.rank * n:(ctx.rank + 1) * n]
    (out.flatten(0, 1) * g_out).sum().backward()
    gate_grad = moe.gate.weight.grad.clone()
    dist.all_reduce(gate_grad)
    return {"out": out.detach(), "x_grad": x.grad, "gate_grad": gate_grad, "keep": ep.last_keep,
            "experts_grad": {k: p.grad for k, p in ep.experts.named_parameters()},
            "comm_loss": ep.last_comm_loss.detach(), "device_loss": ep.last_device_loss.detach(),
            "stats": ep.stats}


def ep_layer_eval(ctx) -> dict:
    """One MoE layer in eval mode, called with a capacity factor that would drop picks in training."""
    cfg = common.config()
    ep = parallel.ExpertParallelMoE(common.build_moe(cfg), ctx).eval()
    x_all = common.moe_input(2 * 24, cfg.hidden_size)
    n = x_all.shape[0] // ctx.world_size
    with torch.no_grad():
        out = ep(x_all[ctx.rank * n:(ctx.rank + 1) * n].view(2, n // 2, -1), capacity_factor=0.75, keep_routing=True)
    return {"out": out, "keep": ep.last_keep, "picks": ep.stats["picks"]}


def checkpoint(ctx, out: Path) -> dict:
    """EP + DDP with AdamW: 2 steps, save (model + optimizer), 2 more steps; the test resumes in 1 process."""
    from dsv2.train.optim import build_optimizer

    model, _ = parallel.setup(common.build_model(), mode="ddp", expert_parallel=True, ctx=ctx)
    opt = build_optimizer(model, lr=1e-2)
    losses = []
    for step, rows in enumerate(common.batches(4, seed=7)):
        if step == 2:
            parallel.save_pretrained(model, out / "ckpt", ctx)
            osd = parallel.optimizer_state_dict(model, opt, ctx)
            if ctx.is_main:
                torch.save(osd, out / "ckpt" / "optimizer.pt")
        loss, _, _ = common.loss_fn(model, ctx.shard_batch(rows),
                                    adjust=lambda a: parallel.adjust_aux(model, a))
        loss.backward()
        parallel.clip_grad_norm_(model, common.CLIP, ctx)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(ctx.mean(loss.detach()))
    return {"losses": losses}


def die(ctx, out: Path, mode: str = "die") -> None:
    model, _ = parallel.setup(common.build_model(), mode="ddp", ctx=ctx)
    opt = torch.optim.SGD(model.parameters(), lr=common.LR)
    for step, rows in enumerate(common.batches(1000)):
        if step == 1:
            parallel.save_pretrained(model, out / "ckpt_before_crash", ctx)
        if step == 3 and ctx.rank == 1:
            if mode == "hang":
                time.sleep(3600)  # alive but stuck: the others must give up after the timeout
            os.kill(os.getpid(), 9)  # a hard crash: no exception, no goodbye to the peers
        loss, _, _ = common.loss_fn(model, ctx.shard_batch(rows))
        loss.backward()
        opt.step()
        opt.zero_grad()
        ctx.mean(loss.detach())
        time.sleep(0.05)


def main() -> None:
    scenario, out = sys.argv[1], Path(sys.argv[2])
    torch.set_num_threads(1)
    ctx = parallel.init_distributed("cpu")
    if scenario in ("die", "hang"):
        with parallel.failfast():  # what the trainer's CLI wraps around train(): raw DDP/gloo errors
            die(ctx, out, scenario)
        return
    res = {"ddp": data_parallel(ctx, "ddp"), "fsdp": data_parallel(ctx, "fsdp"),
           "ep_step": data_parallel(ctx, "ddp", ep=True, cf=1.0),
           "fsdp_ep_step": data_parallel(ctx, "fsdp", ep=True, cf=1.0),
           "ep_layer": ep_layer(ctx), "ep_layer_g4": ep_layer(ctx, n_group=4, topk_group=2),
           "ep_layer_eval": ep_layer_eval(ctx),
           "ckpt": checkpoint(ctx, out)}
    torch.save(res, out / f"rank{ctx.rank}.pt")
    # then rank 1 crashes mid-training (one job start saved: start-up dominates on 2 cores)
    with parallel.failfast():
        die(ctx, out)


if __name__ == "__main__":
    main()
