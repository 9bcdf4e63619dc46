"""The compiled decode step (EngineConfig(compile=True), dsv2.engine.compiled) against the eager engine.

Fast tests check the pieces the graph is made of, eagerly: the static experts formulation against the
sorted dispatch, and the decode step's tensor-only attention (slots computed from padded block tables,
padded batch) against the eager engine's logits. The slow test compiles (inductor, C++ GEMM templates,
C++ wrapper): greedy tokens equal and log-probabilities within 1e-5 (fp32) of the eager engine, with
prefill steps eager and decode steps compiled, at batch 1 and 2 (two graphs).
"""

from __future__ import annotations

import pytest
import torch

from dsv2.config import ModelConfig
from dsv2.engine import Engine, SamplingParams
from dsv2.engine.compiled import CompiledDecode, is_decode_step
from dsv2.engine.runner import SeqWork
from dsv2.model import DeepseekV2
from dsv2.model.moe import Experts


def tiny_model(seed: int = 1, dtype: torch.dtype = torch.float32, **kw) -> DeepseekV2:
    model = DeepseekV2(ModelConfig.from_preset("tiny", **kw), dtype=dtype).eval()
    model.reset_parameters(seed=seed)
    with torch.no_grad():  # a decisive router (no near-ties between experts)
        for moe in model.moe_layers():
            moe.gate.weight.mul_(50)
    return model


@pytest.mark.parametrize("n", [1, 3])
def test_static_experts_equal_dispatch(n: int) -> None:
    ex = Experts(6, 16, 24)
    for p in ex.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(n, 16)
    idx = torch.stack([torch.randperm(6)[:2] for _ in range(n)])
    weight = torch.rand(n, 2)
    want = ex(x, idx, weight)
    got = Experts.gathered(x, idx, weight, ex.gate_proj, ex.up_proj, ex.down_proj)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_is_decode_step() -> None:
    assert is_decode_step([SeqWork([0], 5, [1]), SeqWork([1], 9, [2])])
    assert not is_decode_step([SeqWork([0], 5, [1]), SeqWork([1], 0, [2])])  # a one-token prompt
    assert not is_decode_step([SeqWork([0], 5, [1, 2])])  # a prefill chunk
    assert not is_decode_step([SeqWork([0], 5, [1], "none")])


def test_long_contexts_decode_eagerly_over_a_quantised_cpu_cache() -> None:
    """Beyond MAX_CPU_ROWS the compiled step declines a quantised cache (the engine runs it eagerly), not a
    plain one (read through the block tables); nothing compiles here."""
    lim = CompiledDecode.MAX_CPU_ROWS
    long = [SeqWork([0], lim - 1, [1]), SeqWork([1], lim, [2])]
    quant = Engine(tiny_model(), max_tokens=4096, block_size=16, compile=True, kv_cache_dtype="int8")
    assert quant.runner.compiled.supports([SeqWork([0], lim - 1, [1])])
    assert not quant.runner.compiled.supports(long)
    plain = Engine(tiny_model(), max_tokens=4096, block_size=16, compile=True)
    assert plain.runner.compiled.supports(long)
    assert not plain.runner.compiled.supports([SeqWork([0], 5, [1, 2])])


@pytest.mark.parametrize("attn", ["mla", "gqa"])
def test_decode_step_eagerly_equals_engine(attn: str) -> None:
    """The graph's function run eagerly (no torch.compile): padded batch of 3 -> 4 with the last sequence
    repeated, block tables padded, rows written at slots computed in the step; == the eager engine's
    decode logits, and the cache rows it writes are the eager ones."""
    model = tiny_model(**({} if attn == "mla" else {"attention_type": "gqa", "num_key_value_heads": 2}))
    prompts = [[1, 5, 9, 33, 7], list(range(10, 80)), [3, 4]]
    eng = Engine(model, max_tokens=512, block_size=16)
    reqs = [eng.add_request(p, SamplingParams(max_new_tokens=4)) for p in prompts]
    while any(r.num_computed < len(r.prompt) for r in reqs):
        eng.step()  # prefill (eager) and sample each request's first token
    work = [SeqWork(eng.scheduler.block_table(r), r.num_computed, r.next_tokens(1)) for r in reqs]
    assert is_decode_step(work)
    tensors = [t for pool in eng.cache.pools for t in pool]
    before = [t.clone() for t in tensors]
    want = torch.stack(eng.runner.execute(work))  # eager step: writes this step's rows
    rows_eager = [t.clone() for t in tensors]
    for t, saved in zip(tensors, before):
        t.copy_(saved)
    cd = CompiledDecode(model, eng.cache)
    with torch.inference_mode():
        ids, pos, tables = cd.inputs(work)
        assert ids.shape == (4,) and tables.shape[1] * 16 >= CompiledDecode.MIN_ROWS
        got = cd._step(ids, pos, tables)[: len(work)]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for a, b in zip(tensors, rows_eager):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.slow
def test_compiled_engine_equals_eager() -> None:
    """Compiles two graphs (batch buckets 1 and 2): ~50 s on 2 shared cores."""
    prompts = [[1, 5, 9, 33, 7], list(range(10, 40))]
    sp = SamplingParams(max_new_tokens=12, logprobs=2)
    outs = {}
    for compile_ in (False, True):
        eng = Engine(tiny_model(), max_tokens=512, block_size=16, compile=compile_)
        solo = eng.add_request(prompts[0], sp)  # batch 1 ...
        while len(solo.output) < 4:
            eng.step()
        other = eng.add_request(prompts[1], sp)  # ... then batch 2 while the other joins
        while eng.has_unfinished():
            eng.step()
        outs[compile_] = (solo, other)
        if compile_:
            assert sorted(eng.runner.compiled.graphs) == [(1, 16), (2, 16)]
    for a, b in zip(outs[False], outs[True]):
        assert a.output == b.output
        for la, lb in zip(a.logprobs, b.logprobs):
            assert abs(la.logprob - lb.logprob) < 1e-5
            assert [t for t, _ in la.top] == [t for t, _ in lb.top]


@pytest.mark.parametrize("weights, act8", [("int8", False), ("int4", False), ("int8", True)])
def test_compiled_quantised_engine_equals_eager(weights: str, act8: bool) -> None:
    """int8 / int4 linears and routed experts inside the compiled step run as the opaque ops dsv2::int8_mm /
    dsv2::int4_mm / dsv2::quant_experts (the same C kernels and routing as eagerly, int8 activations
    included): the same greedy tokens, log-probabilities within 1e-5 (fp32 activations), no bucket left to
    eager. One graph, ~25 s."""
    from dsv2.quant.swap import quantize_model

    prompt = [1, 5, 9, 33, 7]
    sp = SamplingParams(max_new_tokens=10, logprobs=2)
    outs = {}
    for compile_ in (False, True):
        model = tiny_model()
        quantize_model(model, weights, 32)
        eng = Engine(model, max_tokens=256, block_size=16, compile=compile_, int8_activations=act8)
        req = eng.add_request(prompt, sp)
        while eng.has_unfinished():
            eng.step()
        outs[compile_] = req
        if compile_:
            assert sorted(eng.runner.compiled.graphs) == [(1, 16)] and not eng.runner.compiled.failed
    a, b = outs[False], outs[True]
    assert a.output == b.output
    for la, lb in zip(a.logprobs, b.logprobs):
        assert abs(la.logprob - lb.logprob) < 1e-5


def test_compiled_emulated_bf16_engine_equals_eager(monkeypatch) -> None:
    """Where bf16 is emulated (forced here on any machine) the compiled step's bf16 linears are the opaque op
    dsv2::emulated_linear: dsv2's C GEMV / GEMM on the weights as stored, as eagerly, instead of fp32 copies
    frozen into the graph: the op called by the compiled graph for the linears, no fp32 copy made, and the
    first decode step's distribution the eager one within bf16 rounding (the random bf16 model's top tokens
    lie within 1e-3 of each other, so later tokens may differ by rounding alone). One graph, ~20 s."""
    from dsv2 import precision
    from dsv2.quant import native

    lib = native.library()
    if lib is None:
        pytest.skip("no C compiler: the C kernels cannot be built here")
    monkeypatch.setitem(precision._NATIVE, torch.bfloat16, False)
    native.gemm_kind(lib)  # the build flags, read once: set as on an AVX2 build, through the accessor the
    monkeypatch.setitem(native._state["flags"][1], "dsv2_gemm_fast", 2)  # graph's tracing calls
    assert native.gemm_kind(lib) == 2
    calls: list[tuple[int, ...]] = []
    eager_linear = precision._emulated_linear

    def counted(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, **kw: bool) -> torch.Tensor | None:
        calls.append(tuple(x.shape))
        return eager_linear(x, w, b, **kw)

    monkeypatch.setattr(precision, "_emulated_linear", counted)
    sp = SamplingParams(max_new_tokens=4, logprobs=5)
    outs, counts = {}, {}
    for compile_ in (False, True):
        model = tiny_model(dtype=torch.bfloat16)
        eng = Engine(model, max_tokens=256, block_size=16, compile=compile_)
        req = eng.add_request([1, 5, 9, 33, 7], sp)
        eng.step()  # the prompt: eager both ways
        eng.step()  # the first decode step (compiles the graph)
        calls.clear()
        while eng.has_unfinished():  # decode steps through the compiled graph: nothing is traced any more, so
            eng.step()  # every call counted below is the graph calling back into the eager kernels
        outs[compile_], counts[compile_] = req, len(calls)
        assert not any(hasattr(m, "_packed") for m in model.modules())
        if compile_:
            assert sorted(eng.runner.compiled.graphs) == [(1, 16)] and not eng.runner.compiled.failed
    # every linear of a decode step through dsv2's kernels both ways (compiled: more calls, as the compiled
    # step keeps gate and up apart)
    assert counts[True] >= counts[False] > 0
    a, b = outs[False], outs[True]
    assert a.output[0] == b.output[0]
    first = [dict(r.logprobs[1].top) for r in (a, b)]  # the first decode step, from the same inputs
    common = first[0].keys() & first[1].keys()
    assert len(common) >= 4
    assert max(abs(first[0][t] - first[1][t]) for t in common) < 0.02


def test_paged_latent_decode_matches_float64() -> None:
    """The compiled step's attention op over a paged pool (blocks out of order, a run of consecutive ones, a
    partly filled last block, a padded batch row) against softmax(q·rowsᵀ·scale) @ rows[:, :C] in float64."""
    from dsv2.engine.compiled import paged_latent_decode

    g = torch.Generator().manual_seed(0)
    nb, bs, c, r, h = 12, 4, 16, 8, 3
    pool = torch.randn(nb, bs, c + r, generator=g).bfloat16()
    tables = torch.tensor([[5, 6, 7, 2, 0], [9, 3, 0, 0, 0], [9, 3, 0, 0, 0]])  # row 2: padding, a copy of 1
    pos = torch.tensor([14, 5, 5])  # tokens 0..pos: 15 rows over 4 blocks, 6 rows over 2
    q = torch.randn(3, h, c + r, generator=g).bfloat16()
    q[2] = q[1]  # the padding row repeats the last sequence, query included
    out = paged_latent_decode(q, pool, tables, pos, c, 0.3)
    assert out.shape == (3, h, c) and out.dtype == torch.float32
    flat = pool.view(-1, c + r).double()
    for b in range(3):
        slots = [tables[b, t // bs].item() * bs + t % bs for t in range(pos[b].item() + 1)]
        rows = flat[slots]
        p = torch.softmax(q[b].double() @ rows.T * 0.3, dim=-1)
        ref = p @ rows[:, :c]
        # bf16 scores and probabilities, as the eager decode rounds them
        torch.testing.assert_close(out[b].double(), ref, rtol=0, atol=3e-2 * ref.abs().max().item())
    assert torch.equal(out[1], out[2])
