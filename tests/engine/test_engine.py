"""Engine end to end (fp32, tiny configs): greedy tokens against a plain full-forward loop and against
transformers, continuous batching with joins/leaves, queuing when full, errors and failure isolation."""

from __future__ import annotations

from contextlib import ExitStack

import pytest
import torch

from dsv2.config import ModelConfig
from dsv2.engine import CacheError, Engine, GenerationError, RequestError, SamplingError, SamplingParams
from dsv2.model import DeepseekV2

ATTN = {"mla": {}, "mha": {"attention_type": "mha"}, "gqa": {"attention_type": "gqa", "num_key_value_heads": 2},
        "mqa": {"attention_type": "mqa"}}


def tiny_model(attn: str = "mla", seed: int = 1, **kw) -> DeepseekV2:
    cfg = ModelConfig.from_preset("tiny", **ATTN[attn], **kw)
    model = DeepseekV2(cfg).eval()
    model.reset_parameters(seed=seed)
    with torch.no_grad():  # a decisive router: a 0.02-std router has near-ties between experts
        for moe in model.moe_layers():
            moe.gate.weight.mul_(50)
    return model


def full_forward_greedy(model: DeepseekV2, prompt: list[int], n: int) -> list[int]:
    """The reference: re-run the whole sequence through the model for every new token, no cache."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


def all_blocks_free(eng: Engine) -> bool:
    """No request holds a block (cached blocks of finished requests count as free: evictable)."""
    eng.scheduler.blocks.check_invariants()
    return eng.scheduler.blocks.num_free == eng.cache.num_blocks


PROMPTS = [[1, 5, 9, 33, 7], [1, 7], [3] * 70, list(range(10, 31)), [100, 200, 300]]
MAX_NEW = [8, 3, 12, 6, 10]


@pytest.fixture(scope="module")
def mla_model() -> DeepseekV2:
    return tiny_model("mla")


@pytest.fixture(scope="module")
def mla_refs(mla_model: DeepseekV2) -> list[list[int]]:
    return [full_forward_greedy(mla_model, p, n) for p, n in zip(PROMPTS, MAX_NEW)]


@pytest.mark.parametrize("attn", ["mla", "mha", "gqa", "mqa"])
def test_generate_equals_full_forward_loop(attn: str, mla_model, mla_refs) -> None:
    model = mla_model if attn == "mla" else tiny_model(attn)
    refs = mla_refs if attn == "mla" else [full_forward_greedy(model, p, n) for p, n in zip(PROMPTS, MAX_NEW)]
    # a small batch cap and chunked prefill: requests join as others leave, prompts span chunks
    eng = Engine(model, max_tokens=256, block_size=8, max_batch=3, prefill_chunk=16)
    outs = eng.generate(PROMPTS, [SamplingParams(max_new_tokens=n) for n in MAX_NEW])
    assert outs == refs
    assert all_blocks_free(eng)  # everything released


def test_gathered_decode_generates_the_reference_tokens(mla_model, mla_refs) -> None:
    """decode_impl='gathered' (one padded batch through the model's attend_absorbed: the GPU-friendly
    path) under continuous batching gives the full-forward loop's tokens."""
    eng = Engine(mla_model, max_tokens=256, block_size=8, max_batch=3, prefill_chunk=16, decode_impl="gathered")
    assert eng.generate(PROMPTS, [SamplingParams(max_new_tokens=n) for n in MAX_NEW]) == mla_refs


def test_requests_join_and_leave_mid_flight(mla_model, mla_refs) -> None:
    eng = Engine(mla_model, max_tokens=512, block_size=4)
    reqs = {0: eng.add_request(PROMPTS[0], SamplingParams(max_new_tokens=MAX_NEW[0]))}
    arrivals = {2: 1, 3: 2, 5: 3, 9: 4}  # step -> prompt index joining then
    step = 0
    while not eng.scheduler.idle or len(reqs) < len(PROMPTS):
        if step in arrivals:
            i = arrivals[step]
            reqs[i] = eng.add_request(PROMPTS[i], SamplingParams(max_new_tokens=MAX_NEW[i]))
        eng.step()
        step += 1
    assert [reqs[i].output for i in range(len(PROMPTS))] == mla_refs
    assert eng.stats.max_running >= 3


def test_long_prefill_is_interleaved_with_decode(mla_model, mla_refs) -> None:
    """A prompt longer than prefill_chunk is prefilled over several steps while a running request keeps
    decoding; both end with the full-forward loop's tokens."""
    eng = Engine(mla_model, max_tokens=256, block_size=4, prefill_chunk=16)
    short = eng.add_request(PROMPTS[0], SamplingParams(max_new_tokens=MAX_NEW[0]))
    eng.step()  # the short prompt fits one chunk: prefilled, its first token sampled in this step
    assert len(short.output) == 1
    long = eng.add_request(PROMPTS[2], SamplingParams(max_new_tokens=MAX_NEW[2]))  # 70 tokens
    steps_while_prefilling, progress = 0, [0.0]
    while not long.output:
        assert long.status in ("waiting", "running"), long.error
        before = len(short.output)
        eng.step()
        if not long.output:
            steps_while_prefilling += 1
            assert len(short.output) == before + 1  # the short request went on decoding
            assert progress[-1] < long.prefill_progress < 1.0  # reported, growing
            progress.append(long.prefill_progress)
    assert steps_while_prefilling >= 2 and long.prefill_progress == 1.0
    while not eng.scheduler.idle:
        eng.step()
    assert [short.output, long.output] == [mla_refs[0], mla_refs[2]]


def test_stream_reports_each_step(mla_model) -> None:
    eng = Engine(mla_model, max_tokens=256, prefill_chunk=16)
    seen: list[list[float]] = []
    events = list(eng.stream([PROMPTS[2], PROMPTS[1]], SamplingParams(max_new_tokens=2),
                             on_step=lambda reqs: seen.append([r.prefill_progress for r in reqs])))
    assert len(events) == 4 and len(seen) == eng.stats.steps
    assert seen[0][0] < 1.0 and seen[0][1] == 1.0  # the 70-token prompt takes several steps, the 2-token one
    assert seen[-1] == [1.0, 1.0]


def test_impl_choices_are_checked(mla_model) -> None:
    with pytest.raises(ValueError, match="decode_impl"):
        Engine(mla_model, max_tokens=64, decode_impl="paged")
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        Engine(mla_model, max_tokens=64, max_batch=8, max_num_batched_tokens=4)
    from dsv2.engine.attention import choose_decode_impl

    cpu, gpu = torch.device("cpu"), torch.device("cuda")  # a device object needs no GPU
    assert choose_decode_impl(cpu, [5, 9, 700]) == "fast"
    assert choose_decode_impl(gpu, [90, 120, 100]) == "gathered"  # even lengths: one gathered batch
    assert choose_decode_impl(gpu, [4000, 5, 9, 12]) == "fast"  # padding would dominate the gather


def test_steps_record_no_autograd_graph(mla_model) -> None:
    """The model's parameters require grad (as built), yet an engine step keeps no autograd graph: a step that
    did would keep every activation of every step alive (a bf16 model grew ~290 MiB a decode step)."""
    from dsv2.engine.runner import SeqWork

    assert any(p.requires_grad for p in mla_model.parameters())
    eng = Engine(mla_model, max_tokens=64, block_size=8)
    with eng.reserve(8) as blocks:
        out = eng.runner.execute([SeqWork(blocks, 0, PROMPTS[0])])[0]
    assert not out.requires_grad and out.is_inference()


def test_fragmented_cache_gives_the_same_tokens(mla_model, mla_refs) -> None:
    eng = Engine(mla_model, max_tokens=64 * 4, block_size=4, decode_chunk=5)
    # fragment the pool: hold every other block while the requests run (borrowed from the engine's block
    # manager, so the requests' tables really do skip them)
    holds = [eng.reserve(4) for _ in range(eng.cache.num_blocks)]
    for h in holds:
        h.__enter__()
    for h in holds[::2]:
        h.__exit__(None, None, None)
    reqs = [eng.add_request(p, SamplingParams(max_new_tokens=n)) for p, n in zip(PROMPTS[:2], MAX_NEW[:2])]
    eng.step()
    table = eng.scheduler.blocks.block_table(reqs[0].rid)
    assert len(table) > 1 and all(b % 2 == 0 for b in table)  # the odd blocks are held: no two adjacent
    while eng.has_unfinished():
        eng.step()
    assert [r.output for r in reqs] == mla_refs[:2]
    for h in holds[1::2]:
        h.__exit__(None, None, None)


def test_matches_transformers_generate(tmp_path, mla_model) -> None:
    from transformers import DeepseekV2ForCausalLM

    mla_model.save_pretrained(tmp_path)
    hf = DeepseekV2ForCausalLM.from_pretrained(tmp_path).eval()
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    eng = Engine(mla_model, max_tokens=512, block_size=8)
    prompts = [PROMPTS[0], PROMPTS[3]]
    ours = eng.generate(prompts, SamplingParams(max_new_tokens=10))
    for p, o in zip(prompts, ours):
        with torch.no_grad():
            out = hf.generate(torch.tensor([p]), max_new_tokens=10, do_sample=False)
        assert out[0, len(p):].tolist() == o


def test_cache_full_requests_wait_and_all_finish(mla_model, mla_refs) -> None:
    # room for ~one request at a time: the others queue, nothing is evicted or corrupted
    eng = Engine(mla_model, max_tokens=96, block_size=8)
    outs = eng.generate(PROMPTS, [SamplingParams(max_new_tokens=n) for n in MAX_NEW])
    assert outs == mla_refs
    assert eng.stats.max_running < len(PROMPTS)


def test_request_too_long_errors(mla_model) -> None:
    eng = Engine(mla_model, max_tokens=64, block_size=8)
    with pytest.raises(CacheError, match="too long for the cache.*whole cache holds 64"):
        eng.generate([[1] * 60], SamplingParams(max_new_tokens=10))
    with pytest.raises(RequestError, match="max_position_embeddings="):
        eng.add_request([1] * 1000, SamplingParams(max_new_tokens=30))
    with pytest.raises(RequestError, match="empty"):
        eng.add_request([], SamplingParams())
    with pytest.raises(RequestError, match=r"prompt\[1\] = 512"):
        eng.add_request([1, 512], SamplingParams())
    with pytest.raises(SamplingError, match="SamplingParams.top_p"):
        eng.generate([[1, 2]], SamplingParams(top_p=0))
    assert eng.scheduler.idle and all_blocks_free(eng)


def test_bad_request_leaves_others_and_cache_intact(mla_model, mla_refs) -> None:
    eng = Engine(mla_model, max_tokens=128, block_size=8)
    good = eng.add_request(PROMPTS[0], SamplingParams(max_new_tokens=MAX_NEW[0]))
    with pytest.raises(CacheError):
        eng.add_request([1] * 200, SamplingParams(max_new_tokens=1))
    while not eng.scheduler.idle:
        eng.step()
    assert good.output == mla_refs[0]
    # a request that blows up inside a step (NaN logits for it alone) fails alone, and its seeded
    # neighbour draws exactly what it draws alone (nobody samples twice)
    eng2 = Engine(mla_model, max_tokens=512, block_size=8)
    real = eng2.runner.execute

    def poisoned(work):
        out = real(work)
        for j, w in enumerate(work):  # request 0 only (sampled, so multinomial rejects its NaNs)
            if out[j] is not None and any(eng2.scheduler.block_table(r) == w.block_table and r.prompt == PROMPTS[0]
                                          for r in eng2.scheduler.running):
                out[j] = torch.full_like(out[j], float("nan"))
        return out
    eng2.runner.execute = poisoned
    seeded = SamplingParams(max_new_tokens=5, temperature=1.0, seed=7)
    params = [SamplingParams(max_new_tokens=6, temperature=1.0, seed=0), seeded,
              SamplingParams(max_new_tokens=MAX_NEW[2])]
    with pytest.raises(GenerationError) as info:
        eng2.generate([PROMPTS[0], PROMPTS[1], PROMPTS[2]], params)
    assert list(info.value.errors) == [0]
    assert info.value.outputs[1] == Engine(mla_model, max_tokens=128).generate([PROMPTS[1]], seeded)[0]
    assert info.value.outputs[2] == mla_refs[2]
    assert all_blocks_free(eng2)


def test_failure_inside_a_step_fails_its_request_alone(mla_model, mla_refs) -> None:
    """A forward that raises for one request's prefill chunk (mixed with another's decode) fails that
    request alone; the other finishes with its reference tokens and every block is freed."""
    eng = Engine(mla_model, max_tokens=256, block_size=4, prefill_chunk=16)
    real = eng.runner.execute

    def flaky(work):
        if any(w.num_computed >= 16 and len(w.tokens) > 1 and set(w.tokens) == {3} for w in work):  # long's 2nd chunk
            raise RuntimeError("injected failure")
        return real(work)
    eng.runner.execute = flaky
    short = eng.add_request(PROMPTS[0], SamplingParams(max_new_tokens=MAX_NEW[0]))
    long = eng.add_request(PROMPTS[2], SamplingParams(max_new_tokens=MAX_NEW[2]))
    while not eng.scheduler.idle:
        eng.step()
    assert long.status == "failed" and "injected failure" in long.error
    assert short.output == mla_refs[0]
    assert all_blocks_free(eng)


def test_seeded_sampling_does_not_depend_on_batch(mla_model) -> None:
    sp = SamplingParams(max_new_tokens=8, temperature=0.8, top_k=50, top_p=0.9, seed=123)
    alone = Engine(mla_model, max_tokens=256).generate([PROMPTS[1]], sp)[0]
    crowd = Engine(mla_model, max_tokens=256).generate(
        [PROMPTS[0], PROMPTS[1], PROMPTS[2]], [SamplingParams(max_new_tokens=5, temperature=1.0, seed=9), sp,
                                               SamplingParams(max_new_tokens=3)])[1]
    assert alone == crowd


def test_stop_tokens_and_stream(mla_model, mla_refs) -> None:
    stop = mla_refs[2][4]
    eng = Engine(mla_model, max_tokens=512)
    events = list(eng.stream([PROMPTS[2]], SamplingParams(max_new_tokens=12, stop_token_ids=[stop])))
    toks = [e.token for e in events]
    assert toks == mla_refs[2][: mla_refs[2].index(stop) + 1]
    assert events[-1].finished and events[-1].finish_reason == "stop"
    assert not any(e.finished for e in events[:-1])


@pytest.mark.parametrize("policy", ["this CPU", "bf16 emulated"])
@pytest.mark.parametrize("attn", ["mla", "mha"])
def test_bf16_decode_close_to_the_plain_forward(attn: str, policy: str, monkeypatch) -> None:
    """bf16 weights and cache vs the plain bf16 forward's logits, under this CPU's policy and under the one
    for CPUs without native bf16 GEMMs (AVX2: fp32 decode attention, in C over the bf16 rows for MLA, or
    upcast into scratch; few-row GEMVs on the bf16 weights, packed fp32 copies for prompts); MLA also
    through the gathered batch."""
    from dsv2 import precision
    from dsv2.engine.runner import SeqWork

    if policy == "bf16 emulated":
        monkeypatch.setitem(precision._NATIVE, torch.bfloat16, False)
    model = precision.prepare(tiny_model(attn).to(torch.bfloat16))
    impls = ("fast", "gathered") if attn == "mla" else ("fast",)
    for impl in impls:
        eng = Engine(model, kv_cache_dtype="bf16", max_tokens=256, block_size=4, decode_impl=impl, decode_chunk=16)
        with ExitStack() as held:
            seqs = [held.enter_context(eng.reserve(len(p) + 2)) for p in PROMPTS[:3]]
            eng.runner.execute([SeqWork(s, 0, p, "none") for s, p in zip(seqs, PROMPTS[:3])])
            got = eng.runner.execute([SeqWork(s, len(p), [4 + i]) for i, (s, p) in enumerate(zip(seqs, PROMPTS[:3]))])
        for i, (g, p) in enumerate(zip(got, PROMPTS[:3])):
            with torch.no_grad():
                want = model(torch.tensor([p + [4 + i]]))[0, -1].float()
            err = (g.float() - want).abs().max() / want.abs().max()
            assert err < 0.03, (impl, i, err)


@pytest.mark.slow
def test_compiled_engine_gives_the_eager_tokens() -> None:
    """`Engine(compile=True)` (decode steps as one compiled graph, dsv2.engine.compiled) on bf16 weights:
    same greedy tokens as eager (under compile, linears skip the pre-packed oneDNN weights that inductor
    cannot take as input)."""
    models = []
    for _ in range(2):
        m = DeepseekV2(ModelConfig.from_preset("tiny"), dtype=torch.bfloat16).eval()
        m.reset_parameters(seed=4)
        models.append(m)
    prompts, params = [[1, 2, 3, 4, 5, 6, 7, 8], [9, 10, 11]], SamplingParams(max_new_tokens=4)
    eager = Engine(models[0], max_tokens=128).generate(prompts, params)
    assert Engine(models[1], max_tokens=128, compile=True).generate(prompts, params) == eager


def test_logprobs_are_the_log_softmax_of_the_full_forward(mla_model) -> None:
    """SamplingParams(logprobs=k): each token's log-probability and the top k equal a log-softmax of the
    plain forward's logits at that position."""
    prompt = PROMPTS[0]
    eng = Engine(mla_model, max_tokens=128, block_size=8)
    req = eng.add_request(prompt, SamplingParams(max_new_tokens=5, logprobs=3))
    while eng.has_unfinished():
        eng.step()
    assert len(req.logprobs) == len(req.output) == 5
    with torch.no_grad():
        ref = mla_model(torch.tensor([prompt + req.output]))[0, len(prompt) - 1: -1].log_softmax(-1)  # (5,V)
    for row, lp in zip(ref, req.logprobs):
        assert lp.logprob == pytest.approx(float(row[lp.token]), abs=1e-4)
        top_v, top_i = row.topk(3)
        assert [t for t, _ in lp.top] == top_i.tolist()
        assert [v for _, v in lp.top] == pytest.approx(top_v.tolist(), abs=1e-4)


@pytest.mark.parametrize("stage", ["waiting", "prefilling", "decoding"])
def test_abort_frees_blocks_at_every_stage(mla_model, mla_refs, stage: str) -> None:
    eng = Engine(mla_model, max_tokens=96, block_size=8, max_batch=1, prefill_chunk=8)
    other = eng.add_request(PROMPTS[0], SamplingParams(max_new_tokens=MAX_NEW[0]))
    victim = eng.add_request(PROMPTS[3], SamplingParams(max_new_tokens=20))
    if stage != "waiting":
        while other.status != "finished":
            eng.step()
        eng.step()  # victim admitted; its 21-token prompt needs 3 prefill pieces of 8
        assert victim.status == "running"
        if stage == "decoding":
            while len(victim.output) < 2:
                eng.step()
    assert eng.abort(victim.rid) and not eng.abort(victim.rid)
    assert victim.finish_reason == "abort" and victim.status == "finished"
    while eng.has_unfinished():
        eng.step()
    assert other.output == mla_refs[0]
    assert all_blocks_free(eng)


class _Letters:
    """A stand-in tokenizer: token t is the two letters of t in base 26 (so stop strings can straddle tokens)."""

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(97 + t // 26 % 26) + chr(97 + t % 26) for t in ids)


def test_stop_strings_across_token_boundaries(mla_model, mla_refs) -> None:
    """SamplingParams(stop=...) with a tokenizer: generation ends at the token that completes the stop
    string (which straddles two tokens), the text stops right before it, finish_reason is "stop"."""
    ref = mla_refs[0]  # 8 greedy tokens
    full = _Letters().decode(ref)
    stop = full[7:10]  # from the middle of token 3 into token 4 (tokens are 2 letters)
    end = full.index(stop) + len(stop)  # where the stop string first completes
    eng = Engine(mla_model, max_tokens=256, tokenizer=_Letters())
    req = eng.add_request(PROMPTS[0], SamplingParams(max_new_tokens=8, stop=[stop, "zzzzzz"]))
    while eng.has_unfinished():
        eng.step()
    assert req.finish_reason == "stop" and req.output == ref[: (end + 1) // 2]
    assert req.text == full[: full.index(stop)]
    plain = eng.add_request(PROMPTS[0], SamplingParams(max_new_tokens=8))  # no stop: the whole text
    while eng.has_unfinished():
        eng.step()
    assert plain.text == full and plain.finish_reason == "length"
    with pytest.raises(RequestError, match="tokenizer"):
        Engine(mla_model, max_tokens=64).add_request([1, 2], SamplingParams(stop=["x"]))
    with pytest.raises(SamplingError, match="stop"):
        SamplingParams(stop=[""])


@pytest.mark.parametrize("weights", ["int8", "int4"])
def test_int8_activations_engine_equals_full_forward(weights: str) -> None:
    """EngineConfig(int8_activations=True) on int8 / int4 weights: the engine's greedy tokens (prefill rows
    through the rounded activations' exact path or the integer GEMV, decode rows through the GEMV) are the
    full-forward loop's with the same switch on; the switch belongs to the engine's config; float weights
    are refused with the field named."""
    from dsv2.engine import EngineConfigError
    from dsv2.quant import set_int8_activations
    from dsv2.quant.swap import quantize_model

    model = quantize_model(tiny_model(), weights, 32)
    eng = Engine(model, max_tokens=512, block_size=16, int8_activations=True)
    assert all(m.int8_activations for m in model.modules() if hasattr(m, "int8_activations"))
    refs = [full_forward_greedy(model, p, n) for p, n in zip(PROMPTS[:3], MAX_NEW[:3])]
    outs = eng.generate(PROMPTS[:3], [SamplingParams(max_new_tokens=n) for n in MAX_NEW[:3]])
    assert outs == refs
    exact = Engine(model, max_tokens=64)  # the default config turns it off again
    assert not any(getattr(m, "int8_activations", False) for m in model.modules())
    # two engines on one model: each step runs with its own engine's setting, whichever engine was built last
    switches = [m for m in model.modules() if hasattr(m, "int8_activations")]
    assert eng.generate(PROMPTS[:3], [SamplingParams(max_new_tokens=n) for n in MAX_NEW[:3]]) == refs
    assert all(m.int8_activations for m in switches)
    exact.generate(PROMPTS[:1], SamplingParams(max_new_tokens=2))
    assert not any(m.int8_activations for m in switches)
    with pytest.raises(EngineConfigError, match="int8_activations.*float weights"):
        Engine(tiny_model(), max_tokens=64, int8_activations=True)
    with pytest.raises(EngineConfigError, match="int8_activations must be True or False"):
        Engine(model, max_tokens=64, int8_activations="yes")
    with pytest.raises(Exception, match="float weights"):
        set_int8_activations(tiny_model())
