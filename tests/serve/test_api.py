"""The OpenAI endpoints through the official `openai` client against a real server process: tokens equal
Engine.generate's (greedy and seeded), streamed equals whole, stop strings, n > 1, echo, logprobs equal a
log-softmax of the model's logits, and the chat template rendered as transformers renders it."""

from __future__ import annotations

import pytest
import torch

PROMPTS = ["The for statement", "Exceptions are raised when", "A class definition"]


def test_models_and_health(client, server, ref) -> None:
    assert [m.id for m in client.models.list().data] == [ref.name]
    assert server.get("/health")[0] == 200


def test_completions_greedy_equal_engine_generate(client, ref) -> None:
    r = client.completions.create(model=ref.name, prompt=PROMPTS, max_tokens=24, temperature=0)
    ids = [ref.ids(p) for p in PROMPTS]
    want = ref.generate(ids, max_new_tokens=24, temperature=0.0)
    assert [c.index for c in r.choices] == [0, 1, 2]
    for c, w in zip(r.choices, want):
        assert c.text == ref.text(w)
        assert c.finish_reason == ("stop" if w[-1] == ref.eos else "length")
    assert r.usage.prompt_tokens == sum(map(len, ids))
    assert r.usage.completion_tokens == sum(map(len, want))


def test_completions_token_id_prompts(client, ref) -> None:
    ids = [ref.ids(p) for p in PROMPTS[:2]]
    want = ref.generate(ids, max_new_tokens=12, temperature=0.0)
    one = client.completions.create(model=ref.name, prompt=ids[0], max_tokens=12, temperature=0)
    two = client.completions.create(model=ref.name, prompt=ids, max_tokens=12, temperature=0)
    assert one.choices[0].text == ref.text(want[0])
    assert [c.text for c in two.choices] == [ref.text(w) for w in want]


def test_completions_seeded_n_uses_seed_plus_index(client, ref) -> None:
    kw = dict(temperature=0.9, top_p=0.9, max_tokens=20)
    r = client.completions.create(model=ref.name, prompt=PROMPTS[0], n=3, seed=7, extra_body={"top_k": 50}, **kw)
    ids = ref.ids(PROMPTS[0])
    want = ref.generate([ids] * 3, max_new_tokens=20, temperature=0.9, top_p=0.9, top_k=50, seed=[7, 8, 9])
    assert [c.text for c in r.choices] == [ref.text(w) for w in want]
    assert len({c.text for c in r.choices}) > 1  # different seeds really sample differently


def test_completions_stream_equals_engine_generate(client, ref) -> None:
    stream = client.completions.create(model=ref.name, prompt=PROMPTS[1], max_tokens=30, temperature=0.8, seed=3,
                                       stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    want = ref.generate([ref.ids(PROMPTS[1])], max_new_tokens=30, temperature=0.8, seed=3)[0]
    assert "".join(c.choices[0].text for c in chunks if c.choices) == ref.text(want)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == ["stop" if want[-1] == ref.eos else "length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(want)


def _boundary_stop(ref, toks: list[int]) -> tuple[str, str]:
    """A 3-character stop string that spans a token boundary of toks' text (first occurrence there),
    and the text before it."""
    full = ref.text(toks)
    for i in range(2, len(toks) - 1):
        head = ref.text(toks[: i + 1])
        b = len(head)
        if full.startswith(head) and 2 <= b < len(full) - 1 and len(ref.text(toks[i:i + 1])) >= 2:
            stop = full[b - 2: b + 1]  # the last 2 characters of token i and the first one after it
            if full.find(stop) == b - 2 and stop.strip() and "\ufffd" not in stop:
                return stop, full[: b - 2]
    pytest.skip("no clean token boundary in this sample")


@pytest.mark.parametrize("stream", [False, True])
def test_stop_string_across_token_boundaries(client, ref, stream: bool) -> None:
    ids = ref.ids(PROMPTS[2])
    toks = ref.generate([ids], max_new_tokens=60, temperature=1.0, seed=5, stop_token_ids=())[0]
    stop, before = _boundary_stop(ref, toks)
    kw = dict(model=ref.name, prompt=PROMPTS[2], max_tokens=60, temperature=1, seed=5, stop=["@@never@@", stop],
              extra_body={"ignore_eos": True})
    if stream:
        chunks = [c.choices[0] for c in client.completions.create(stream=True, **kw) if c.choices]
        pieces = [c.text for c in chunks]
        assert not any(stop in p for p in pieces)
        text, finish = "".join(pieces), chunks[-1].finish_reason
    else:
        c = client.completions.create(**kw).choices[0]
        text, finish = c.text, c.finish_reason
    assert text == before and finish == "stop"


def test_echo_and_logprobs_equal_log_softmax(client, ref) -> None:
    r = client.completions.create(model=ref.name, prompt=PROMPTS[0], max_tokens=8, temperature=0, logprobs=3,
                                  echo=True)
    c = r.choices[0]
    ids = ref.ids(PROMPTS[0])
    out = ref.generate([ids], max_new_tokens=8, temperature=0.0)[0]
    assert c.text == PROMPTS[0] + ref.text(out)
    seq = ids + out
    lp = ref.logprobs(seq)
    got = c.logprobs.token_logprobs
    assert len(got) == len(seq) and got[0] is None and c.logprobs.top_logprobs[0] is None
    for t in range(1, len(seq)):
        assert got[t] == pytest.approx(float(lp[t - 1, seq[t]]), abs=1e-4)
        top = sorted(c.logprobs.top_logprobs[t].values(), reverse=True)
        assert top == pytest.approx(torch.topk(lp[t - 1], 3).values.tolist(), abs=1e-4)


MESSAGES = [{"role": "system", "content": "You answer briefly."}, {"role": "user", "content": "What is a class?"}]


def test_chat_greedy_and_stream_equal_engine_generate(client, ref) -> None:
    ids = ref.chat_ids([MESSAGES])[0]
    want = ref.generate([ids], max_new_tokens=20, temperature=0.0)[0]
    r = client.chat.completions.create(model=ref.name, messages=MESSAGES, max_tokens=20, temperature=0)
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == ref.text(want)
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == len(want)
    chunks = list(client.chat.completions.create(model=ref.name, messages=MESSAGES, max_completion_tokens=20,
                                                 temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == ref.text(want)
    assert chunks[-1].choices[0].finish_reason == ("stop" if want[-1] == ref.eos else "length")


def test_chat_seeded_n_and_logprobs(client, ref) -> None:
    ids = ref.chat_ids([MESSAGES])[0]
    r = client.chat.completions.create(model=ref.name, messages=MESSAGES, max_tokens=12, temperature=1.0, seed=11,
                                       n=2, logprobs=True, top_logprobs=2)
    want = ref.generate([ids, ids], max_new_tokens=12, temperature=1.0, seed=[11, 12])
    for c, w in zip(r.choices, want):
        assert c.message.content == ref.text(w)
        lp = ref.logprobs(ids + w)
        entries = c.logprobs.content
        assert len(entries) == len(w)
        for j, e in enumerate(entries):
            row = lp[len(ids) - 1 + j]
            assert e.logprob == pytest.approx(float(row[w[j]]), abs=1e-4)
            assert [t.logprob for t in e.top_logprobs] == pytest.approx(torch.topk(row, 2).values.tolist(), abs=1e-4)


def test_stream_echo_and_n_choices_interleave(client, ref) -> None:
    ids = ref.ids(PROMPTS[0])
    want = ref.generate([ids, ids], max_new_tokens=10, temperature=1.0, seed=[4, 5])
    chunks = [c for c in client.completions.create(model=ref.name, prompt=PROMPTS[0], max_tokens=10, temperature=1,
                                                   seed=4, n=2, echo=True, stream=True) if c.choices]
    for i in range(2):
        mine = [c.choices[0].text for c in chunks if c.choices[0].index == i]
        assert mine[0] == PROMPTS[0] and "".join(mine) == PROMPTS[0] + ref.text(want[i])
