"""Continuous batching: the one owner of every request's state, and of what each step computes.

A request's progress is one number, `num_computed`: how many of its tokens (prompt, then generated)
have rows in the cache. Each step the scheduler picks work under a token budget
(`max_num_batched_tokens`): first one token for every running request that has finished its prompt
(decode), then prompt chunks (at most `prefill_chunk` tokens each) of requests still prefilling, then
newly admitted requests (FIFO). A request is admitted only when the cache can reserve its whole budget:
the prompt plus the max_new_tokens - 1 generated tokens that will be fed back (the last sampled token
never enters the cache). Because running requests own their blocks outright, a full cache makes new
requests wait; it never evicts or overwrites a running one.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from dsv2.config import ModelConfig
from dsv2.engine.cache import CacheError, PagedCache, SeqSlots
from dsv2.engine.config import EngineConfig
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
    num_computed: int = 0  # tokens (prompt, then generated) whose rows are in the cache
    arrival_time: float = field(default_factory=time.perf_counter)
    first_token_time: float | None = None

    @property
    def budget(self) -> int:
        """Tokens this request will ever write to the cache."""
        return len(self.prompt) + self.params.max_new_tokens - 1

    @property
    def prefilled(self) -> bool:
        return self.num_computed >= len(self.prompt)

    @property
    def prefill_progress(self) -> float:
        """Fraction of the prompt in the cache (1.0 once prefilled)."""
        return min(1.0, self.num_computed / len(self.prompt))

    def next_tokens(self, n: int) -> list[int]:
        """The n tokens to compute next: prompt tokens while prefilling, else the last generated one."""
        if self.prefilled:
            return self.output[-1:]
        return self.prompt[self.num_computed: self.num_computed + n]


class Scheduler:
    """FIFO admission under a block budget and a batch-size cap; owns the request lifecycle."""

    def __init__(self, cfg: ModelConfig, cache: PagedCache, config: EngineConfig,
                 device: torch.device | str = "cpu") -> None:
        self.cfg, self.cache, self.config, self.device = cfg, cache, config, device
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

    def schedule(self) -> list[tuple[Request, int]]:
        """This step's work: (request, number of new tokens) pairs under the token budget, decodes first,
        then prefill chunks of running requests, then newly admitted ones (FIFO)."""
        budget = self.config.max_num_batched_tokens
        plan: list[tuple[Request, int]] = []
        for req in self.running:
            if req.prefilled:
                plan.append((req, 1))
                budget -= 1
        for req in self.running:
            if not req.prefilled and budget > 0:
                n = min(len(req.prompt) - req.num_computed, self.config.prefill_chunk, budget)
                plan.append((req, n))
                budget -= n
        while self.waiting and len(self.running) < self.config.max_batch and budget > 0:
            req = self.waiting[0]
            if not self.cache.can_reserve(req.budget):
                break  # FIFO: later requests do not jump the queue
            req.slots = self.cache.reserve(req.budget)
            req.status = "running"
            self.running.append(self.waiting.popleft())
            n = min(len(req.prompt), self.config.prefill_chunk, budget)
            plan.append((req, n))
            budget -= n
        return plan

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
