"""From the engine loop's Deltas to HTTP: whole responses (`collect`) and server-sent event streams.

Each request's jobs share one `Channel`: the loop thread puts `(choice index, Delta | Failure)` on it
through `call_soon_threadsafe`, the handler awaits them. Whoever stops listening early (the client went
away, the stream was cancelled, a choice failed) aborts every job of the request, so the engine frees
their blocks at its next iteration.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fastapi import Request

from dsv2.engine.sampling import TokenLogprob
from dsv2.serve import render
from dsv2.serve.loop import Delta, EngineLoop, Failure, Job
from dsv2.serve.protocol import APIError

if TYPE_CHECKING:
    from dsv2.serve.app import _Handlers

log = logging.getLogger("dsv2.serve")
DISCONNECT_POLL_S = 0.25


class Channel:
    """An asyncio queue that the engine thread can feed."""

    def __init__(self, aloop: asyncio.AbstractEventLoop) -> None:
        self.aloop, self.queue = aloop, asyncio.Queue()

    def sink(self, index: int) -> Callable[[Delta | Failure], None]:
        def put(item: Delta | Failure) -> None:
            try:
                self.aloop.call_soon_threadsafe(self.queue.put_nowait, (index, item))
            except RuntimeError:  # the event loop is closed: nobody is listening any more
                pass
        return put


@dataclass
class Result:
    """Everything one choice produced."""

    text: str = ""
    tokens: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] | None = None
    finish_reason: str | None = None

    def add(self, d: Delta) -> None:
        self.text += d.text
        self.tokens += d.tokens
        self.logprobs += d.logprobs
        if d.prompt_logprobs is not None:
            self.prompt_logprobs = d.prompt_logprobs
        if d.finish_reason is not None:
            self.finish_reason = d.finish_reason


def failure_error(f: Failure) -> APIError:
    if f.status >= 500:
        return APIError(f.status, f.message, None, "internal_error", type="server_error")
    return APIError(f.status, f.message, f.param, "invalid_value")


async def collect(request: Request, loop: EngineLoop, jobs: list[Job], chan: Channel) -> list[Result]:
    """Wait for every choice to finish; aborts them all if the client disconnects or one fails."""
    results = [Result() for _ in jobs]
    left, done = len(jobs), False
    aloop = asyncio.get_running_loop()
    next_check = aloop.time() + DISCONNECT_POLL_S
    try:
        while left:
            if aloop.time() >= next_check:  # tokens may arrive faster than the poll: check by the clock
                next_check = aloop.time() + DISCONNECT_POLL_S
                if await request.is_disconnected():
                    log.info("client disconnected: aborting %d request(s)", len(jobs))
                    return results
            try:
                i, item = await asyncio.wait_for(chan.queue.get(), DISCONNECT_POLL_S)
            except TimeoutError:
                continue
            if isinstance(item, Failure):
                raise failure_error(item)
            results[i].add(item)
            left -= item.finish_reason is not None
        done = True
        return results
    finally:
        if not done:
            loop.abort(jobs)


def sse(obj: dict[str, Any] | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n"


async def _events(h: _Handlers, jobs: list[Job], chan: Channel) -> AsyncIterator[tuple[int, Delta]]:
    """(index, Delta) until every choice finished; a Failure ends the stream with an error event
    (raised as APIError). Aborts the jobs when the consumer stops early (client gone, cancelled)."""
    left, done = len(jobs), False
    try:
        while left:
            i, item = await chan.queue.get()
            if isinstance(item, Failure):
                raise failure_error(item)
            left -= item.finish_reason is not None
            yield i, item
        done = True
    finally:
        if not done:
            h.s.loop.abort(jobs)


async def _guard(h: _Handlers, gen: AsyncIterator[str], jobs: list[Job]) -> AsyncIterator[str]:
    """Turn an error in the middle of a stream into an error event (headers are already sent), and abort
    the request's jobs whenever the stream ends early (the client went away: this generator is closed)."""
    finished = False
    try:
        async for chunk in gen:
            yield chunk
        finished = True
    except APIError as e:
        h.s.metrics.rejected.labels(str(e.status)).inc()
        yield sse(e.body())
        yield sse("[DONE]")
    except Exception as e:  # the traceback goes to the log, never to the client
        log.error("internal error while streaming", exc_info=e)
        yield sse(APIError(500, "internal server error", None, "internal_error", type="server_error").body())
        yield sse("[DONE]")
    finally:
        if not finished:
            h.s.loop.abort(jobs)


def stream_completion(h: _Handlers, rid: str, body: Any, jobs: list[Job], chan: Channel, prompt_of: list[list[int]],
                      text_of: list[str], lp: list[render.CompletionLogprobs], use_prompt: int) -> AsyncIterator[str]:
    async def gen() -> AsyncIterator[str]:
        model, created = h.s.model_name, render.now()
        chunk = lambda choices, use=None: sse(render.completion_chunk(rid, model, created, choices, use))
        want_echo_lp = body.echo and body.logprobs is not None
        if body.echo and not want_echo_lp:
            for i in range(len(jobs)):
                yield chunk([render.completion_choice(i, text_of[i], None, None)])
        n_tokens = 0
        async for i, d in _events(h, jobs, chan):
            if d.prompt_logprobs is not None and want_echo_lp:
                yield chunk([render.completion_choice(i, text_of[i], lp[i].entries(d.prompt_logprobs, prompt_of[i]),
                                                      None)])
                continue
            n_tokens += len(d.tokens)
            logprobs = lp[i].entries(d.logprobs) if body.logprobs is not None else None
            if d.text or d.finish_reason or (logprobs and logprobs["tokens"]):
                yield chunk([render.completion_choice(i, d.text, logprobs, d.finish_reason)])
        if body.include_usage:
            yield chunk([], render.usage(use_prompt, n_tokens))
        yield sse("[DONE]")

    return _guard(h, gen(), jobs)


def stream_chat(h: _Handlers, rid: str, body: Any, jobs: list[Job], chan: Channel,
                prompt_tokens: int) -> AsyncIterator[str]:
    async def gen() -> AsyncIterator[str]:
        model, created = h.s.model_name, render.now()
        chunk = lambda choices, use=None: sse(render.chat_chunk(rid, model, created, choices, use))
        for i in range(len(jobs)):  # the first chunk of each choice carries the role
            yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None}])
        n_tokens = 0
        async for i, d in _events(h, jobs, chan):
            n_tokens += len(d.tokens)
            logprobs = {"content": render.chat_logprobs(h.s.token_text, d.logprobs)} if body.logprobs else None
            if d.text or d.finish_reason or (logprobs and logprobs["content"]):
                delta = {"content": d.text} if d.text else {}
                yield chunk([{"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": d.finish_reason}])
        if body.include_usage:
            yield chunk([], render.usage(prompt_tokens, n_tokens))
        yield sse("[DONE]")

    return _guard(h, gen(), jobs)
