"""The user-facing engine: continuous-batching generation over a paged (optionally quantised) cache.

    engine = Engine(model, kv_cache_dtype="bf16", kv_memory="4GiB")
    outs = engine.generate([[1, 5, 9], [1, 7]], SamplingParams(max_new_tokens=32))  # new tokens only
    for ev in engine.stream(prompts, params): print(ev.index, ev.token)

One `step()`: admit waiting requests that fit, advance each prefilling request by about one chunk's
worth of work (a prompt of at most `prefill_chunk` tokens is prefilled whole and samples its first
token), then decode every prefilled request by one token in a single batched forward, then retire
the finished ones. A long prompt is thus prefilled across several steps while the others keep decoding.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from dsv2.engine.cache import PagedCache
from dsv2.engine.runner import ModelRunner
from dsv2.engine.sampling import SamplingParams, is_finished, sample_batch, sample_token, token_logprobs
from dsv2.engine.scheduler import Request, Scheduler
from dsv2.model import DeepseekV2


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
    prefill_tokens: int = 0
    decode_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    steps: int = 0
    max_running: int = 0
    decode_steps: list[tuple[int, float]] = field(default_factory=list)  # (batch size, seconds) per step

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s else 0.0


class Engine:
    """Generation with a paged latent cache (MLA) or per-head K/V cache (MHA/GQA/MQA baselines)."""

    def __init__(self, model: DeepseekV2, kv_cache_dtype: str = "auto", kv_memory: str | int | None = None,
                 max_tokens: int | None = None, block_size: int = 64, max_batch: int = 64,
                 prefill_chunk: int = 512, decode_chunk: int | None = None, rope_bf16: bool = False,
                 kv_group: int | None = None, decode_impl: str = "auto", prefill_impl: str = "layer",
                 compile: bool = False) -> None:
        cfg = model.config
        w = model.lm_head.weight
        self.model, self.cfg, self.device = model.eval(), cfg, w.device
        if kv_memory is None and max_tokens is None:
            # default: room for max_batch full-context sequences, capped at 1 GiB
            per_tok = PagedCache.bytes_per_token_for(cfg, kv_cache_dtype, w.dtype, rope_bf16, kv_group)
            max_tokens = max(block_size, min(max_batch * cfg.max_position_embeddings, (1 << 30) // per_tok))
        self.cache = PagedCache.from_budget(cfg, kv_memory=kv_memory, max_tokens=max_tokens,
                                            block_size=block_size, kv_cache_dtype=kv_cache_dtype,
                                            dtype=w.dtype, device=w.device, rope_bf16=rope_bf16, group=kv_group)
        self.runner = ModelRunner(model, self.cache, prefill_chunk, decode_chunk, decode_impl, prefill_impl)
        self.scheduler = Scheduler(cfg, self.cache, max_batch, w.device)
        self.stats = EngineStats()
        self._prefilling: dict[int, Generator[float, None, torch.Tensor]] = {}  # rid -> its paused prefill
        if compile:
            # the dense MLPs / MoE and norms see fixed shapes per batch size; attention stays eager
            for layer in model.layers:
                layer.mlp.compile(dynamic=True)

    # ---- request API -------------------------------------------------------------------------
    def add_request(self, prompt: Sequence[int], params: SamplingParams | None = None) -> Request:
        """Queue one request (checked now: a request that can never run raises here, nothing queued)."""
        return self.scheduler.add(list(prompt), params or SamplingParams())

    def step(self) -> list[tuple[Request, int]]:
        """Admit, prefill, decode and retire once. Returns (request, new token) pairs of this step.

        Each prefilling request advances by about one chunk's worth of work per step (a prompt of at
        most `prefill_chunk` tokens is prefilled in one go), so one long prompt never stalls the
        decoding of the others for more than that; a request joins the decode batch once prefilled."""
        sch, events = self.scheduler, []
        self.stats.steps += 1
        running = {r.rid for r in sch.running}
        for rid in [rid for rid in self._prefilling if rid not in running]:  # retired from outside
            self._prefilling.pop(rid).close()
        for req in sch.admit():
            self._prefilling[req.rid] = self.runner.prefill_steps(req.slots, req.prompt)
        for req in [r for r in sch.running if r.rid in self._prefilling]:
            try:
                logits = self._advance_prefill(req)
                if logits is None:
                    continue  # more of the prompt next step
                tok = sample_token(logits, req.params, req.generator)
            except Exception as e:  # one bad request must not take the others (or the cache) down
                self._prefilling.pop(req.rid, None)
                sch.retire(req, "error", f"{type(e).__name__}: {e}")
                continue
            events.append(self._emit(req, tok, logits[None]))
        batch = [r for r in sch.running if r.rid not in self._prefilling]  # includes the just-prefilled
        self.stats.max_running = max(self.stats.max_running, len(batch))
        if batch:
            t0 = time.perf_counter()
            logits = self.runner.decode([r.slots for r in batch], [r.output[-1] for r in batch])
            toks = self._sample(batch, logits)
            dt = time.perf_counter() - t0
            self.stats.decode_s += dt
            self.stats.decode_tokens += len(batch)
            self.stats.decode_steps.append((len(batch), dt))
            events.extend(self._emit(r, t, logits[i: i + 1]) for i, (r, t) in enumerate(zip(batch, toks))
                          if t is not None)
        return events

    def abort(self, rid: int) -> bool:
        """Stop request `rid` wherever it is (queued, prefilling, decoding): its blocks are freed now and it
        finishes with reason "abort". False when no live request has that id (already finished, unknown)."""
        req = self.scheduler.abort(rid)
        if req is None:
            return False
        gen = self._prefilling.pop(rid, None)
        if gen is not None:
            gen.close()
        return True

    def has_unfinished(self) -> bool:
        """Whether any request is still queued or running."""
        return not self.scheduler.idle

    def _advance_prefill(self, req: Request) -> torch.Tensor | None:
        """One piece of `req`'s prefill: None while more of the prompt remains, else the last logits (V,)."""
        t0 = time.perf_counter()
        try:
            req.prefill_progress = next(self._prefilling[req.rid])
            return None
        except StopIteration as done:
            del self._prefilling[req.rid]
            req.prefill_progress = 1.0
            self.stats.prefill_tokens += len(req.prompt)
            return done.value
        finally:
            self.stats.prefill_s += time.perf_counter() - t0

    def _sample(self, batch: list[Request], logits: torch.Tensor) -> list[int | None]:
        try:
            return sample_batch(logits, [r.params for r in batch], [r.generator for r in batch])
        except Exception:  # e.g. NaN logits in one row: fail that request only
            toks: list[int | None] = []
            for r, row in zip(batch, logits):
                try:
                    toks.append(sample_token(row, r.params, r.generator))
                except Exception as e:
                    self.scheduler.retire(r, "error", f"{type(e).__name__}: {e}")
                    toks.append(None)
            return toks

    def _emit(self, req: Request, tok: int, logits: torch.Tensor) -> tuple[Request, int]:
        """Record `req`'s new token (and its log-probabilities under logits (1, V) when asked for)."""
        req.output.append(tok)
        if req.params.logprobs is not None:
            req.logprobs.extend(token_logprobs(logits, [tok], [req.params.logprobs]))
        reason = is_finished(req.output, req.params)
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
                "free_blocks": c.allocator.num_free, "num_blocks": c.num_blocks}
