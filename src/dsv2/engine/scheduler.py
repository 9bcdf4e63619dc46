"""Continuous batching: the one owner of every request's state, and of what each step computes.

A request's progress is one number, `num_computed`: how many of its tokens (prompt, then generated)
have rows in the cache. Each step the scheduler picks work under a token budget
(`max_num_batched_tokens`): one token for every running request that is decoding, then prompt chunks
(at most `prefill_chunk` tokens each) of requests still prefilling, then newly admitted requests (FIFO).

Policies:
- **Blocks on demand.** A running request takes a new cache block only when its tokens cross a block
  boundary (`BlockManager.allocate`), so a request asking for 2,048 new tokens that stops after 60
  holds 60 tokens' worth of blocks, not 2,048.
- **Admission** takes the head of the queue while a batch slot, the token budget and the blocks for
  its first chunk are there, keeping a small watermark of free blocks for the running requests' growth
  (`EngineConfig.watermark`; none when nothing else runs, so a request that fits alone always runs).
- **Preemption.** When a running request needs a block and none is free, the most recently admitted
  running request is preempted: its blocks are freed and it goes back to the head of the queue. When
  readmitted it recomputes its prompt and the tokens generated so far (most of them usually come back
  as prefix-cache hits) and continues with the same sampler state, so its output does not change. No
  request is admitted in a step that preempted.
- **Prefix caching.** Full computed blocks are registered under a hash of their tokens and everything
  before them (and the cache format); a new request starts from the longest cached run matching its
  prompt, shared by reference, and computes only the rest. Finished requests' blocks stay cached until
  the space is needed (least recently used first). See `dsv2.engine.blocks`.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from dsv2.config import ModelConfig
from dsv2.engine.blocks import BlockManager
from dsv2.engine.cache import CacheError, PagedCache
from dsv2.engine.config import EngineConfig
from dsv2.engine.detok import Detokenizer
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
    status: str = "waiting"  # waiting | running | finished | failed
    finish_reason: str | None = None  # stop | length | abort | error
    logprobs: list[TokenLogprob] = field(default_factory=list)  # one per output token when params.logprobs is set
    error: str | None = None
    num_computed: int = 0  # tokens (prompt, then generated) whose rows are in the cache
    arrival_time: float = field(default_factory=time.perf_counter)
    first_token_time: float | None = None
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache at (the first) admission
    num_preemptions: int = 0
    detok: Detokenizer | None = None  # when the engine has a tokenizer: the output's text, stop strings
    text: str = ""  # the output's visible text so far (with a tokenizer; a stop string is never included)

    @property
    def budget(self) -> int:
        """Tokens this request can ever write to the cache."""
        return len(self.prompt) + self.params.max_new_tokens - 1

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output

    @property
    def pending(self) -> int:
        """Tokens not yet in the cache (1 while decoding: the last sampled token)."""
        return len(self.prompt) + len(self.output) - self.num_computed

    @property
    def decoding(self) -> bool:
        return bool(self.output) and self.pending == 1

    @property
    def prefilled(self) -> bool:
        return self.num_computed >= len(self.prompt)

    @property
    def prefill_progress(self) -> float:
        """Fraction of the prompt in the cache (1.0 once prefilled)."""
        return min(1.0, self.num_computed / len(self.prompt))

    def next_tokens(self, n: int) -> list[int]:
        """The n tokens to compute next (prompt tokens, or generated ones being fed back)."""
        if self.num_computed >= len(self.prompt):
            return self.output[self.num_computed - len(self.prompt): self.num_computed - len(self.prompt) + n]
        return self.tokens[self.num_computed: self.num_computed + n]


class Scheduler:
    """FIFO admission under blocks, a token budget and a batch-size cap; owns the request lifecycle."""

    def __init__(self, cfg: ModelConfig, cache: PagedCache, config: EngineConfig,
                 device: torch.device | str = "cpu") -> None:
        self.cfg, self.cache, self.config, self.device = cfg, cache, config, device
        fmt = cache.format
        key = f"{fmt.name}:" + ",".join(f"{g.kind}/{g.group}" for g in fmt.segments)
        self.blocks = BlockManager(cache.num_blocks, cache.block_size, config.prefix_caching, key)
        self.watermark = max(1, int(config.watermark * cache.num_blocks)) if config.watermark > 0 else 0
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.failed: dict[int, Request] = {}  # rid -> request that raised; popped by whoever reports it
        self.num_preemptions = 0
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
        then prefill chunks of running requests, then newly admitted ones (FIFO). Blocks for every
        scheduled token are allocated here (preempting if needed)."""
        budget = self.config.max_num_batched_tokens
        plan: list[tuple[Request, int]] = []
        preempted = False
        for req in [r for r in self.running if r.decoding] + [r for r in self.running if not r.decoding]:
            if req.status != "running" or budget <= 0:
                continue
            n = 1 if req.decoding else min(req.pending, self.config.prefill_chunk, budget)
            while not self.blocks.allocate(req.rid, req.num_computed + n):
                victim = self.running[-1]  # the most recently admitted
                self.preempt(victim)
                preempted = True
                if victim is req:
                    break
            if req.status == "running":
                plan.append((req, n))
                budget -= n
        while not preempted and self.waiting and len(self.running) < self.config.max_batch and budget > 0:
            req = self.waiting[0]
            toks = req.tokens
            hits = self.blocks.peek_prefix(toks)
            n = min(len(toks) - hits, self.config.prefill_chunk, budget)
            # "reserve" (for comparison): blocks for the whole budget up front, as engines without
            # preemption must; "on_demand": the first chunk's only
            want = req.budget if self.config.allocation == "reserve" else hits + n
            got = self.blocks.admit(req.rid, toks, want, reserve=self.watermark if self.running else 0)
            if got is None:
                break  # FIFO: later requests do not jump the queue
            if req.num_preemptions == 0:
                req.num_cached_tokens = got
            req.num_computed, req.status = got, "running"
            self.running.append(self.waiting.popleft())
            n = min(len(toks) - got, self.config.prefill_chunk, budget)
            plan.append((req, n))
            budget -= n
        return [(r, n) for r, n in plan if r.status == "running"]

    def block_table(self, req: Request) -> list[int]:
        return self.blocks.block_table(req.rid)

    def computed(self, req: Request, n: int) -> None:
        """`req`'s n scheduled tokens now have rows in every layer: advance it and register its full blocks."""
        req.num_computed += n
        bs = self.cache.block_size
        if req.num_computed // bs > (req.num_computed - n) // bs:
            self.blocks.cache_full_blocks(req.rid, req.tokens, req.num_computed)

    def preempt(self, req: Request) -> None:
        """Free a running request's blocks and put it back at the head of the queue (recomputed later)."""
        self.blocks.free(req.rid)
        self.running.remove(req)
        req.num_computed, req.status = 0, "waiting"
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    def retire(self, req: Request, reason: str, error: str | None = None) -> None:
        """Free the request's blocks and take it out of the running set."""
        if req.rid in self.blocks:
            self.blocks.free(req.rid)
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
