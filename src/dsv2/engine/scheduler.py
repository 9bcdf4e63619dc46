"""Continuous batching: requests wait until the cache can hold them, run together, retire one by one.

A request is admitted (FIFO) only when the cache can reserve its whole budget: the prompt plus the
max_new_tokens - 1 generated tokens that will be fed back (the last sampled token never enters the
cache). Because running requests own their blocks outright, a full cache makes new requests wait;
it never evicts or overwrites a running one.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field

import torch

from dsv2.config import ModelConfig
from dsv2.engine.cache import CacheError, PagedCache, SeqSlots
from dsv2.engine.sampling import SamplingParams, TokenLogprob, make_generator


class RequestError(ValueError):
    """A request that can never run (empty, bad token ids, longer than the context or the cache)."""


@dataclass
class Request:
    rid: int
    prompt: list[int]
    params: SamplingParams
    generator: torch.Generator | None = None
    output: list[int] = field(default_factory=list)
    slots: SeqSlots | None = None
    status: str = "waiting"  # waiting | running | finished | failed
    finish_reason: str | None = None  # stop | length | abort | error
    logprobs: list[TokenLogprob] = field(default_factory=list)  # one per output token when params.logprobs is set
    error: str | None = None
    prefill_progress: float = 0.0  # fraction of the prompt's prefill work done (1.0 once prefilled)

    @property
    def budget(self) -> int:
        """Tokens this request will ever write to the cache."""
        return len(self.prompt) + self.params.max_new_tokens - 1


class Scheduler:
    """FIFO admission under a block budget and a batch-size cap; owns the request lifecycle."""

    def __init__(self, cfg: ModelConfig, cache: PagedCache, max_batch: int = 64,
                 device: torch.device | str = "cpu") -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.cfg, self.cache, self.max_batch, self.device = cfg, cache, max_batch, device
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.failed: dict[int, Request] = {}  # rid -> request that raised; popped by whoever reports it
        self._ids = itertools.count()

    def check(self, prompt: list[int], params: SamplingParams) -> None:
        """Raise RequestError / CacheError / SamplingError for a request that can never run."""
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be SamplingParams, got {type(params).__name__}")
        params.validate(self.cfg.vocab_size)
        if len(prompt) == 0:
            raise RequestError("prompt is empty: give at least one token id")
        v = self.cfg.vocab_size
        for i, t in enumerate(prompt):
            if not isinstance(t, int) or not 0 <= t < v:
                raise RequestError(f"prompt[{i}] = {t!r} is not a token id in [0, {v})")
        total = len(prompt) + params.max_new_tokens
        if total > self.cfg.max_position_embeddings:
            raise RequestError(f"request too long: prompt of {len(prompt)} tokens + max_new_tokens="
                               f"{params.max_new_tokens} = {total} > max_position_embeddings="
                               f"{self.cfg.max_position_embeddings}")
        need = len(prompt) + params.max_new_tokens - 1
        if self.cache.blocks_for(need) > self.cache.num_blocks:
            raise CacheError(f"request too long for the cache: it needs {need} tokens "
                             f"({self.cache.blocks_for(need)} blocks of {self.cache.block_size}) but the "
                             f"whole cache holds {self.cache.capacity_tokens} tokens; raise kv_memory")

    def add(self, prompt: list[int], params: SamplingParams) -> Request:
        prompt = [int(t) if isinstance(t, int | torch.Tensor) else t for t in prompt]
        self.check(prompt, params)
        req = Request(next(self._ids), prompt, params, make_generator(params, self.device))
        self.waiting.append(req)
        return req

    def admit(self) -> list[Request]:
        """Move waiting requests (in order) into the running set while blocks and batch slots last."""
        admitted = []
        while self.waiting and len(self.running) < self.max_batch:
            req = self.waiting[0]
            if not self.cache.can_reserve(req.budget):
                break  # FIFO: later requests do not jump the queue
            req.slots = self.cache.reserve(req.budget)
            req.status = "running"
            self.running.append(self.waiting.popleft())
            admitted.append(req)
        return admitted

    def retire(self, req: Request, reason: str, error: str | None = None) -> None:
        """Free the request's blocks and take it out of the running set."""
        if req.slots is not None:
            self.cache.release(req.slots)
            req.slots = None
        if req in self.running:
            self.running.remove(req)
        req.status = "failed" if reason == "error" else "finished"
        req.finish_reason, req.error = reason, error
        if reason == "error":
            self.failed[req.rid] = req

    def abort(self, rid: int) -> Request | None:
        """Finish request `rid` with reason "abort" wherever it is (waiting or running), freeing its blocks.
        Returns the request, or None when no live request has that id."""
        for req in self.waiting:
            if req.rid == rid:
                self.waiting.remove(req)
                self.retire(req, "abort")
                return req
        for req in self.running:
            if req.rid == rid:
                self.retire(req, "abort")
                return req
        return None

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.running
