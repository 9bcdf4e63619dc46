"""The user-facing engine: continuous-batching generation over a paged (optionally quantised) cache.

    engine = Engine(model, kv_cache_dtype="bf16", kv_memory="4GiB")
    outs = engine.generate([[1, 5, 9], [1, 7]], SamplingParams(max_new_tokens=32))  # new tokens only
    for ev in engine.stream(prompts, params): print(ev.index, ev.token)

One `step()`: the scheduler picks the step's tokens under a token budget (one per decoding request,
then prompt chunks of prefilling and newly admitted requests), the runner computes them all in one
forward of the model over the paged cache, requests whose logits are ready sample, and finished
requests retire. A long prompt is thus prefilled across several steps while the others keep decoding.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from dsv2.engine.cache import CacheError, PagedCache
from dsv2.engine.config import EngineConfig, EngineConfigError
from dsv2.engine.detok import Detokenizer
from dsv2.engine.runner import ModelRunner, SeqWork
from dsv2.engine.sampling import SamplingParams, greedy_ids, is_finished, sample_token, token_logprobs
from dsv2.engine.scheduler import Request, RequestError, Scheduler
from dsv2.fuse import fuse_gate_up
from dsv2.model import DeepseekV2
from dsv2.precision import prepare
from dsv2.quant.kernels import QuantError
from dsv2.quant.swap import set_int8_activations
from dsv2.resident import make_resident, reuse_freed_memory


class GenerationError(RuntimeError):
    """Some requests of a `generate` call failed; `outputs` holds every request's tokens anyway."""

    def __init__(self, msg: str, outputs: list[list[int]], errors: dict[int, str]) -> None:
        super().__init__(msg)
        self.outputs, self.errors = outputs, errors


@dataclass(frozen=True)
class TokenEvent:
    """One generated token of request `index` (its position in the prompts list, or its request id)."""

    index: int
    token: int
    finished: bool
    finish_reason: str | None = None  # stop | length | error
    error: str | None = None  # what went wrong when finish_reason is "error" (token is then -1)


@dataclass
class EngineStats:
    """The engine's counters. The prefix cache's and the scheduler's are read from their owners (the block
    manager's `BlockStats`, the scheduler's preemption count) when asked, not copied."""

    prefill_tokens: int = 0
    decode_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    steps: int = 0
    max_running: int = 0
    decode_steps: list[tuple[int, float]] = field(default_factory=list)  # (batch size, seconds) per step
    scheduler: Scheduler | None = field(default=None, repr=False, compare=False)

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s else 0.0

    @property
    def prefix_hit_tokens(self) -> int:
        """Prompt tokens not computed thanks to the prefix cache."""
        return self.scheduler.blocks.stats.hit_tokens if self.scheduler is not None else 0

    @property
    def prefix_hit_rate(self) -> float:
        """Fraction of looked-up prompt tokens found in the prefix cache."""
        return self.scheduler.blocks.stats.hit_rate if self.scheduler is not None else 0.0

    @property
    def preemptions(self) -> int:
        return self.scheduler.num_preemptions if self.scheduler is not None else 0


class Engine:
    """Generation with a paged latent cache (MLA) or per-head K/V cache (MHA/GQA/MQA baselines).

    `Engine(model, config)` or `Engine(model, **fields of EngineConfig)`; `tokenizer` (anything with
    `decode(ids) -> str`, e.g. a `tokenizers.Tokenizer`) gives requests their text (`Request.text`,
    decoded incrementally) and makes `SamplingParams.stop` strings work. The engine takes the model as
    it is given and changes it in place: eval mode, for a bf16/fp16 model on the CPU the precision pass
    of `dsv2.precision.prepare`, and (without `compile`) `dsv2.fuse.fuse_gate_up` (gate and up
    projections as one matmul); both keep the same parameters and results, with faster matmuls.
    """

    def __init__(self, model: DeepseekV2, config: EngineConfig | None = None, tokenizer: Any = None,
                 **kwargs: Any) -> None:
        if config is not None and kwargs:
            raise TypeError(f"give either config or EngineConfig fields, not both (got {sorted(kwargs)})")
        config = config if config is not None else EngineConfig(**kwargs)
        cfg = model.config
        # weights left as file pages are re-read from disk when the kernel evicts them (issue 13)
        self.resident_bytes = (make_resident(model, keep_embeddings_mapped=not config.resident_embedding)
                               if config.resident else 0)
        w = model.embed_tokens.weight
        # each step's activations from reused heap blocks, not fresh page-faulted mappings
        self.malloc_tuned = config.reuse_freed_memory and w.device.type == "cpu" and reuse_freed_memory()
        self.model, self.cfg, self.device = prepare(model.eval()), cfg, w.device
        try:  # the config owns this switch of the quantised modules: set either way
            set_int8_activations(model, config.int8_activations)
        except QuantError as e:
            raise EngineConfigError(f"EngineConfig.int8_activations: {e}") from None
        if not config.compile:  # (a compiled step fuses on its own; its frozen weights must not be views)
            fuse_gate_up(model)  # gate and up projections as one matmul (same parameters, views of one storage)
        if config.kv_memory is None and config.max_tokens is None:
            # default: room for max_batch full-context sequences, capped at 1 GiB
            per_tok = PagedCache.bytes_per_token_for(cfg, config.kv_cache_dtype, w.dtype, config.rope_bf16,
                                                     config.kv_group)
            config = replace(config, max_tokens=max(config.block_size, min(
                config.max_batch * cfg.max_position_embeddings, (1 << 30) // per_tok)))
        self.config = config
        self.cache = PagedCache.from_budget(cfg, kv_memory=config.kv_memory, max_tokens=config.max_tokens,
                                            block_size=config.block_size, kv_cache_dtype=config.kv_cache_dtype,
                                            dtype=w.dtype, device=w.device, rope_bf16=config.rope_bf16,
                                            group=config.kv_group)
        self.runner = ModelRunner(model, self.cache, config)
        self.scheduler = Scheduler(cfg, self.cache, config, w.device)
        self.stats = EngineStats(scheduler=self.scheduler)
        self.tokenizer = tokenizer
        self._reservations = itertools.count()

    # ---- request API -------------------------------------------------------------------------
    def add_request(self, prompt: Sequence[int], params: SamplingParams | None = None) -> Request:
        """Queue one request (checked now: a request that can never run raises here, nothing queued)."""
        params = params or SamplingParams()
        if params.stop and self.tokenizer is None:
            raise RequestError("SamplingParams.stop needs text: create the engine with Engine(..., tokenizer=...)")
        req = self.scheduler.add(list(prompt), params)
        if self.tokenizer is not None:
            req.detok = Detokenizer(self.tokenizer, params.stop)
        return req

    def abort(self, rid: int) -> bool:
        """Stop request `rid` wherever it is (queued, prefilling, decoding): its blocks are freed now and it
        finishes with reason "abort". False when no live request has that id (already finished, unknown)."""
        return self.scheduler.abort(rid) is not None

    @contextmanager
    def reserve(self, tokens: int) -> Iterator[list[int]]:
        """Blocks for `tokens` tokens of cache rows outside any request, as a block table (consecutive where
        free blocks allow), taken from the scheduler's block manager (the one owner of blocks: running and
        later requests never get them) and given back when the `with` block ends. For code that drives
        `engine.runner` itself (`kv_quality`, benchmarks). CacheError when they cannot be had now."""
        blocks = self.scheduler.blocks
        need = blocks.blocks_for(tokens)
        if need > blocks.num_blocks:
            raise CacheError(f"a sequence of {tokens} tokens needs {need} blocks but the whole cache has "
                             f"{blocks.num_blocks} ({blocks.num_blocks * blocks.block_size} tokens)")
        rid = ("reserved", next(self._reservations))  # never a request id (those are ints)
        if not blocks.allocate(rid, tokens):
            raise CacheError(f"need {need} blocks for {tokens} tokens, {blocks.num_free} free of {blocks.num_blocks}")
        try:
            yield blocks.block_table(rid)
        finally:
            blocks.free(rid)

    def has_unfinished(self) -> bool:
        """Whether any request is still queued or running."""
        return not self.scheduler.idle

    def step(self) -> list[tuple[Request, int]]:
        """Schedule, run one forward over every scheduled token, sample, retire. Returns (request, new
        token) pairs of this step.

        A step carries one token of every decoding request and prompt chunks of prefilling ones (a long
        prompt is prefilled over several steps, so it never stalls the others' decoding for long); a
        request samples its first token in the step that computes the end of its prompt."""
        sch = self.scheduler
        plan = sch.schedule()
        self.stats.steps += 1
        if not plan:
            return []
        work = [SeqWork(sch.block_table(r), r.num_computed, r.next_tokens(n),
                        "last" if n == r.pending else "none") for r, n in plan]
        decoding = [r.decoding for r, _ in plan]
        t0 = time.perf_counter()
        results = self._execute(plan, work)
        dt = time.perf_counter() - t0
        n_dec = sum(decoding)
        n_pre = sum(n for (_, n), d in zip(plan, decoding) if not d)
        self.stats.prefill_tokens += n_pre
        self.stats.decode_tokens += n_dec
        self.stats.prefill_s += dt * n_pre / (n_pre + n_dec)  # a mixed step's time is shared by tokens
        self.stats.decode_s += dt * n_dec / (n_pre + n_dec)
        if n_dec:
            self.stats.decode_steps.append((n_dec, dt))
        self.stats.max_running = max(self.stats.max_running, len(sch.running))
        ready = []
        for (req, n), logits in zip(plan, results):
            if req.status != "running":  # failed in _execute
                continue
            sch.computed(req, n)
            if logits is not None:
                ready.append((req, logits))
        return self._sample(ready)

    def _execute(self, plan: list[tuple[Request, int]], work: list[SeqWork]) -> list[torch.Tensor | None]:
        """The step's forward; if it raises, each request is retried alone and those that fail again fail
        alone (their rows at the step's slots are rewritten by the retry, so nothing stale is read)."""
        try:
            return self.runner.execute(work)
        except Exception as e:
            if len(work) == 1:
                self.scheduler.retire(plan[0][0], "error", f"{type(e).__name__}: {e}")
                return [None]
        out: list[torch.Tensor | None] = []
        for (req, _), w in zip(plan, work):
            try:
                out.extend(self.runner.execute([w]))
            except Exception as e:
                self.scheduler.retire(req, "error", f"{type(e).__name__}: {e}")
                out.append(None)
        return out

    def _sample(self, ready: list[tuple[Request, torch.Tensor]]) -> list[tuple[Request, int]]:
        """Next token of every request whose logits (V,) are ready. Each row draws from its own generator
        exactly once, so a request that fails (e.g. NaN logits) changes nothing for its neighbours."""
        if not ready:
            return []
        # (B,V); one row (batch-1 decode) as a view, not a copy of a vocabulary-wide row
        logits = ready[0][1][None] if len(ready) == 1 else torch.stack([lg for _, lg in ready])
        greedy = [i for i, (r, _) in enumerate(ready) if r.params.greedy]
        toks: list[int | None] = [None] * len(ready)
        if greedy:
            rows = logits if len(greedy) == len(ready) else logits[greedy]
            for i, t in zip(greedy, greedy_ids(rows).tolist()):
                toks[i] = int(t)
        for i, (req, row) in enumerate(ready):
            if not req.params.greedy:
                try:
                    toks[i] = sample_token(row, req.params, req.generator)
                except Exception as e:
                    self.scheduler.retire(req, "error", f"{type(e).__name__}: {e}")
        now = time.perf_counter()
        return [self._emit(req, tok, logits[i: i + 1], now) for i, ((req, _), tok) in enumerate(zip(ready, toks))
                if tok is not None]

    def _emit(self, req: Request, tok: int, logits: torch.Tensor, now: float) -> tuple[Request, int]:
        """Record `req`'s new token (and its log-probabilities under logits (1, V) when asked for)."""
        req.output.append(tok)
        if req.first_token_time is None:
            req.first_token_time = now
        if req.params.logprobs is not None:
            req.logprobs.extend(token_logprobs(logits, [tok], [req.params.logprobs]))
        reason = is_finished(req.output, req.params)
        if req.detok is not None:
            req.text += req.detok.add(tok)
            if req.detok.stopped:  # a stop string completed: its text is not part of the output
                reason = "stop"
            elif reason is not None:
                req.text += req.detok.flush()
        if reason is not None:
            self.scheduler.retire(req, reason)
        return req, tok

    # ---- batch API ---------------------------------------------------------------------------
    def stream(self, prompts: Sequence[Sequence[int]],
               params: SamplingParams | Sequence[SamplingParams] | None = None,
               on_step: Callable[[list[Request]], None] | None = None) -> Iterator[TokenEvent]:
        """Yield TokenEvents as tokens are produced; `index` is the prompt's position in `prompts`.

        on_step, if given, is called after every engine step with this call's requests in prompt order
        (e.g. to show `Request.prefill_progress` of long prompts, which produce no event for a while)."""
        plist = self._params_list(prompts, params)
        for p, sp in zip(prompts, plist):  # check everything before queueing anything
            self.scheduler.check([int(t) for t in p], sp)
        reqs = [self.add_request(p, sp) for p, sp in zip(prompts, plist)]
        index = {r.rid: i for i, r in enumerate(reqs)}
        pending = set(index)
        while pending:
            if self.scheduler.idle:
                raise RuntimeError("engine went idle with requests pending (internal error)")
            events = self.step()
            if on_step is not None:
                on_step(reqs)
            for req, tok in events:
                if req.rid in index:
                    done = req.status != "running"
                    if done:
                        pending.discard(req.rid)
                    yield TokenEvent(index[req.rid], tok, done, req.finish_reason if done else None)
            for rid in list(pending):  # a request that failed (its blocks are already freed)
                req = self.scheduler.failed.pop(rid, None)
                if req is not None:
                    pending.discard(rid)
                    yield TokenEvent(index[rid], -1, True, "error", req.error)

    def generate(self, prompts: Sequence[Sequence[int]],
                 params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[list[int]]:
        """New tokens of every prompt (in order), generated with continuous batching."""
        out: list[list[int]] = [[] for _ in prompts]
        errors: dict[int, str] = {}
        for ev in self.stream(prompts, params):
            if ev.finish_reason == "error":
                errors[ev.index] = ev.error or "error"
            else:
                out[ev.index].append(ev.token)
        if errors:
            raise GenerationError(f"requests {sorted(errors)} failed (the others finished)", out, errors)
        return out

    @staticmethod
    def _params_list(prompts: Sequence, params: SamplingParams | Sequence[SamplingParams] | None
                     ) -> list[SamplingParams]:
        if params is None:
            return [SamplingParams()] * len(prompts)
        if isinstance(params, SamplingParams):
            return [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"params has {len(params)} entries for {len(prompts)} prompts")
        return list(params)

    # ---- reporting ---------------------------------------------------------------------------
    def cache_report(self) -> dict[str, float | int | str]:
        c = self.cache
        return {"kv_cache_dtype": c.format.name, "bytes_per_token": c.bytes_per_token,
                "bits_per_element": round(c.format.bits_per_element(), 3),
                "capacity_tokens": c.capacity_tokens, "cache_bytes": c.nbytes(),
                "free_blocks": self.scheduler.blocks.num_free, "cached_blocks": self.scheduler.blocks.num_cached,
                "num_blocks": c.num_blocks}
