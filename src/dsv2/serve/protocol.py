"""Request bodies of the OpenAI API (the subset dsv2 serves), validated into typed errors.

Unknown fields are rejected (as OpenAI does), wrong types and out-of-range values raise `APIError`
with HTTP 400 and `param` naming the field (`messages[1].role`, `temperature`, ...). OpenAI fields
that dsv2 does not implement are accepted only at their neutral value (e.g. `presence_penalty: 0`).
Extensions: `top_k` (0 = off) and `ignore_eos` (do not stop at the model's end-of-sequence token).
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError

from dsv2.engine.sampling import MAX_LOGPROBS

MAX_N = 64
MAX_STOP = 16


class APIError(Exception):
    """An error answered as OpenAI's `{"error": {"message", "type", "param", "code"}}` with `status`."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None, code: str | None = "invalid_value") -> APIError:
    """A 400 naming `param`."""
    return APIError(400, message, param, code)


Number = StrictFloat | StrictInt


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: StrictBool | None = None


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: StrictStr
    temperature: Number | None = None
    top_p: Number | None = None
    top_k: StrictInt | None = None
    n: StrictInt | None = None
    seed: StrictInt | None = None
    stop: StrictStr | list[StrictStr] | None = None
    stream: StrictBool | None = None
    stream_options: StreamOptions | None = None
    ignore_eos: StrictBool | None = None
    user: StrictStr | None = None
    frequency_penalty: Number | None = None
    presence_penalty: Number | None = None
    logit_bias: dict[str, Number] | None = None

    def check_common(self) -> None:
        if self.temperature is not None and not self.temperature >= 0:
            raise bad(f"temperature must be >= 0 (0 = greedy), got {self.temperature}", "temperature")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise bad(f"top_p must be in (0, 1], got {self.top_p}", "top_p")
        if self.top_k is not None and self.top_k < 0:
            raise bad(f"top_k must be >= 0 (0 = off), got {self.top_k}", "top_k")
        if self.n is not None and not 1 <= self.n <= MAX_N:
            raise bad(f"n must be in [1, {MAX_N}], got {self.n}", "n")
        if self.seed is not None and self.seed < 0:
            raise bad(f"seed must be >= 0, got {self.seed}", "seed")
        for name in ("frequency_penalty", "presence_penalty"):
            if getattr(self, name):
                raise bad(f"{name} is not supported (only 0)", name, "unsupported_parameter")
        if self.logit_bias:
            raise bad("logit_bias is not supported", "logit_bias", "unsupported_parameter")
        if self.stream_options is not None and not self.stream:
            raise bad("stream_options is only allowed when stream is true", "stream_options")
        stops = self.stop_list()
        if len(stops) > MAX_STOP:
            raise bad(f"stop takes at most {MAX_STOP} strings, got {len(stops)}", "stop")
        for i, s in enumerate(stops):
            if not s:
                raise bad(f"stop[{i}] is empty", "stop")

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Body):
    """POST /v1/completions."""

    prompt: StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]
    max_tokens: StrictInt | None = None
    logprobs: StrictInt | None = None
    echo: StrictBool | None = None
    best_of: StrictInt | None = None
    suffix: StrictStr | None = None

    def check(self) -> None:
        self.check_common()
        if self.max_tokens is not None and self.max_tokens < 1:
            raise bad(f"max_tokens must be >= 1, got {self.max_tokens}", "max_tokens")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise bad(f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs}", "logprobs")
        if self.best_of is not None and self.best_of != (self.n or 1):
            raise bad("best_of is not supported (only best_of == n)", "best_of", "unsupported_parameter")
        if self.suffix:
            raise bad("suffix is not supported", "suffix", "unsupported_parameter")
        if self.prompt == [] or self.prompt == "" or (isinstance(self.prompt, list) and any(
                p == "" or p == [] for p in self.prompt)):
            raise bad("prompt is empty: give some text or token ids", "prompt")


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: StrictStr


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")  # name, tool_calls, ...: passed through to the template
    role: StrictStr
    content: StrictStr | list[ContentPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


ROLES = ("system", "developer", "user", "assistant", "tool")


class ChatRequest(_Body):
    """POST /v1/chat/completions."""

    messages: list[Message]
    max_tokens: StrictInt | None = None
    max_completion_tokens: StrictInt | None = None
    logprobs: StrictBool | None = None
    top_logprobs: StrictInt | None = None

    def check(self) -> None:
        self.check_common()
        for name in ("max_tokens", "max_completion_tokens"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise bad(f"{name} must be >= 1, got {v}", name)
        if not self.messages:
            raise bad("messages is empty: give at least one message", "messages")
        for i, m in enumerate(self.messages):
            if m.role not in ROLES:
                raise bad(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {m.role!r}",
                          f"messages[{i}].role")
        if self.top_logprobs is not None:
            if not 0 <= self.top_logprobs <= MAX_LOGPROBS:
                raise bad(f"top_logprobs must be in [0, {MAX_LOGPROBS}], got {self.top_logprobs}", "top_logprobs")
            if not self.logprobs:
                raise bad("top_logprobs requires logprobs to be true", "top_logprobs")

    @property
    def max_new(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


_NESTED_FIELDS = {"role", "content", "type", "text", "include_usage", "name"}


def _param(loc: tuple[Any, ...]) -> str:
    """pydantic's error location -> OpenAI's param spelling: ('messages', 1, 'role') -> messages[1].role."""
    out = str(loc[0]) if loc else ""
    for part in loc[1:]:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in _NESTED_FIELDS:
            out += f".{part}"
        else:
            break  # a union branch's type tag ('str', 'list[int]', ...): the field itself is the parameter
    return out


def parse(raw: bytes, cls: type[CompletionRequest] | type[ChatRequest]) -> CompletionRequest | ChatRequest:
    """JSON bytes -> a checked request, or APIError(400) naming the offending parameter."""
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise bad(f"the body is not valid JSON: {e}", None, "invalid_json") from None
    if not isinstance(data, dict):
        raise bad("the body must be a JSON object", None, "invalid_json")
    try:
        req = cls.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        param = _param(err["loc"])
        if err["type"] == "extra_forbidden":
            raise bad(f"unrecognized request argument: {param}", param, "unknown_parameter") from None
        if err["type"] == "missing":
            raise bad(f"{param} is required", param, "missing_required_parameter") from None
        raise bad(f"invalid value for {param}: {err['msg']} (got {_short(err.get('input'))})", param,
                  "invalid_type") from None
    req.check()
    return req


def _short(value: Any) -> str:
    s = json.dumps(value, default=str)
    return s if len(s) <= 60 else s[:57] + "..."

