"""Sampling: request parameters and pure functions from logits to the next token.

Shapes: B sequences in a decode step, V vocabulary.

Every request owns a `torch.Generator` seeded from `SamplingParams.seed`, so a request draws the
same tokens whatever else is in the batch (continuous batching must not change a seeded result).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

MAX_LOGPROBS = 20


class SamplingError(ValueError):
    """A SamplingParams field with an invalid value; the message names the field."""


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks tokens. temperature 0 means greedy (argmax)."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    logprobs: int | None = None  # None = off; k >= 0: the sampled token's log-probability and the k most likely
    stop: tuple[str, ...] = field(default_factory=tuple)  # stop strings (need Engine(tokenizer=)); never emitted

    def __post_init__(self) -> None:
        # frozen dataclass: normalise the stop ids to a tuple without going through __setattr__
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids or ()))
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        object.__setattr__(self, "stop", stop)
        self.validate()

    def validate(self, vocab_size: int | None = None) -> None:
        def need(cond: bool, name: str, msg: str) -> None:
            if not cond:
                raise SamplingError(f"SamplingParams.{name} {msg}, got {getattr(self, name)!r}")

        need(isinstance(self.max_new_tokens, int) and not isinstance(self.max_new_tokens, bool)
             and self.max_new_tokens >= 1, "max_new_tokens", "must be an integer >= 1")
        need(isinstance(self.temperature, int | float) and math.isfinite(self.temperature)
             and self.temperature >= 0, "temperature", "must be a finite number >= 0 (0 = greedy)")
        need(isinstance(self.top_k, int) and not isinstance(self.top_k, bool) and self.top_k >= 0,
             "top_k", "must be an integer >= 0 (0 = off)")
        need(isinstance(self.top_p, int | float) and 0.0 < self.top_p <= 1.0, "top_p",
             "must be in (0, 1]")
        need(self.seed is None or (isinstance(self.seed, int) and self.seed >= 0), "seed",
             "must be None or an integer >= 0")
        need(all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids), "stop_token_ids",
             "must be non-negative integers")
        need(all(isinstance(t, str) and t for t in self.stop), "stop", "must be non-empty strings")
        need(self.logprobs is None or (isinstance(self.logprobs, int) and not isinstance(self.logprobs, bool)
                                       and 0 <= self.logprobs <= MAX_LOGPROBS),
             "logprobs", f"must be None or an integer in [0, {MAX_LOGPROBS}]")
        if vocab_size is not None:
            need(all(t < vocab_size for t in self.stop_token_ids), "stop_token_ids",
                 f"must be < vocab_size={vocab_size}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def make_generator(params: SamplingParams, device: torch.device | str = "cpu") -> torch.Generator | None:
    """A per-request generator: seeded when the request asks for it, None for greedy requests."""
    if params.greedy:
        return None
    gen = torch.Generator(device=device)
    if params.seed is None:
        gen.seed()
    else:
        gen.manual_seed(params.seed)
    return gen


def apply_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits of each row (V); the rest become -inf. k <= 0 or >= V: unchanged."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # (..., 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def apply_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter: keep the smallest set of top tokens whose probability mass reaches p.

    The most likely token is always kept, so p -> 0 degenerates to greedy rather than to nothing.
    """
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # probability of the tokens ranked above this one
    drop_sorted = mass_before >= p
    drop_sorted[..., 0] = False
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def greedy_ids(logits: torch.Tensor) -> torch.Tensor:
    """argmax over the last dim. Low-precision logits are widened first: the same index (the widening is exact),
    ~3.5x faster on a CPU (bf16 argmax over a 102,400 vocabulary: 0.37 vs 0.11 ms capped at AVX2)."""
    return torch.argmax(logits.float() if logits.dtype in (torch.bfloat16, torch.float16) else logits, dim=-1)


def sample_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """Next token id from one row of logits (V,), following `params`."""
    if params.greedy:
        return int(greedy_ids(logits))
    x = logits.float() / params.temperature
    x = apply_top_k(x, params.top_k)
    x = apply_top_p(x, params.top_p)
    probs = x.softmax(dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def sample_batch(logits: torch.Tensor, params: list[SamplingParams],
                 generators: list[torch.Generator | None]) -> list[int]:
    """One token per row of logits (B, V). Greedy rows share one argmax; others sample row by row."""
    out: list[int] = [0] * len(params)
    greedy_rows = [i for i, p in enumerate(params) if p.greedy]
    if greedy_rows:
        ids = greedy_ids(logits[greedy_rows]).tolist()
        for i, t in zip(greedy_rows, ids):
            out[i] = int(t)
    for i, p in enumerate(params):
        if not p.greedy:
            out[i] = sample_token(logits[i], p, generators[i])
    return out


@dataclass(frozen=True)
class TokenLogprob:
    """log p(token) under the model's distribution (log-softmax of the raw logits, before temperature /
    top-k / top-p), and the `k` most likely tokens with theirs, most likely first."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...]


def token_logprobs(logits: torch.Tensor, tokens: list[int], k: list[int]) -> list[TokenLogprob]:
    """TokenLogprob of tokens[i] under logits[i] (B, V), with the k[i] most likely tokens of each row."""
    lp = logits.float().log_softmax(dim=-1)  # (B,V)
    chosen = lp.gather(1, torch.tensor(tokens, device=lp.device)[:, None])[:, 0].tolist()
    kmax = max(k, default=0)
    top_v, top_i = (lp.topk(kmax, dim=-1) if kmax else (lp[:, :0], lp[:, :0].long()))
    top_v, top_i = top_v.tolist(), top_i.tolist()
    return [TokenLogprob(t, c, tuple(zip(top_i[r][: k[r]], top_v[r][: k[r]])))
            for r, (t, c) in enumerate(zip(tokens, chosen))]


def is_finished(tokens: list[int], params: SamplingParams) -> str | None:
    """Why a request stops after its newest token: "stop", "length", or None (go on)."""
    if tokens and tokens[-1] in params.stop_token_ids:
        return "stop"
    if len(tokens) >= params.max_new_tokens:
        return "length"
    return None
