"""Load, disconnects and internal errors: 64 concurrent streams get the tokens they get alone; a client
that goes away (streamed or not) has its request aborted and its blocks freed; an internal error answers
500 without a traceback and fails that request alone; in the end every cache block is free."""

from __future__ import annotations

import asyncio
import http.client
import json
import socket
import threading
import time

import pytest

from ._server import API_KEY

N_CLIENTS = 64


def wait_metrics(server, cond, timeout: float = 15.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        m = server.metrics()
        if cond(m) or time.monotonic() > deadline:
            return m
        time.sleep(0.05)


def all_free(m: dict[str, float]) -> bool:
    return (m["dsv2_cache_blocks_free"] == m["dsv2_cache_blocks_total"] > 0 and m["dsv2_requests_running"] == 0
            and m["dsv2_requests_waiting"] == 0)


def test_64_concurrent_streams_get_the_tokens_they_get_alone(aclient, ref) -> None:
    prompts = [f"{['The for statement', 'A class', 'Exceptions'][i % 3]} {i}" for i in range(N_CLIENTS)]

    async def one(i: int) -> str:
        kw = dict(model=ref.name, max_tokens=16, temperature=0.8, seed=100 + i, stream=True)
        if i % 2:
            stream = await aclient.completions.create(prompt=prompts[i], **kw)
            return "".join([c.choices[0].text async for c in stream if c.choices])
        stream = await aclient.chat.completions.create(messages=[{"role": "user", "content": prompts[i]}], **kw)
        return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    async def run() -> list[str]:
        return await asyncio.wait_for(asyncio.gather(*[one(i) for i in range(N_CLIENTS)]), 120)

    got = asyncio.run(run())
    chat_ids = ref.chat_ids([{"role": "user", "content": p} for p in prompts[::2]])
    for i, text in enumerate(got):
        ids = ref.ids(prompts[i]) if i % 2 else chat_ids[i // 2]
        want = ref.generate([ids], max_new_tokens=16, temperature=0.8, seed=100 + i)[0]  # alone
        assert text == ref.text(want), i


def _open_stream(server, body: dict) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request("POST", "/v1/completions", json.dumps(body),
                 {"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"})
    return conn, conn.getresponse()


@pytest.mark.parametrize("stream", [True, False])
def test_client_disconnect_aborts_and_frees_blocks(server, ref, stream: bool) -> None:
    before = server.metrics().get('dsv2_requests_total{status="abort"}', 0.0)
    body = {"model": ref.name, "prompt": "The for statement", "max_tokens": 1000, "temperature": 0,
            "ignore_eos": True, "stream": stream}
    conn, resp = _open_stream(server, body) if stream else (None, None)
    if stream:
        for _ in range(3):
            assert resp.readline()  # generation is under way
    else:  # a plain request: send it, then hang up before the answer
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        conn.request("POST", "/v1/completions", json.dumps(body),
                     {"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"})
        wait_metrics(server, lambda m: m["dsv2_requests_running"] >= 1)
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    m = wait_metrics(server, lambda m: m.get('dsv2_requests_total{status="abort"}', 0.0) > before and all_free(m))
    assert m.get('dsv2_requests_total{status="abort"}', 0.0) == before + 1
    assert all_free(m)


def test_internal_error_is_500_without_traceback_and_fails_alone(ckpt, ref) -> None:
    """In-process server whose engine raises on one prompt: that request gets 500, the other one its tokens."""
    import openai
    import uvicorn

    from dsv2.engine import Engine
    from dsv2.serve import ChatTemplate, ServerState, create_app
    from dsv2.serve.loop import EngineLoop
    from dsv2.serve.metrics import ServerMetrics

    poison = 7

    class FaultyEngine(Engine):
        def add_request(self, prompt, params=None):
            if prompt[0] == poison:
                raise RuntimeError("secret internal detail")
            return super().add_request(prompt, params)

    engine = FaultyEngine(ref.model, max_tokens=4096, tokenizer=ref.tok)
    metrics = ServerMetrics()
    state = ServerState(EngineLoop(engine, ref.model, metrics, 16), ref.tok, ChatTemplate.from_folder(ckpt),
                        ref.name, ref.model.config, 4096, metrics)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    srv = uvicorn.Server(uvicorn.Config(create_app(state), log_level="critical"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{sock.getsockname()[1]}/v1", api_key="-",
                                    max_retries=0, timeout=60)

        async def run():
            for _ in range(200):
                if srv.started:
                    break
                await asyncio.sleep(0.05)
            bad = client.completions.create(model=ref.name, prompt=[poison, 5, 9], max_tokens=8, temperature=0)
            good = client.completions.create(model=ref.name, prompt=[5, 9], max_tokens=8, temperature=0)
            return await asyncio.wait_for(asyncio.gather(bad, good, return_exceptions=True), 60)

        bad, good = asyncio.run(run())
    finally:
        srv.should_exit = True
        thread.join(30)
    assert isinstance(bad, openai.InternalServerError) and bad.status_code == 500
    text = json.dumps(bad.body)
    assert "secret" not in text and "Traceback" not in text and bad.body["type"] == "server_error"
    assert good.choices[0].text == ref.text(ref.generate([[5, 9]], max_new_tokens=8, temperature=0.0)[0])
    assert not state.loop.alive


def test_after_everything_every_block_is_free(server) -> None:
    m = wait_metrics(server, all_free)
    assert all_free(m), m
    finished = sum(v for k, v in m.items() if k.startswith("dsv2_requests_total{"))
    assert finished >= 1 and m["dsv2_generation_tokens_total"] > 0
    assert m["dsv2_time_to_first_token_seconds_count"] >= 1 and m["dsv2_prompt_tokens_total"] > 0
