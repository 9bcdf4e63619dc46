"""The FastAPI app: OpenAI's /v1/completions, /v1/chat/completions and /v1/models, plus /health and /metrics.

    state = ServerState(loop, tokenizer, ChatTemplate.from_folder(dir), "demo", cfg, capacity, metrics)
    app = create_app(state)      # the loop thread starts and stops with the app's lifespan

Every error is OpenAI-shaped JSON (`{"error": {"message", "type", "param", "code"}}`); an unexpected
exception answers 500 with a generic message (the traceback goes to the log) and fails that request only.

Defaults that differ between the two endpoints follow OpenAI: `temperature` 1, `max_tokens` 16 for
completions; chat's `max_tokens` defaults to min(`default_max_tokens`, context - prompt). With `n` > 1
and a `seed`, choice i (over all prompts, in order) samples with seed + i. Generation stops at the
model's `eos_token_id` unless `ignore_eos` is true.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import re
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException

from dsv2.config import ModelConfig
from dsv2.engine import SamplingError, SamplingParams
from dsv2.serve import render
from dsv2.serve.chat import ChatTemplate, TemplateError
from dsv2.serve.loop import EngineLoop, Job, QueueFull, ServerStopping
from dsv2.serve.metrics import ServerMetrics
from dsv2.serve.protocol import APIError, ChatRequest, CompletionRequest, bad, parse
from dsv2.serve.streams import Channel, collect, sse

log = logging.getLogger("dsv2.serve")
COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


@dataclass
class ServerState:
    """Everything the handlers use; one per app (no module-level state)."""

    loop: EngineLoop
    tokenizer: Any  # tokenizers.Tokenizer
    template: ChatTemplate
    model_name: str
    cfg: ModelConfig
    capacity_tokens: int  # what the whole KV cache holds: one request can never need more
    metrics: ServerMetrics
    api_key: str | None = None
    default_max_tokens: int = 256
    created: int = field(default_factory=render.now)

    def __post_init__(self) -> None:
        self.token_text = render.TokenText(self.tokenizer)


def create_app(state: ServerState) -> FastAPI:
    """An app serving `state`'s model; the engine loop runs while the app does."""

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        if not state.loop.alive:
            state.loop.start()
        yield
        state.loop.stop()  # after uvicorn finished (or cancelled) the in-flight requests: aborts the rest

    app = FastAPI(title="dsv2", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.dsv2 = state
    h = _Handlers(state)

    @app.exception_handler(APIError)
    async def _api_error(_req: Request, e: APIError) -> JSONResponse:
        state.metrics.rejected.labels(str(e.status)).inc()
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(HTTPException)
    async def _http_error(_req: Request, e: HTTPException) -> JSONResponse:
        err = APIError(e.status_code, str(e.detail), None, "not_found" if e.status_code == 404 else None)
        return await _api_error(_req, err)

    @app.exception_handler(Exception)
    async def _internal(_req: Request, e: Exception) -> JSONResponse:
        log.error("internal error", exc_info=e)
        return await _api_error(_req, APIError(500, "internal server error", None, "internal_error",
                                               type="server_error"))

    app.add_api_route("/health", h.health, methods=["GET"])
    app.add_api_route("/metrics", h.metrics, methods=["GET"])
    app.add_api_route("/v1/models", h.models, methods=["GET"])
    app.add_api_route("/v1/completions", h.completions, methods=["POST"])
    app.add_api_route("/v1/chat/completions", h.chat, methods=["POST"])
    return app


class _Stream(StreamingResponse):
    """An SSE response that aborts its jobs however it ends, even when the client left before the first
    event (the body generator then never starts, so its own cleanup would not run). Aborting finished
    jobs is a no-op."""

    def __init__(self, body, on_close) -> None:
        super().__init__(body, media_type="text/event-stream")
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


class _Handlers:
    def __init__(self, state: ServerState) -> None:
        self.s = state

    # ---- small endpoints ---------------------------------------------------------------------
    async def health(self) -> JSONResponse:
        ok = self.s.loop.alive
        return JSONResponse({"status": "ok" if ok else "stopped"}, status_code=200 if ok else 503)

    async def metrics(self) -> Response:
        return Response(self.s.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    async def models(self, request: Request) -> JSONResponse:
        self._auth(request)
        card = {"id": self.s.model_name, "object": "model", "created": self.s.created, "owned_by": "dsv2",
                "max_model_len": self.s.cfg.max_position_embeddings}
        return JSONResponse({"object": "list", "data": [card]})

    # ---- checks ------------------------------------------------------------------------------
    def _auth(self, request: Request) -> None:
        key = self.s.api_key
        if key is None:
            return
        given = request.headers.get("authorization", "")
        token = given[7:] if given.lower().startswith("bearer ") else ""
        if not token or not hmac.compare_digest(token.encode(), key.encode()):
            raise APIError(401, "missing or incorrect API key: send 'Authorization: Bearer <key>'", None,
                           "invalid_api_key")

    def _model(self, name: str) -> None:
        if name != self.s.model_name:
            raise APIError(404, f"model {name!r} does not exist; this server serves {self.s.model_name!r}",
                           "model", "model_not_found")

    def _ids(self, ids: list[int], param: str) -> list[int]:
        v = self.s.cfg.vocab_size
        for i, t in enumerate(ids):
            if not 0 <= t < v:
                raise bad(f"{param}[{i}] = {t} is not a token id in [0, {v})", param)
        return ids

    def _budget(self, prompt: list[int], max_new: int, param: str) -> None:
        ctx, cap = self.s.cfg.max_position_embeddings, self.s.capacity_tokens
        if len(prompt) + max_new > ctx:
            raise APIError(400, f"this model's maximum context length is {ctx} tokens, but {len(prompt) + max_new} "
                           f"were requested ({len(prompt)} in the prompt + {max_new} for the completion); "
                           f"shorten the prompt or lower {param}", param, "context_length_exceeded")
        if len(prompt) + max_new - 1 > cap:
            raise APIError(400, f"the request needs {len(prompt) + max_new - 1} KV cache tokens ({len(prompt)} "
                           f"prompt + {max_new} completion - 1) but the server's cache holds {cap}; lower {param}",
                           param, "context_length_exceeded")

    def _params(self, body: Any, max_new: int, index: int, logprobs: int | None) -> SamplingParams:
        eos = self.s.cfg.eos_token_id
        try:
            return SamplingParams(
                max_new_tokens=max_new, temperature=1.0 if body.temperature is None else float(body.temperature),
                top_k=body.top_k or 0, top_p=1.0 if body.top_p is None else float(body.top_p),
                seed=None if body.seed is None else body.seed + index, logprobs=logprobs,
                stop_token_ids=() if body.ignore_eos or eos is None else (eos,), stop=tuple(body.stop_list()))
        except SamplingError as e:  # our own checks run first (this catches e.g. an infinite temperature)
            field_ = re.search(r"SamplingParams\.(\w+)", str(e))
            name = field_.group(1) if field_ else None
            raise bad(str(e), {"max_new_tokens": "max_tokens", "logprobs": "logprobs"}.get(name, name)) from None

    def _submit(self, prompts: list[list[int]], body: Any, max_new: list[int], logprobs: int | None,
                echo_logprobs: int | None) -> tuple[list[Job], Channel]:
        chan = Channel(asyncio.get_running_loop())
        n = body.n or 1
        jobs = [Job(p, self._params(body, max_new[pi], pi * n + i, logprobs), chan.sink(pi * n + i), echo_logprobs)
                for pi, p in enumerate(prompts) for i in range(n)]
        try:
            self.s.loop.submit(jobs)
        except QueueFull as e:
            raise APIError(429, f"the server is busy: {e}; retry later", None, "queue_full",
                           type="rate_limit_error", headers={"Retry-After": "1"}) from None
        except ServerStopping as e:
            raise APIError(503, str(e), None, "shutting_down", type="server_error") from None
        return jobs, chan

    # ---- /v1/completions ---------------------------------------------------------------------
    async def completions(self, request: Request) -> Response:
        self._auth(request)
        body = parse(await request.body(), CompletionRequest)
        self._model(body.model)
        tok = self.s.tokenizer
        p = body.prompt
        if isinstance(p, str):
            texts, prompts = [p], [tok.encode(p).ids]
        elif isinstance(p[0], str):
            texts, prompts = list(p), [e.ids for e in tok.encode_batch(list(p))]
        elif isinstance(p[0], int):
            prompts = [self._ids(list(p), "prompt")]
            texts = [tok.decode(prompts[0])]
        else:
            prompts = [self._ids(list(x), f"prompt[{i}]") for i, x in enumerate(p)]
            texts = [tok.decode(x) for x in prompts]
        for i, ids in enumerate(prompts):
            if not ids:
                raise bad(f"prompt {i} encodes to no tokens", "prompt")
        max_new = body.max_tokens or COMPLETION_DEFAULT_MAX_TOKENS
        for ids in prompts:
            self._budget(ids, max_new, "max_tokens")
        echo_lp = body.logprobs if body.echo and body.logprobs is not None else None
        jobs, chan = self._submit(prompts, body, [max_new] * len(prompts), body.logprobs, echo_lp)
        n = body.n or 1
        prompt_of = [prompts[i // n] for i in range(len(jobs))]
        text_of = [texts[i // n] for i in range(len(jobs))]
        use_prompt = sum(map(len, prompts))
        lp = [render.CompletionLogprobs(self.s.token_text, 0 if body.echo else len(t)) for t in text_of]
        rid = render.new_id("cmpl")
        if body.stream:
            from dsv2.serve.streams import stream_completion

            return _Stream(stream_completion(self, rid, body, jobs, chan, prompt_of, text_of, lp, use_prompt),
                           lambda: self.s.loop.abort(jobs))
        results = await collect(request, self.s.loop, jobs, chan)
        choices = []
        for i, r in enumerate(results):
            parts = []
            if echo_lp is not None:
                parts.append(lp[i].entries(r.prompt_logprobs, prompt_of[i]))
            if body.logprobs is not None:
                parts.append(lp[i].entries(r.logprobs))
            text = (text_of[i] if body.echo else "") + r.text
            choices.append(render.completion_choice(i, text, render.merge_logprobs(parts), r.finish_reason))
        use = render.usage(use_prompt, sum(len(r.tokens) for r in results))
        return JSONResponse(render.completion_body(rid, self.s.model_name, choices, use))

    # ---- /v1/chat/completions ----------------------------------------------------------------
    async def chat(self, request: Request) -> Response:
        self._auth(request)
        body = parse(await request.body(), ChatRequest)
        self._model(body.model)
        messages = [{**m.model_dump(exclude_none=True), "content": m.text()} for m in body.messages]
        try:
            text = self.s.template.render(messages, add_generation_prompt=True)
        except TemplateError as e:
            raise bad(str(e), "messages", "invalid_messages") from None
        ids = self.s.tokenizer.encode(text, add_special_tokens=False).ids
        if not ids:
            raise bad("the chat template renders these messages to no tokens", "messages")
        ctx = self.s.cfg.max_position_embeddings
        if body.max_new is not None:
            max_new, param = body.max_new, ("max_completion_tokens" if body.max_completion_tokens else "max_tokens")
        else:
            max_new, param = max(1, min(self.s.default_max_tokens, ctx - len(ids))), "messages"
        self._budget(ids, max_new, param)
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        jobs, chan = self._submit([ids], body, [max_new], logprobs, None)
        rid = render.new_id("chatcmpl")
        if body.stream:
            from dsv2.serve.streams import stream_chat

            return _Stream(stream_chat(self, rid, body, jobs, chan, len(ids)), lambda: self.s.loop.abort(jobs))
        results = await collect(request, self.s.loop, jobs, chan)
        choices = [render.chat_choice(i, r.text, render.chat_logprobs(self.s.token_text, r.logprobs)
                                      if logprobs is not None else None, r.finish_reason)
                   for i, r in enumerate(results)]
        use = render.usage(len(ids), sum(len(r.tokens) for r in results))
        return JSONResponse(render.chat_body(rid, self.s.model_name, choices, use))


__all__ = ["ServerState", "create_app", "sse"]
