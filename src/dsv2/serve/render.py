"""Response bodies: OpenAI's completion / chat shapes, their stream chunks, and log-probability formats.

Token strings in log-probabilities are the token's own text (`decode([id])`, special tokens by name);
a token that is only part of a UTF-8 character is written `bytes:\\xe2\\x80` as OpenAI does, so every
token of the vocabulary has a distinct string. Chat entries also carry the token's raw `bytes`.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from dsv2.engine.detok import REPLACEMENT
from dsv2.engine.sampling import TokenLogprob
from dsv2.train.data import byte_level_chars


class TokenText:
    """Token id -> (display string, raw bytes), cached."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self._byte_of = byte_level_chars()
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def __call__(self, tid: int) -> tuple[str, list[int]]:
        hit = self._cache.get(tid)
        if hit is None:
            text = self.tokenizer.decode([tid], skip_special_tokens=False)
            raw = self.tokenizer.id_to_token(tid) or ""
            if raw and all(c in self._byte_of for c in raw):
                data = [self._byte_of[c] for c in raw]
            else:  # special or non byte-level token
                data = list(text.encode("utf-8"))
            if REPLACEMENT in text:
                try:
                    bytes(data).decode("utf-8")
                except UnicodeDecodeError:  # part of a character: name its bytes
                    text = "bytes:" + "".join(f"\\x{b:02x}" for b in data)
            hit = self._cache[tid] = (text, data)
        return hit


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


# ---- /v1/completions -------------------------------------------------------------------------
class CompletionLogprobs:
    """The legacy `logprobs` object (tokens, token_logprobs, top_logprobs, text_offset), built incrementally."""

    def __init__(self, token_text: TokenText, offset: int) -> None:
        self.tt, self.offset = token_text, offset

    def entries(self, items: list[TokenLogprob | None], prompt_ids: list[int] | None = None) -> dict[str, list]:
        """`items` are TokenLogprobs (None for the first prompt token, with its id in `prompt_ids`)."""
        out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for i, lp in enumerate(items):
            tid = lp.token if lp is not None else prompt_ids[i]
            s, _ = self.tt(tid)
            out["tokens"].append(s)
            out["token_logprobs"].append(lp.logprob if lp is not None else None)
            out["top_logprobs"].append({self.tt(t)[0]: v for t, v in lp.top} if lp is not None else None)
            out["text_offset"].append(self.offset)
            self.offset += len(s)
        return out


def merge_logprobs(parts: list[dict[str, list]]) -> dict[str, list] | None:
    if not parts:
        return None
    return {k: [x for p in parts for x in p[k]] for k in parts[0]}


def completion_body(rid: str, model: str, choices: list[dict[str, Any]], use: dict[str, int]) -> dict[str, Any]:
    return {"id": rid, "object": "text_completion", "created": now(), "model": model, "choices": choices,
            "usage": use}


def completion_choice(index: int, text: str, logprobs: dict | None, finish_reason: str | None) -> dict[str, Any]:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


def completion_chunk(rid: str, model: str, created: int, choices: list[dict[str, Any]],
                     use: dict[str, int] | None = None) -> dict[str, Any]:
    body = {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": choices}
    if use is not None:
        body["usage"] = use
    return body


# ---- /v1/chat/completions --------------------------------------------------------------------
def chat_logprobs(tt: TokenText, items: list[TokenLogprob]) -> list[dict[str, Any]]:
    """`choices[i].logprobs.content` entries."""
    out = []
    for lp in items:
        s, b = tt(lp.token)
        top = [{"token": tt(t)[0], "logprob": v, "bytes": tt(t)[1]} for t, v in lp.top]
        out.append({"token": s, "logprob": lp.logprob, "bytes": b, "top_logprobs": top})
    return out


def chat_body(rid: str, model: str, choices: list[dict[str, Any]], use: dict[str, int]) -> dict[str, Any]:
    return {"id": rid, "object": "chat.completion", "created": now(), "model": model, "choices": choices,
            "usage": use}


def chat_choice(index: int, text: str, logprobs: list | None, finish_reason: str | None) -> dict[str, Any]:
    return {"index": index, "message": {"role": "assistant", "content": text},
            "logprobs": {"content": logprobs} if logprobs is not None else None, "finish_reason": finish_reason}


def chat_chunk(rid: str, model: str, created: int, choices: list[dict[str, Any]],
               use: dict[str, int] | None = None) -> dict[str, Any]:
    body = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": choices}
    if use is not None:
        body["usage"] = use
    return body
