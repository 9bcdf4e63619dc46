"""Two CPU processes (gloo) against one process on the concatenated batch: DDP, FSDP2, expert
parallelism (layer and full step), and a checkpoint written by 2 processes resumed in 1.

The 2-process job runs once per session (conftest.py `job`, ~25-40 s on 2 cores); each test checks
one part of its results against a single-process reference computed here.
"""

from __future__ import annotations

import functools

import pytest
import torch

from dsv2 import DeepseekV2, parallel
from dsv2.model.moe import comm_balance_loss, device_balance_loss
from dsv2.train.optim import build_optimizer

from . import common

ATOL = 2e-5


@pytest.fixture(scope="module")
def results(job):
    out, _, _, res = job
    return out, res


@functools.cache
def reference_sgd(capacity_factor: float | None = None) -> tuple[DeepseekV2, list[float]]:
    """One process, full global batch, torch's own clip_grad_norm_."""
    model = common.build_model()
    opt = torch.optim.SGD(model.parameters(), lr=common.LR)
    losses = []
    for step, rows in enumerate(common.batches(2)):
        ex = common.exempt_mask(rows.shape[0], step) if capacity_factor else None
        loss, _, _ = common.loss_fn(model, rows, capacity_factor, ex)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), common.CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return model, losses


def assert_same_params(ref: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    ref_sd = ref.state_dict()
    assert set(state) == set(ref_sd)
    for k, v in ref_sd.items():
        torch.testing.assert_close(state[k], v, atol=ATOL, rtol=1e-4, msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_data_parallel_step_matches_one_process(results, mode):
    _, res = results
    ref, losses = reference_sgd()
    assert res[1][mode]["state"] is None  # the full state dict only exists on rank 0
    assert_same_params(ref, res[0][mode]["state"])
    assert res[0][mode]["losses"] == pytest.approx(losses, abs=1e-5)
    # the parameters moved, so the comparison is not vacuous
    assert not torch.allclose(common.build_model().embed_tokens.weight, ref.embed_tokens.weight)


@pytest.mark.parametrize("mode", ["ep_step", "fsdp_ep_step"])
def test_expert_parallel_step_with_dropping_matches_one_process(results, mode):
    """EP (+DDP or FSDP2) with capacity factor 1.0 = one process dropping on the whole batch."""
    _, res = results
    ref, losses = reference_sgd(capacity_factor=1.0)
    assert_same_params(ref, res[0][mode]["state"])
    assert res[0][mode]["losses"] == pytest.approx(losses, abs=1e-5)
    stats = res[0][mode]["stats"]
    assert stats["expert_load"].shape == (1, 8)  # 1 MoE layer, 8 experts (4 per rank)
    assert stats["a2a_bytes"].shape == (2,) and (stats["a2a_bytes"] > 0).all()
    assert (stats["a2a_bytes_off_rank"] < stats["a2a_bytes"]).all()


@pytest.mark.parametrize("key,cfg_kw", [("ep_layer", {}), ("ep_layer_g4", dict(n_group=4, topk_group=2))])
def test_expert_parallel_layer_forward_backward(results, key, cfg_kw):
    """Outputs, input grads, expert grads, router grads and kept picks vs the single-process MoE."""
    _, res = results
    cfg = common.config(**cfg_kw)
    moe = common.build_moe(cfg)
    x = common.moe_input(48, cfg.hidden_size).view(4, 12, -1).requires_grad_(True)
    exempt = torch.tensor([True, False, False, False])
    out = moe(x, capacity_factor=0.75, drop_exempt=exempt, keep_routing=True)
    g_out = common.moe_input(48, cfg.hidden_size, seed=4)
    (out.flatten(0, 1) * g_out).sum().backward()
    assert not moe.last_keep.all()  # capacity 0.75 really drops picks
    r = moe.last_routing
    for rank in range(2):
        got = res[rank][key]
        sl = slice(rank * 2, rank * 2 + 2)
        torch.testing.assert_close(got["out"], out[sl].detach(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got["x_grad"], x.grad[sl], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got["gate_grad"], moe.gate.weight.grad, atol=1e-5, rtol=1e-5)
        assert torch.equal(got["keep"], moe.last_keep[rank * 24:(rank + 1) * 24])
        for name, g in got["experts_grad"].items():
            full = getattr(moe.experts, name).grad
            torch.testing.assert_close(g, full[rank * 4:(rank + 1) * 4], atol=1e-5, rtol=1e-5)
        # balance losses with devices = ranks, from the real dispatch, vs the formulas (float64)
        scores = r.scores.double().view(4, 12, -1)[sl]
        idx = r.idx.view(4, 12, -1)[sl]
        m = min(2, cfg.topk_group)
        torch.testing.assert_close(got["comm_loss"].double(), comm_balance_loss(scores, idx, 2, m))
        torch.testing.assert_close(got["device_loss"].double(), device_balance_loss(scores, idx, 2))
        # per-rank load = kept picks on this rank's experts
        load = torch.bincount(r.idx[moe.last_keep], minlength=8)[rank * 4:(rank + 1) * 4]
        assert torch.equal(got["stats"]["expert_load"].long(), load)


def test_expert_parallel_layer_never_drops_in_eval_mode(results):
    """In eval mode a capacity factor is ignored, as in the single-process MoE: every pick is computed and
    the output equals the MoE without dropping."""
    _, res = results
    cfg = common.config()
    moe = common.build_moe(cfg)
    x = common.moe_input(48, cfg.hidden_size).view(4, 12, -1)
    with torch.no_grad():
        ref = moe.eval()(x)  # no capacity factor at all
        dropped = moe.train()(x, capacity_factor=0.75, keep_routing=True)
    # in training mode 0.75 does drop picks, visibly (outputs are ~3e-3: tolerances are set to match)
    assert not moe.last_keep.all() and (dropped - ref).abs().max() > 1e-5
    for rank in range(2):
        got = res[rank]["ep_layer_eval"]
        torch.testing.assert_close(got["out"], ref[rank * 2:rank * 2 + 2], atol=1e-7, rtol=1e-4)
        assert got["keep"] is None
    k = cfg.num_experts_per_tok
    assert sum(float(res[rank]["ep_layer_eval"]["picks"]) for rank in range(2)) == 48 * k


def test_checkpoint_from_two_processes_resumes_in_one(results):
    """EP+DDP, AdamW: saved at step 2 by 2 processes; 1 process loads model + optimizer and
    reproduces the losses of steps 3-4 of the 2-process run."""
    out, res = results
    ckpt = out / "ckpt"
    model = DeepseekV2.from_pretrained(ckpt, dtype=torch.float32)
    ctx = parallel.ParallelContext()
    model, ctx = parallel.setup(model, mode="none", ctx=ctx)
    opt = build_optimizer(model, lr=1e-2)
    parallel.load_optimizer_state_dict(model, opt, torch.load(ckpt / "optimizer.pt", weights_only=False), ctx)
    losses = []
    for rows in common.batches(4, seed=7)[2:]:
        loss, _, _ = common.loss_fn(model, rows)
        loss.backward()
        parallel.clip_grad_norm_(model, common.CLIP, ctx)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses == pytest.approx(res[0]["ckpt"]["losses"][2:], abs=1e-5)
