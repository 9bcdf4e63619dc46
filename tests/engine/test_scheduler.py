"""Scheduling policies end to end: on-demand blocks, preemption, prefix caching, abort, and a seeded fuzz
of add / abort / step whose invariants are checked every step (fp32 tiny model, tiny caches)."""

from __future__ import annotations

import random

import pytest

from dsv2.engine import Engine, SamplingParams

from .test_engine import PROMPTS, all_blocks_free, tiny_model

SYSTEM = [(11 * i + 5) % 500 for i in range(13)]  # a shared "system prompt" (3 full blocks of 4 + 1)


@pytest.fixture(scope="module")
def model():
    return tiny_model("mla")


def solo(model, prompt: list[int], params: SamplingParams, **kw) -> tuple[list[int], list]:
    """The request alone in a roomy engine: its tokens and log-probabilities."""
    eng = Engine(model, max_tokens=512, block_size=4, prefix_caching=False, **kw)
    req = eng.add_request(prompt, params)
    while eng.has_unfinished():
        eng.step()
    return req.output, req.logprobs


def run_all(eng: Engine, prompts: list[list[int]], params: list[SamplingParams]) -> list:
    reqs = [eng.add_request(p, sp) for p, sp in zip(prompts, params)]
    while eng.has_unfinished():
        eng.step()
        eng.scheduler.blocks.check_invariants()
    return reqs


def test_blocks_are_taken_on_demand(model) -> None:
    """A request asking for many tokens that stops early holds only the blocks its tokens fill."""
    eng = Engine(model, max_tokens=256, block_size=4)
    stop = solo(model, PROMPTS[0], SamplingParams(max_new_tokens=3))[0][-1]
    req = eng.add_request(PROMPTS[0], SamplingParams(max_new_tokens=200, stop_token_ids=[stop]))
    held = 0
    while eng.has_unfinished():
        eng.step()
        if req.status == "running":
            held = max(held, len(eng.scheduler.block_table(req)))
    assert req.finish_reason == "stop" and held == 2  # 5 prompt + 2 fed-back tokens: 2 blocks of 4, not 51


@pytest.mark.parametrize("sampled", [False, True])
def test_preempted_requests_produce_their_solo_tokens(model, sampled: bool) -> None:
    """A cache far too small for the batch: requests are preempted and recomputed (prompt + tokens so far)
    and still produce exactly what they produce alone (greedy, and seeded sampling: same generator)."""
    prompts = [PROMPTS[0], PROMPTS[3], list(range(40, 52)), [9, 8, 7, 6, 5, 4, 3]]
    params = [SamplingParams(max_new_tokens=20, temperature=0.9 if sampled else 0.0, seed=s) for s in range(4)]
    eng = Engine(model, max_tokens=40, block_size=4, max_batch=4, prefix_caching=False)
    reqs = run_all(eng, prompts, params)
    assert eng.stats.preemptions >= 2 and sum(r.num_preemptions > 0 for r in reqs) >= 1
    for r, p, sp in zip(reqs, prompts, params):
        assert r.output == solo(model, p, sp)[0]
    assert all_blocks_free(eng)


@pytest.mark.parametrize("kv", ["fp32", "bf16", "int8", "int4"])
def test_prefix_cache_hits_give_the_cold_results(model, kv: str) -> None:
    """Hit (same system prompt), partial hit (shares two blocks), miss, and a hit after the blocks were
    evicted by other traffic: tokens and log-probabilities equal a cold run's (rows are read as stored
    either way), while only the uncached part is computed."""
    sp = SamplingParams(max_new_tokens=4, logprobs=3)
    prompts = {"first": SYSTEM + [1, 2, 3], "hit": SYSTEM + [4, 5], "partial": SYSTEM[:9] + [7, 7, 7, 7],
               "miss": [3, 1, 4, 1, 5, 9, 2, 6]}
    eng = Engine(model, kv_cache_dtype=kv, max_tokens=64, block_size=4)
    got = {}
    for name, p in prompts.items():
        before = eng.stats.prefill_tokens
        (req,) = run_all(eng, [p], [sp])
        got[name] = (req, eng.stats.prefill_tokens - before)
    assert got["first"][0].num_cached_tokens == 0 and got["miss"][0].num_cached_tokens == 0
    assert got["hit"][0].num_cached_tokens == 12 and got["hit"][1] == len(prompts["hit"]) - 12
    assert got["partial"][0].num_cached_tokens == 8
    # evict: traffic that needs every block, then the system prompt again (a miss now: recomputed)
    run_all(eng, [list(range(100, 160))], [SamplingParams(max_new_tokens=2)])
    (again,) = run_all(eng, [prompts["hit"]], [sp])
    assert again.num_cached_tokens == 0
    for name, (req, _) in got.items():
        cold_out, cold_lp = solo(model, prompts[name], sp, kv_cache_dtype=kv)
        assert req.output == cold_out, name
        for a, b in zip(req.logprobs, cold_lp):
            assert a.logprob == pytest.approx(b.logprob, abs=1e-5 if kv != "fp32" else 1e-6)
    assert again.output == got["hit"][0].output
    assert eng.stats.prefix_hit_tokens == 12 + 8 and 0 < eng.stats.prefix_hit_rate < 1
    assert all_blocks_free(eng)


def test_abort_of_a_preempted_request(model) -> None:
    eng = Engine(model, max_tokens=40, block_size=4, max_batch=4, prefix_caching=False)
    reqs = [eng.add_request(p, SamplingParams(max_new_tokens=20)) for p in (PROMPTS[0], PROMPTS[3], PROMPTS[4])]
    while not any(r.num_preemptions for r in reqs):
        eng.step()
    victim = next(r for r in reqs if r.num_preemptions and r.status == "waiting")
    assert eng.abort(victim.rid) and victim.finish_reason == "abort"
    while eng.has_unfinished():
        eng.step()
    for r in reqs:
        if r is not victim:
            assert r.output == solo(model, r.prompt, r.params)[0]
    assert all_blocks_free(eng)


@pytest.mark.parametrize("seed", [0, 1])
def test_fuzz_add_abort_step(model, seed: int) -> None:
    """Random arrivals (prompts sharing prefixes), aborts and steps on a cache small enough to preempt:
    after every step no block is owned twice or leaked and reference counts match the tables; every
    request not aborted finishes with the tokens it produces alone."""
    rng = random.Random(seed)
    pool = [SYSTEM + [rng.randrange(500) for _ in range(rng.randint(1, 6))] for _ in range(5)]
    pool += [[rng.randrange(500) for _ in range(rng.randint(1, 20))] for _ in range(3)]
    eng = Engine(model, max_tokens=64, block_size=4, max_batch=4, max_num_batched_tokens=16, prefill_chunk=8)
    live, done, aborted = [], [], set()
    for _ in range(160):
        if rng.random() < 0.3:
            sp = SamplingParams(max_new_tokens=rng.randint(1, 12), temperature=rng.choice([0.0, 1.0]),
                                seed=rng.randrange(100))
            live.append(eng.add_request(rng.choice(pool), sp))
        if live and rng.random() < 0.08:
            r = rng.choice(live)
            if eng.abort(r.rid):
                aborted.add(r.rid)
        eng.step()
        eng.scheduler.blocks.check_invariants()
        for r in eng.scheduler.running:
            assert len(eng.scheduler.block_table(r)) * 4 >= r.num_computed
        done += [r for r in live if r.status != "running" and r.status != "waiting"]
        live = [r for r in live if r.status in ("running", "waiting")]
    while eng.has_unfinished():
        eng.step()
        eng.scheduler.blocks.check_invariants()
    done += live
    assert len(done) > 20 and eng.stats.prefix_hit_tokens > 0
    for r in done:
        if r.rid in aborted:
            assert r.finish_reason == "abort"
        else:
            assert r.output == solo(model, r.prompt, r.params)[0], (r.rid, r.num_preemptions)
    assert all_blocks_free(eng)
