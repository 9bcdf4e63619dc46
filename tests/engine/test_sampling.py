"""Sampling: parameter validation, filters against hand-written references, per-request seeding."""

from __future__ import annotations

import pytest
import torch

from dsv2.engine.sampling import (
    SamplingError,
    SamplingParams,
    apply_top_k,
    apply_top_p,
    greedy_ids,
    is_finished,
    make_generator,
    sample_batch,
    sample_token,
)


@pytest.mark.parametrize("field,value", [
    ("temperature", -0.5), ("temperature", float("nan")), ("top_p", 0.0), ("top_p", 1.5),
    ("top_k", -1), ("max_new_tokens", 0), ("seed", -3), ("stop_token_ids", (-1,)),
])
def test_invalid_params_name_the_field(field: str, value: object) -> None:
    with pytest.raises(SamplingError, match=f"SamplingParams.{field}"):
        SamplingParams(**{field: value})


def test_stop_ids_checked_against_vocab() -> None:
    with pytest.raises(SamplingError, match="stop_token_ids"):
        SamplingParams(stop_token_ids=[600]).validate(vocab_size=512)


def _ref_top_k(x: list[float], k: int) -> set[int]:
    order = sorted(range(len(x)), key=lambda i: -x[i])
    return set(order[:k])


def _ref_top_p(x: list[float], p: float) -> set[int]:
    probs = torch.tensor(x, dtype=torch.float64).softmax(0).tolist()
    order = sorted(range(len(x)), key=lambda i: -probs[i])
    kept, mass = set(), 0.0
    for i in order:
        kept.add(i)
        mass += probs[i]
        if mass >= p:
            break
    return kept


@pytest.mark.parametrize("k", [1, 3, 7])
def test_top_k_matches_reference(k: int) -> None:
    x = torch.randn(20, generator=torch.Generator().manual_seed(k))
    kept = set(torch.nonzero(apply_top_k(x, k) > float("-inf")).flatten().tolist())
    assert kept == _ref_top_k(x.tolist(), k)


@pytest.mark.parametrize("p", [0.05, 0.5, 0.9, 0.999])
def test_top_p_matches_reference(p: float) -> None:
    x = torch.randn(30, generator=torch.Generator().manual_seed(int(p * 1000))) * 2
    kept = set(torch.nonzero(apply_top_p(x, p) > float("-inf")).flatten().tolist())
    assert kept == _ref_top_p(x.tolist(), p)


def test_greedy_is_argmax_and_filters_restrict_support() -> None:
    x = torch.tensor([0.1, 3.0, 2.9, -1.0])
    assert sample_token(x, SamplingParams(), None) == 1
    sp = SamplingParams(temperature=1.0, top_k=2, seed=0)
    gen = make_generator(sp)
    draws = {sample_token(x, sp, gen) for _ in range(200)}
    assert draws == {1, 2}


def test_greedy_ids_of_low_precision_logits_are_the_first_maximum() -> None:
    """bf16 / fp16 logits (widened before the argmax): the index of the first largest value, ties included,
    as a hand-written scan finds it."""
    g = torch.Generator().manual_seed(3)
    for dt in (torch.bfloat16, torch.float16, torch.float32):
        x = (torch.randn(4, 1000, generator=g) * 4).to(dt)
        x[1, 10] = x[1, 900] = x[1].max() + 1  # a tie: the first one wins
        got = greedy_ids(x).tolist()
        for row, i in zip(x.tolist(), got):
            best = max(range(len(row)), key=lambda j: (row[j], -j))
            assert i == best, dt
        assert sample_token(x[1], SamplingParams(), None) == 10


def test_seed_reproducible_and_independent_of_batch() -> None:
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    sp = SamplingParams(temperature=0.9, top_p=0.95, seed=42)
    alone = [sample_token(logits[1], sp, g) for g in [make_generator(sp)] for _ in range(5)]
    g = make_generator(sp)
    others = [SamplingParams(temperature=1.0, seed=1), sp, SamplingParams()]
    gens = [make_generator(others[0]), g, None]
    in_batch = [sample_batch(logits, others, gens)[1] for _ in range(5)]
    assert alone == in_batch


def test_finish_reasons() -> None:
    sp = SamplingParams(max_new_tokens=3, stop_token_ids=[9])
    assert is_finished([1], sp) is None
    assert is_finished([1, 9], sp) == "stop"
    assert is_finished([1, 2, 3], sp) == "length"
