"""DeepSeekMoE: the router against a per-token reference (ties, group masking, norm_topk_prob, scaling),
sorted expert dispatch against the per-token loop, device-level token dropping, the MoE layer rule, and
the whole MoE layer against a float64 re-computation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dsv2 import DeepseekV2, ModelConfig
from dsv2.model.layers import MLP
from dsv2.model.moe import Experts, MoE, Routing, drop_tokens, route
from dsv2.precision import CpuExperts, native_low_precision, prepare

from ._reference import randomize_, ref_route_token, rel_err


# ---- router ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("method, n_group, topk_group, k", [
    ("greedy", 1, 1, 1), ("greedy", 1, 1, 6), ("group_limited_greedy", 4, 2, 3),
    ("group_limited_greedy", 8, 3, 6), ("group_limited_greedy", 4, 1, 4), ("group_limited_greedy", 2, 2, 2),
])
@pytest.mark.parametrize("norm, rsf", [(False, 1.0), (False, 16.0), (True, 1.0), (True, 2.5)])
def test_route_matches_per_token_reference(method: str, n_group: int, topk_group: int, k: int,
                                           norm: bool, rsf: float) -> None:
    logits = 3 * torch.randn(48, 16, generator=torch.Generator().manual_seed(21))
    r = route(logits, k, method, n_group, topk_group, norm, rsf)
    assert r.idx.shape == r.weight.shape == (48, k) and r.weight.dtype == torch.float32
    torch.testing.assert_close(r.scores, logits.double().softmax(-1).float(), rtol=1e-6, atol=1e-7)
    for t in range(48):
        idx, w = ref_route_token(logits[t].tolist(), k, method, n_group, topk_group, norm, rsf)
        assert r.idx[t].tolist() == idx, f"token {t}"
        torch.testing.assert_close(r.weight[t].double(), torch.tensor(w, dtype=torch.float64), rtol=2e-6, atol=0)


def test_exact_ties_go_to_the_lower_expert_index() -> None:
    row = torch.tensor([[1.0, 3.0, 3.0, 0.0, 3.0, 2.0, 3.0, 0.0]])
    assert route(row, 2).idx.tolist() == [[1, 2]]
    assert route(row, 4).idx.tolist() == [[1, 2, 4, 6]]
    flat = torch.zeros(1, 8)
    assert route(flat, 3).idx.tolist() == [[0, 1, 2]]
    assert route(flat, 3, "group_limited_greedy", 4, 2).idx.tolist() == [[0, 1, 2]]
    for row_ in (row, flat):
        for k in (2, 3):
            assert route(row_, k).idx[0].tolist() == ref_route_token(row_[0].tolist(), k, "greedy", 1, 1,
                                                                      False, 1.0)[0]


def test_group_ties_go_to_the_lower_group_index() -> None:
    # groups of 4: group maxima 2, 5, 5, 5 -> with 2 kept groups, groups 1 and 2 (not 3)
    row = torch.tensor([[2.0, 0, 0, 0, 5, 1, 0, 0, 0, 0, 5, 0.5, 5, 4.9, 0, 0]])
    r = route(row, 4, "group_limited_greedy", 4, 2)
    assert r.idx.tolist() == [[4, 10, 5, 11]]  # 13 (4.9, group 3) is masked out
    assert r.idx[0].tolist() == ref_route_token(row[0].tolist(), 4, "group_limited_greedy", 4, 2, False, 1.0)[0]


def test_group_masking_beats_global_top_k() -> None:
    """An expert of a dropped group never wins, even over much weaker experts of the kept group."""
    row = torch.tensor([[5.0, -5, -5, -5, 4.9, 4.8, -5, -5]])
    assert route(row, 2).idx.tolist() == [[0, 4]]  # greedy
    r = route(row, 2, "group_limited_greedy", 2, 1)
    assert r.idx.tolist() == [[0, 1]]  # group 0 kept; its 3 weak experts tie -> lowest index
    # the weight is the unmasked softmax score, not a renormalised one
    torch.testing.assert_close(r.weight, r.scores.gather(1, r.idx))


def test_norm_topk_prob_and_scaling() -> None:
    logits = torch.randn(10, 8)
    s = logits.softmax(-1)
    top = s.topk(3).values
    torch.testing.assert_close(route(logits, 3, norm_topk_prob=True, routed_scaling_factor=7.0).weight,
                               top / top.sum(-1, keepdim=True))  # normalised; the factor does not apply
    torch.testing.assert_close(route(logits, 3, routed_scaling_factor=7.0).weight, top * 7.0)
    # top_k = 1: DeepSeek's reference only normalises when top_k > 1
    torch.testing.assert_close(route(logits, 1, norm_topk_prob=True, routed_scaling_factor=2.0).weight,
                               s.max(-1, keepdim=True).values * 2.0)


def test_route_rejects_unknown_method() -> None:
    with pytest.raises(ValueError, match="topk_method.*noaux_tc"):
        route(torch.zeros(2, 8), 2, "noaux_tc")


# ---- experts: sorted dispatch == per-token loop ----------------------------------------------------
def _experts(e: int = 8, d: int = 16, i: int = 12) -> Experts:
    ex = Experts(e, d, i)
    with torch.no_grad():
        for p in ex.parameters():
            p.normal_(0, 0.3)
    return ex


@pytest.mark.parametrize("skew", [0.0, 4.0])
def test_sorted_dispatch_equals_reference(skew: float) -> None:
    ex = _experts()
    x = torch.randn(40, 16)
    logits = torch.randn(40, 8)
    logits[:, 3] += skew  # skew 4: nearly every token picks expert 3, others get few or none
    r = route(logits, 2)
    with torch.no_grad():
        got, want = ex(x, r.idx, r.weight), ex.forward_reference(x, r.idx, r.weight)
    assert rel_err(got, want) <= 1e-5
    if skew:
        assert (r.idx == 3).any(1).float().mean() > 0.9


def test_dispatch_skips_dropped_picks() -> None:
    ex = _experts()
    x, r = torch.randn(30, 16), route(torch.randn(30, 8), 3)
    keep = torch.rand(30, 3, generator=torch.Generator().manual_seed(5)) > 0.4
    with torch.no_grad():
        got = ex(x, r.idx, r.weight, keep)
        want = ex.forward_reference(x, r.idx, r.weight * keep)
        assert torch.equal(ex(x, r.idx, r.weight, torch.zeros_like(keep)), torch.zeros_like(x))
    assert rel_err(got, want) <= 1e-5


def test_dispatch_bf16_close_to_fp32() -> None:
    ex = _experts()
    x, r = torch.randn(20, 16), route(torch.randn(20, 8), 2)
    with torch.no_grad():
        want = ex.forward_reference(x, r.idx, r.weight)
        got = ex.to(torch.bfloat16)(x.bfloat16(), r.idx, r.weight)
    assert got.dtype == torch.bfloat16
    assert rel_err(got, want) <= 3e-2


def test_dispatch_bf16_inference_mixes_gemv_and_upcast_experts() -> None:
    """Inference on bf16 experts: experts with <= GEMV_ROWS rows and experts with more both match the
    float64 reference of the bf16 weights, and no fp32 copy of the experts is cached (CPU policy)."""
    ex = prepare(_experts().to(torch.bfloat16))
    logits = torch.randn(20, 8)
    logits[:, 0] += 4.0  # expert 0 takes (nearly) every token, the rest a few each
    x, r = torch.randn(20, 16).bfloat16(), route(logits, 2)
    counts = torch.bincount(r.idx.flatten(), minlength=8)
    assert counts.max() > CpuExperts.GEMV_ROWS and 0 < counts[counts > 0].min() <= CpuExperts.GEMV_ROWS
    with torch.inference_mode():
        got = ex(x, r.idx, r.weight)
    ref = _experts()
    ref.load_state_dict({k: v.double() for k, v in ex.state_dict().items()}, assign=True)
    want = ref.forward_reference(x.double(), r.idx, r.weight.double())
    assert got.dtype == torch.bfloat16
    assert rel_err(got, want) <= 2e-2
    assert not any(isinstance(v, tuple) for v in vars(ex).values())  # nothing cached on the module


@pytest.mark.skipif(native_low_precision(torch.device("cpu"), torch.bfloat16),
                    reason="bf16 is native here: autocast computes the experts in bf16 by design")
def test_experts_under_bf16_autocast_compute_in_fp32() -> None:
    """Evaluation under CPU bf16 autocast over fp32 weights (the trainer's eval): where bf16 is not native
    the experts run in fp32 (CPU policy), so the result is fp32-accurate, not bf16-accurate."""
    ex = prepare(_experts())
    x, r = torch.randn(20, 16), route(torch.randn(20, 8), 2)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got = ex(x, r.idx, r.weight)
    ref = _experts()
    ref.load_state_dict({k: v.double() for k, v in ex.state_dict().items()}, assign=True)
    want = ref.forward_reference(x.double(), r.idx, r.weight.double())
    assert rel_err(got.float(), want) <= 1e-2  # bf16 output rounding only


# ---- token dropping ---------------------------------------------------------------------------------
def _ref_drop(r: Routing, n_group: int, cf: float, exempt: torch.Tensor | None) -> torch.Tensor:
    """Per device: exempt picks first, then by affinity (ties: lower flat index), keep the first ceil(cf·N·K/G)."""
    n, k = r.idx.shape
    e = r.scores.shape[1]
    cap = math.ceil(cf * n * k / n_group)
    keep = torch.zeros(n * k, dtype=torch.bool)
    picks = [(j // k, r.idx[j // k, j % k].item()) for j in range(n * k)]
    for dev in range(n_group):
        mine = [j for j, (_, ex) in enumerate(picks) if ex // (e // n_group) == dev]
        ex_first = sorted(mine, key=lambda j: (not (exempt is not None and bool(exempt[picks[j][0]])),
                                              -r.scores[picks[j][0], picks[j][1]].item(), j))
        for rank, j in enumerate(ex_first):
            keep[j] = rank < cap or (exempt is not None and bool(exempt[picks[j][0]]))
    return keep.view(n, k)


def _skewed_routing(n: int = 64, e: int = 8, k: int = 2) -> Routing:
    logits = torch.randn(n, e, generator=torch.Generator().manual_seed(31))
    logits[:, :2] += 2.0  # device 0 (experts 0, 1 of 4 devices) is oversubscribed
    return route(logits, k)


@pytest.mark.parametrize("cf", [1.0, 0.5, 1.3])
def test_drop_tokens_capacity_and_order(cf: float) -> None:
    r, g = _skewed_routing(), 4
    keep = drop_tokens(r, g, cf)
    cap = math.ceil(cf * 64 * 2 / g)
    dev = r.idx // (8 // g)
    aff = r.scores.gather(1, r.idx)
    assert not keep.all(), "the skewed routing must overflow device 0"
    for d in range(g):
        on = dev == d
        assert int((keep & on).sum()) <= cap
        if (on & ~keep).any():  # dropped only when full, and the lowest-affinity ones
            assert int((keep & on).sum()) == cap
            assert aff[on & ~keep].max() <= aff[on & keep].min()
    assert torch.equal(keep, _ref_drop(r, g, cf, None))


def test_drop_tokens_exempt_never_dropped() -> None:
    r, g = _skewed_routing(), 4
    exempt = torch.zeros(64, dtype=torch.bool)
    exempt[::8] = True
    keep = drop_tokens(r, g, 1.0, exempt)
    assert keep[exempt].all()
    cap = math.ceil(64 * 2 / g)
    dev = r.idx // 2
    for d in range(g):
        on = dev == d
        n_exempt = int((on & exempt[:, None]).sum())
        assert int((keep & on & ~exempt[:, None]).sum()) <= max(0, cap - n_exempt)
    assert torch.equal(keep, _ref_drop(r, g, 1.0, exempt))


def test_drop_tokens_nothing_dropped_under_capacity() -> None:
    r = route(torch.randn(64, 8), 2)
    assert drop_tokens(r, 4, 4.0).all()


def test_model_drops_only_in_training_mode_calls() -> None:
    cfg = ModelConfig.from_preset("tiny", num_hidden_layers=2)
    model = DeepseekV2(cfg)
    randomize_(model, seed=32)
    with torch.no_grad():
        model.layers[1].mlp.gate.weight[:2] += 3.0  # every token prefers experts 0, 1 (device 0)
        ids = torch.randint(0, cfg.vocab_size, (4, 16))
        plain, aux0 = model(ids, return_aux=True)
        dropped, aux1 = model(ids, return_aux=True, capacity_factor=1.0)
        _, aux2 = model(ids, return_aux=True, capacity_factor=1.0, drop_exempt=torch.ones(4, dtype=torch.bool))
        _, aux3 = model(ids, return_aux=True, capacity_factor=1.0,
                        drop_exempt=torch.tensor([True, False, False, False]))
    assert float(aux0["dropped_frac"]) == 0.0
    assert float(aux1["dropped_frac"]) > 0.0 and not torch.equal(plain, dropped)
    assert float(aux2["dropped_frac"]) == 0.0
    assert 0.0 < float(aux3["dropped_frac"]) < float(aux1["dropped_frac"]) + 1e-6
    assert aux0["expert_load"].shape == (1, 8) and int(aux0["expert_load"].sum()) == 4 * 16 * 2


# ---- layer rule and the MoE layer as a whole --------------------------------------------------------
@pytest.mark.parametrize("first_k, freq, layers, moe", [
    (0, 1, 3, [1, 1, 1]), (1, 1, 3, [0, 1, 1]), (2, 1, 4, [0, 0, 1, 1]), (1, 2, 6, [0, 0, 1, 0, 1, 0]),
    (0, 3, 7, [1, 0, 0, 1, 0, 0, 1]), (5, 1, 3, [0, 0, 0]),
])
def test_moe_layer_rule(first_k: int, freq: int, layers: int, moe: list[int]) -> None:
    cfg = ModelConfig.from_preset("tiny", first_k_dense_replace=first_k, moe_layer_freq=freq,
                                  num_hidden_layers=layers)
    assert [int(cfg.is_moe_layer(i)) for i in range(layers)] == moe
    model = DeepseekV2(cfg, device="meta")
    assert [int(isinstance(layer.mlp, MoE)) for layer in model.layers] == moe
    for layer in model.layers:
        if isinstance(layer.mlp, MLP):
            assert layer.mlp.gate_proj.weight.shape == (cfg.intermediate_size, cfg.hidden_size)
        else:
            assert layer.mlp.shared_experts.gate_proj.weight.shape == (
                cfg.moe_intermediate_size * cfg.n_shared_experts, cfg.hidden_size)
            assert layer.mlp.experts.gate_proj.shape == (8, cfg.moe_intermediate_size, cfg.hidden_size)
            assert layer.mlp.gate.weight.shape == (8, cfg.hidden_size)


def test_dense_model_has_no_moe() -> None:
    cfg = ModelConfig.from_preset("tiny", n_routed_experts=None)
    assert not any(isinstance(layer.mlp, MoE) for layer in DeepseekV2(cfg, device="meta").layers)


@pytest.mark.parametrize("overrides", [
    dict(norm_topk_prob=True, routed_scaling_factor=2.5),
    dict(routed_scaling_factor=16.0, topk_method="greedy", n_group=1, topk_group=1, n_shared_experts=2),
    dict(num_experts_per_tok=1, norm_topk_prob=True, routed_scaling_factor=3.0),
])
def test_moe_layer_matches_float64_reference(overrides: dict) -> None:
    cfg = ModelConfig.from_preset("tiny", **overrides)
    model = DeepseekV2(cfg)
    randomize_(model, seed=33, std=0.2)
    moe: MoE = model.layers[1].mlp
    x = torch.randn(2, 10, cfg.hidden_size)
    with torch.no_grad():
        got = moe(x)
    w = {k: v.double() for k, v in moe.state_dict().items()}

    def swiglu(v, g, u, d):
        return (F.silu(v @ g.T) * (v @ u.T)) @ d.T

    want = torch.zeros(2, 10, cfg.hidden_size, dtype=torch.float64)
    for b in range(2):
        for t in range(10):
            v = x[b, t].double()
            logits = (w["gate.weight"] @ v).tolist()
            idx, gates = ref_route_token(logits, cfg.num_experts_per_tok, cfg.topk_method, cfg.n_group,
                                         cfg.topk_group, cfg.norm_topk_prob, cfg.routed_scaling_factor)
            out = swiglu(v, w["shared_experts.gate_proj.weight"], w["shared_experts.up_proj.weight"],
                         w["shared_experts.down_proj.weight"])
            for e, g in zip(idx, gates):
                out = out + g * swiglu(v, w["experts.gate_proj"][e], w["experts.up_proj"][e],
                                       w["experts.down_proj"][e])
            want[b, t] = out
    assert rel_err(got, want) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_token_inference_path_equals_the_sorted_dispatch(dtype: torch.dtype) -> None:
    """A decode token skips sort / gather / scatter (Experts.one_token), yet adds the same picks in the same
    order: bitwise the sorted dispatch's result (forced by passing keep), for the plain module and the CPU
    policy's, and close to the per-token reference."""
    plain = _experts().to(dtype)
    policy = CpuExperts(8, 16, 12).to(dtype)
    policy.load_state_dict(plain.state_dict())
    for ex in (plain, policy):
        for seed in range(5):
            g = torch.Generator().manual_seed(seed)
            x, r = torch.randn(1, 16, generator=g).to(dtype), route(torch.randn(1, 8, generator=g), 3)
            with torch.no_grad():
                got = ex(x, r.idx, r.weight)
                want = ex(x, r.idx, r.weight, torch.ones_like(r.idx, dtype=torch.bool))  # the sorted path
            assert got.dtype == dtype and torch.equal(got, want)
            ref = _experts().double()
            ref.load_state_dict({k: v.double() for k, v in plain.state_dict().items()})
            with torch.no_grad():
                assert rel_err(got, ref.forward_reference(x.double(), r.idx, r.weight.double())) <= (
                    1e-5 if dtype == torch.float32 else 3e-2)


def test_bf16_router_weight_widened_once_and_refreshed_after_updates() -> None:
    """Inference on a bf16 MoE widens the router weight to fp32 once (not per call) and picks up in-place
    updates of the weight; the logits are those of the fp32 weight, checked against float64."""
    cfg = ModelConfig.from_preset("tiny")
    model = DeepseekV2(cfg, dtype=torch.bfloat16)
    randomize_(model, seed=5, std=0.2)
    moe: MoE = model.layers[1].mlp
    x = torch.randn(6, cfg.hidden_size).to(torch.bfloat16)

    def want_idx() -> torch.Tensor:
        logits = x.double() @ moe.gate.weight.double().T
        return route(logits, cfg.num_experts_per_tok, cfg.topk_method, cfg.n_group, cfg.topk_group).idx

    with torch.no_grad():
        r = moe.route(x)
        first = moe.__dict__["_gate_fp32"][1]
        assert torch.equal(moe.route(x).idx, r.idx) and moe.__dict__["_gate_fp32"][1] is first  # cached
        assert torch.equal(r.idx, want_idx())
        moe.gate.weight.mul_(-1)  # an in-place update: the cache must follow
        r2 = moe.route(x)
        assert moe.__dict__["_gate_fp32"][1] is not first and torch.equal(r2.idx, want_idx())
    r3 = moe.route(x)  # with autograd on: no cache, gradients reach the weight
    r3.weight.sum().backward()
    assert moe.gate.weight.grad is not None
