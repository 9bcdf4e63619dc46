"""The paged attention backend against the model's dense reference cache: mixed prefill + decode steps
over scattered blocks, every cache format, random chunking; block-by-block LSE prefill vs one-shot SDPA."""

from __future__ import annotations

import random
from contextlib import ExitStack

import pytest
import torch

from dsv2.engine import Engine
from dsv2.engine.attention import merge_lse, sdpa_lse, slot_runs
from dsv2.engine.runner import SeqWork
from dsv2.model import DenseCache

from .test_engine import tiny_model

FORMATS = ["fp32", "bf16", "fp8", "int8", "int4", "mixed"]


@pytest.fixture(scope="module")
def models() -> dict:
    return {"mla": tiny_model("mla"), "gqa": tiny_model("gqa")}


def _roundtrip(eng: Engine):
    """Rows -> rows as the engine's cache format stores them (the dense reference's `store`)."""
    fmt = eng.cache.format

    def store(rows: torch.Tensor) -> torch.Tensor:
        flat = rows.reshape(-1, rows.shape[-1])
        return fmt.decode(fmt.encode(flat)).to(rows.dtype).view(rows.shape)
    return store


def _scattered(eng: Engine, held: ExitStack) -> None:
    """Occupy every other block (until `held` closes), so the sequences' blocks are not contiguous."""
    holds = [eng.reserve(eng.cache.block_size) for _ in range(eng.cache.num_blocks)]
    for h in holds:
        h.__enter__()
    for h in holds[1::2]:
        h.__exit__(None, None, None)
    held.callback(lambda: [h.__exit__(None, None, None) for h in holds[::2]])


def _reserve(eng: Engine, held: ExitStack, tokens: int) -> list[int]:
    return held.enter_context(eng.reserve(tokens))


@pytest.mark.parametrize("kv", FORMATS)
@pytest.mark.parametrize("attn", ["mla", "gqa"])
@pytest.mark.parametrize("seed", [0, 1])
def test_mixed_steps_equal_the_dense_reference(models, kv: str, attn: str, seed: int) -> None:
    """Steps that mix prompt chunks of some sequences with single tokens of others, over scattered
    blocks, give at every position the logits of one plain forward through a DenseCache that keeps rows
    as the format stores them (fp32 model; exact formats to 1e-5)."""
    if attn != "mla" and kv == "mixed":
        pytest.skip("mixed splits c_kv | k_R: MLA only")
    model = models[attn]
    rng = random.Random(seed)
    eng = Engine(model, kv_cache_dtype=kv, max_tokens=1024, block_size=4, key_block=rng.choice([3, 8, 64]))
    held = ExitStack()
    _scattered(eng, held)
    seqs = []
    for _ in range(4):
        toks = [rng.randrange(model.config.vocab_size) for _ in range(rng.randint(1, 40))]
        seqs.append({"toks": toks, "done": 0, "slots": _reserve(eng, held, len(toks)), "logits": []})
    while any(s["done"] < len(s["toks"]) for s in seqs):
        live = [s for s in seqs if s["done"] < len(s["toks"])]
        step = rng.sample(live, rng.randint(1, len(live)))
        work = []
        for s in step:
            n = rng.choice([1, 1, rng.randint(1, 16)])
            work.append(SeqWork(s["slots"], s["done"], s["toks"][s["done"]: s["done"] + n], "all"))
            s["done"] += len(work[-1].tokens)
        for s, out in zip(step, eng.runner.execute(work)):
            s["logits"].append(out)
    store = None if kv == "fp32" else _roundtrip(eng)
    tol = 1e-5 if kv == "fp32" else 1e-4  # lossy formats: rows rounded from fp32 inputs that differ by ~1e-7
    for s in seqs:
        with torch.no_grad():
            want = model(torch.tensor([s["toks"]]), cache=DenseCache(store))[0]
        torch.testing.assert_close(torch.cat(s["logits"]), want, rtol=tol, atol=tol)


@pytest.mark.parametrize("decode_impl", ["fast", "gathered"])
def test_decode_impls_and_a_cached_prefix(models, decode_impl: str) -> None:
    """A prompt prefilled in two parts (the second on top of the cached first), then decode steps of three
    sequences at once: each step's logits equal the full forward at that position."""
    model = models["mla"]
    eng = Engine(model, max_tokens=512, block_size=4, decode_impl=decode_impl, decode_chunk=5)
    held = ExitStack()
    _scattered(eng, held)
    prompts = [[(7 * i + 3 + j) % 500 for i in range(n)] for j, n in enumerate((45, 9, 23))]
    slots = [_reserve(eng, held, len(p) + 3) for p in prompts]
    first = eng.runner.execute([SeqWork(s, 0, p[:30]) for s, p in zip(slots, prompts)])
    rest = eng.runner.execute([SeqWork(s, 30, p[30:]) for s, p in zip(slots, prompts) if len(p) > 30])
    with torch.no_grad():
        torch.testing.assert_close(first[0], model(torch.tensor([prompts[0][:30]]))[0, -1], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(rest[0], model(torch.tensor([prompts[0]]))[0, -1], rtol=1e-5, atol=1e-5)
    seqs = [list(p) for p in prompts]
    for t in range(3):
        out = eng.runner.execute([SeqWork(s, len(q), [11 + t]) for s, q in zip(slots, seqs)])
        for q, got in zip(seqs, out):
            q.append(11 + t)
            with torch.no_grad():
                torch.testing.assert_close(got, model(torch.tensor([q]))[0, -1], rtol=1e-5, atol=1e-5)


def test_blockwise_lse_attention_equals_one_shot_sdpa() -> None:
    """Keys split into blocks (prefix without mask, own tokens causal) and merged by log-sum-exp give
    what one SDPA over all keys gives, with the queries at the end."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 3, 7, 16, generator=g)
    k, v = torch.randn(1, 3, 30, 16, generator=g), torch.randn(1, 3, 30, 16, generator=g)
    ctx = 23
    mask = torch.arange(30)[None, :] <= torch.arange(ctx, 30)[:, None]  # (7,30)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3)
    for block in (1, 5, 23):
        acc = None
        for a in range(0, ctx, block):
            b = min(a + block, ctx)
            acc = merge_lse(acc, *sdpa_lse(q, k[:, :, a:b], v[:, :, a:b], 0.3, False))
        acc = merge_lse(acc, *sdpa_lse(q, k[:, :, ctx:], v[:, :, ctx:], 0.3, True))
        torch.testing.assert_close(acc[0], want, rtol=1e-5, atol=1e-6)


def test_slot_runs_merge_consecutive_blocks() -> None:
    assert slot_runs([3, 4, 9, 10, 11], 18, 4) == ((12, 8), (36, 10))
    assert slot_runs([5], 0, 4) == ()
    with pytest.raises(IndexError, match="need 2 blocks"):
        slot_runs([1], 5, 4)


@pytest.mark.parametrize("first", [10, 62])
@pytest.mark.parametrize("kv", ["fp32", "int8"])
def test_prefix_attended_absorbed_or_expanded(models, first: int, kv: str) -> None:
    """A chunk on top of a cached prefix: 62 cached + 8 new tokens attend the prefix absorbed (few
    queries: scoring the latent is cheaper than decompressing it), 10 cached + 60 new expanded (key
    blocks of 16); both give the dense reference's logits."""
    model = models["mla"]
    eng = Engine(model, kv_cache_dtype=kv, max_tokens=256, block_size=4, key_block=16)
    toks = [(13 * i + 7) % 500 for i in range(70)]
    with eng.reserve(len(toks)) as blocks:
        eng.runner.execute([SeqWork(blocks, 0, toks[:first], "none")])
        got = eng.runner.execute([SeqWork(blocks, first, toks[first:], "all")])[0]
    store = None if kv == "fp32" else _roundtrip(eng)
    with torch.no_grad():
        want = model(torch.tensor([toks]), cache=DenseCache(store))[0, first:]
    tol = 1e-5 if kv == "fp32" else 1e-4
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
