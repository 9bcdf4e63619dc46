"""Bad input, auth and overload against the real server: every error is OpenAI-shaped JSON with its
status and the parameter it concerns; a full queue answers 429 + Retry-After; SIGTERM exits 0."""

from __future__ import annotations

import asyncio
import json
import signal

import pytest

from ._server import API_KEY, Server

AUTH = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}


def post(server, path: str, body, headers=None) -> tuple[int, dict, dict]:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    status, hdrs, data = server.request("POST", path, raw, AUTH if headers is None else headers)
    return status, hdrs, json.loads(data)


def _cmpl(ref, **kw):
    return {"model": ref.name, "prompt": "The for statement", "max_tokens": 4, **kw}


def _chat(ref, **kw):
    return {"model": ref.name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **kw}


BAD_COMPLETIONS = [  # (overrides, param)
    ({"temperature": -0.5}, "temperature"),
    ({"temperature": "hot"}, "temperature"),
    ({"temperature": float("inf")}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"n": 0}, "n"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [5, 100000]}, "prompt"),
    ({"prompt": [[5], [-1]]}, "prompt[1]"),
    ({"prompt": {"text": "x"}}, "prompt"),
    ({"logprobs": 21}, "logprobs"),
    ({"seed": -1}, "seed"),
    ({"stop": ["ok", ""]}, "stop"),
    ({"stream": "yes"}, "stream"),
    ({"wibble": 1}, "wibble"),
    ({"presence_penalty": 0.5}, "presence_penalty"),
]


@pytest.mark.parametrize("overrides,param", BAD_COMPLETIONS, ids=[p for _, p in BAD_COMPLETIONS])
def test_bad_completion_requests_name_their_parameter(server, ref, overrides, param) -> None:
    status, _, body = post(server, "/v1/completions", _cmpl(ref, **overrides))
    assert status == 400, body
    err = body["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error" and param.split("[")[0] in err["message"]


BAD_CHATS = [
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": 3}]}, "messages[1].content"),
    ({"messages": []}, "messages"),
    ({"top_logprobs": 3}, "top_logprobs"),
    ({"max_completion_tokens": -2}, "max_completion_tokens"),
]


@pytest.mark.parametrize("overrides,param", BAD_CHATS, ids=[p for _, p in BAD_CHATS])
def test_bad_chat_requests_name_their_parameter(server, ref, overrides, param) -> None:
    status, _, body = post(server, "/v1/chat/completions", _chat(ref, **overrides))
    assert status == 400 and body["error"]["param"] == param, body


def test_malformed_json_and_missing_fields(server, ref) -> None:
    status, _, body = post(server, "/v1/completions", b'{"model": "x", "prompt": ')
    assert status == 400 and body["error"]["code"] == "invalid_json"
    status, _, body = post(server, "/v1/chat/completions", {"model": ref.name})
    assert status == 400 and body["error"]["param"] == "messages"


def test_context_overflow_names_both_numbers(server, ref) -> None:
    n_prompt = len(ref.ids("The for statement"))
    status, _, body = post(server, "/v1/completions", _cmpl(ref, max_tokens=1024))
    err = body["error"]
    assert status == 400 and err["param"] == "max_tokens" and err["code"] == "context_length_exceeded"
    assert "1024" in err["message"] and str(n_prompt + 1024) in err["message"]


def test_unknown_model_is_404(server, ref) -> None:
    status, _, body = post(server, "/v1/completions", _cmpl(ref, model="gpt-17"))
    assert status == 404 and body["error"]["param"] == "model" and body["error"]["code"] == "model_not_found"


def test_api_key_is_enforced(server, ref, client) -> None:
    for headers in ({"Content-Type": "application/json"}, {**AUTH, "Authorization": "Bearer wrong"},
                    {**AUTH, "Authorization": API_KEY}):
        status, _, body = post(server, "/v1/completions", _cmpl(ref), headers=headers)
        assert status == 401 and body["error"]["code"] == "invalid_api_key"
    assert server.request("GET", "/v1/models")[0] == 401
    assert server.get("/health")[0] == 200  # health and metrics stay open for probes
    import openai

    bad = openai.OpenAI(base_url=server.base + "/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    assert client.models.list().data  # the right key passes


@pytest.fixture(scope="module")
def small_server(ckpt, tmp_path_factory):
    """max-batch 1, max-queue 1: a third concurrent request must wait for no one and gets 429."""
    srv = Server(ckpt, "--max-batch", "1", "--max-queue", "1", "--shutdown-timeout", "1",
                 log=tmp_path_factory.mktemp("serve-small") / "server.log")
    yield srv
    srv.stop(signal.SIGKILL)


def test_full_queue_answers_429_with_retry_after(small_server, ref) -> None:
    import openai

    client = openai.AsyncOpenAI(base_url=small_server.base + "/v1", api_key="-", max_retries=0, timeout=60)

    async def one():
        try:
            r = await client.completions.create(model=ref.name, prompt="The for statement", max_tokens=300,
                                                temperature=0, extra_body={"ignore_eos": True})
            return r.usage.completion_tokens
        except openai.RateLimitError as e:
            return e

    async def run():
        return await asyncio.wait_for(asyncio.gather(*[one() for _ in range(4)]), 120)

    results = asyncio.run(run())
    limited = [r for r in results if isinstance(r, Exception)]
    assert limited and len(limited) <= 3 and 300 in results
    e = limited[0]
    assert e.status_code == 429 and e.response.headers["retry-after"] == "1"
    assert e.body["code"] == "queue_full"


def test_sigterm_with_a_stream_in_flight_exits_0(small_server, ref) -> None:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", small_server.port, timeout=30)
    body = json.dumps(_cmpl(ref, max_tokens=1000, stream=True, ignore_eos=True))
    conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200 and resp.readline().startswith(b"data: ")
    assert small_server.stop(signal.SIGTERM, timeout=30) == 0
    events = [ln for ln in resp.read().decode().splitlines() if ln.startswith("data: ")]
    conn.close()
    # the stream was ended properly at --shutdown-timeout: an "abort" finish, then [DONE]
    assert events[-1] == "data: [DONE]" and json.loads(events[-2][6:])["choices"][0]["finish_reason"] == "abort"
