"""Balance losses against a float64 per-sequence re-computation of DeepSeek-V2 §2.2.3, token dropping
against its capacity rule, and the trainer's evaluation never dropping tokens."""

from __future__ import annotations

import math

import pytest
import torch

from dsv2 import DeepseekV2, ModelConfig
from dsv2.model.moe import (
    Routing,
    comm_balance_loss,
    device_balance_loss,
    drop_tokens,
    expert_balance_loss,
    route,
)
from dsv2.train.data import bytes_per_token, train_tokenizer
from dsv2.train.trainer import evaluate


# ---- float64 reference, written from the formulas (loops, no vectorisation) --------------------
def ref_losses(scores: list[list[list[float]]], idx: list[list[list[int]]], n_group: int,
               topk_group: int) -> tuple[float, float, float]:
    """(expert, device, comm) balance losses, each averaged over the B sequences."""
    b = len(scores)
    tot = [0.0, 0.0, 0.0]
    for s_seq, i_seq in zip(scores, idx):
        t, e, k = len(s_seq), len(s_seq[0]), len(i_seq[0])
        per_dev = e // n_group
        f = [e / (k * t) * sum(1 for tok in i_seq if i in tok) for i in range(e)]
        p = [sum(s_seq[tt][i] for tt in range(t)) / t for i in range(e)]
        tot[0] += sum(f[i] * p[i] for i in range(e))
        devs = [range(d * per_dev, (d + 1) * per_dev) for d in range(n_group)]
        f_dev = [sum(f[i] for i in ex) / per_dev for ex in devs]
        p_dev = [sum(p[i] for i in ex) for ex in devs]
        tot[1] += sum(f_dev[d] * p_dev[d] for d in range(n_group))
        sent = [n_group / (topk_group * t) * sum(1 for tok in i_seq if any(i // per_dev == d for i in tok))
                for d in range(n_group)]
        tot[2] += sum(sent[d] * p_dev[d] for d in range(n_group))
    return tot[0] / b, tot[1] / b, tot[2] / b


def fixed_routing(b: int, t: int, e: int, k: int, n_group: int, topk_group: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    logits = 2 * torch.randn(b * t, e, generator=g, dtype=torch.float64)
    r = route(logits, k, "group_limited_greedy" if n_group > 1 else "greedy", n_group, topk_group)
    scores = logits.softmax(-1).view(b, t, e)  # float64 affinities
    return scores, r.idx.view(b, t, k)


@pytest.mark.parametrize("b, t, e, k, g, m", [(1, 5, 4, 1, 1, 1), (2, 16, 8, 2, 4, 2), (3, 9, 16, 6, 8, 3),
                                              (2, 12, 6, 3, 3, 3)])
def test_balance_losses_match_float64_formulas(b: int, t: int, e: int, k: int, g: int, m: int) -> None:
    scores, idx = fixed_routing(b, t, e, k, g, m, seed=b * 100 + e)
    want = ref_losses(scores.tolist(), idx.tolist(), g, m)
    got = (expert_balance_loss(scores, idx), device_balance_loss(scores, idx, g),
           comm_balance_loss(scores, idx, g, m))
    # rel 1e-6: the counts f_i are formed in fp32 (exact integers, one fp32 rounding of E/(K T))
    for name, w, x in zip(("expert", "device", "comm"), want, got):
        assert math.isclose(float(x), w, rel_tol=1e-6, abs_tol=1e-9), f"{name}: {float(x)} vs {w}"


def test_perfectly_balanced_routing_gives_loss_one() -> None:
    # uniform scores, each expert picked equally often: f_i = 1, P_i = 1/E -> Σ f P = 1
    e, t = 4, 4  # top-2
    scores = torch.full((1, t, e), 1 / e, dtype=torch.float64)
    idx = torch.tensor([[[0, 1], [2, 3], [0, 2], [1, 3]]])
    assert float(expert_balance_loss(scores, idx)) == pytest.approx(1.0, abs=1e-12)
    assert ref_losses(scores.tolist(), idx.tolist(), 2, 2)[0] == pytest.approx(1.0, abs=1e-12)


def test_model_aux_losses_are_the_weighted_per_layer_sum() -> None:
    """Model wiring: aux = α1·Σ_layers expert + α2·Σ device + α3·Σ comm, each from that layer's routing."""
    cfg = ModelConfig.from_preset("tiny", aux_loss_alpha=0.003, device_aux_loss_alpha=0.05,
                                  comm_aux_loss_alpha=0.02)
    model = DeepseekV2(cfg)
    for moe in model.moe_layers():  # a decisive router, so routing is not a near-tie lottery
        moe.gate.weight.data.mul_(50)
    ids = torch.randint(0, cfg.vocab_size, (2, 24))
    _, aux = model(ids, return_aux=True)
    want = [0.0, 0.0, 0.0]
    for moe in model.moe_layers():
        r = moe.last_routing
        s = r.scores.double().view(2, 24, -1).tolist()
        ix = r.idx.view(2, 24, -1).tolist()
        for j, v in enumerate(ref_losses(s, ix, cfg.n_group, cfg.topk_group)):
            want[j] += v
    for j, key in enumerate(("expert_loss", "device_loss", "comm_loss")):
        assert float(aux[key].detach()) == pytest.approx(want[j], rel=1e-5), key
    weighted = 0.003 * want[0] + 0.05 * want[1] + 0.02 * want[2]
    assert float(aux["aux_loss"].detach()) == pytest.approx(weighted, rel=1e-5)
    load = aux["expert_load"]
    assert load.shape == (len(model.moe_layers()), cfg.n_routed_experts)
    assert load.sum(-1).tolist() == [2 * 24 * cfg.num_experts_per_tok] * load.shape[0]


# ---- token dropping ------------------------------------------------------------------------------
@pytest.mark.parametrize("cf", [0.5, 1.0, 1.5])
def test_dropping_respects_capacity_and_drops_lowest_affinity(cf: float) -> None:
    n, e, k, g = 64, 8, 2, 4
    logits = 3 * torch.randn(n, e, generator=torch.Generator().manual_seed(3))
    logits[:, :2] += 2.0  # skew towards device 0 so it overflows
    r: Routing = route(logits, k, "greedy")
    exempt = torch.zeros(n, dtype=torch.bool)
    exempt[::10] = True  # ~10% of tokens never dropped
    keep = drop_tokens(r, g, cf, exempt)
    cap = math.ceil(cf * n * k / g)
    dev = r.idx // (e // g)
    aff = r.scores.gather(1, r.idx)
    assert keep[exempt].all(), "exempt tokens are never dropped"
    for d in range(g):
        on_d = dev == d
        free = on_d & ~exempt[:, None]
        n_exempt = int((on_d & exempt[:, None]).sum())
        kept_free = int((keep & free).sum())
        assert kept_free + n_exempt <= max(cap, n_exempt), f"device {d} over capacity"
        if int(on_d.sum()) <= cap:
            assert keep[on_d].all(), f"device {d} under capacity must drop nothing"
        dropped, kept = aff[free & ~keep], aff[free & keep]
        if dropped.numel() and kept.numel():
            assert dropped.max() <= kept.min(), f"device {d} dropped a higher-affinity pick"


def test_training_forward_drops_but_trainer_evaluation_never_does(tmp_path) -> None:
    cfg = ModelConfig.from_preset("tiny", topk_method="greedy", n_group=4, topk_group=4)
    model = DeepseekV2(cfg)
    for moe in model.moe_layers():  # everything routed to experts 0-1 (device 0): must overflow
        moe.gate.weight.data.zero_()
        moe.gate.weight.data[:2] = 1.0
    ids = torch.randint(3, cfg.vocab_size, (4, 32))
    _, aux = model(ids, return_aux=True, capacity_factor=1.0)
    assert float(aux["dropped_frac"]) > 0.3
    seen: list = []
    for moe in model.moe_layers():
        orig = moe.forward
        moe.forward = lambda x, *a, _o=orig, **kw: (seen.append(kw.get("capacity_factor")), _o(x, *a, **kw))[1]
    tok = train_tokenizer(["hello world " * 50], 300)
    bpt = bytes_per_token(tok)
    bpt = torch.cat([bpt, torch.ones(cfg.vocab_size - bpt.numel(), dtype=torch.int64)])
    val = torch.randint(3, cfg.vocab_size, (3, 17))
    res = evaluate(model, val, 2, None, bpt, torch.device("cpu"))
    assert seen and all(c is None for c in seen), "evaluation must not pass a capacity factor"
    with torch.no_grad():
        logits = model(val[:, :-1])
    nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), val[:, 1:].flatten(), reduction="sum")
    assert res["val_loss"] == pytest.approx(float(nll) / val[:, 1:].numel(), rel=1e-5)
    assert res["val_bpb"] == pytest.approx(float(nll) / math.log(2) / float(bpt[val[:, 1:]].sum()), rel=1e-5)
    assert model.training, "evaluate restores train mode"
