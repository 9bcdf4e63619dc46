"""The engine loop: one background thread owns the Engine; asyncio handlers talk to it through queues.

Handlers `submit` jobs (one per completion choice) and `abort` them; both only put a command on a
thread-safe inbox. The loop thread drains the inbox, runs `engine.step()` and hands each new token, with
the visible text it added (`Request.text`: the engine's detokenizer completes UTF-8 and holds back what
could start a stop string; a completed stop string retires the request inside the engine, so its blocks
are free before the next step), back to its job's sink as a `Delta`, which wakes the handler's asyncio
queue with `call_soon_threadsafe`.

Prompt log-probabilities (`echo` with `logprobs`) come from a plain `model(prompt)` forward on this
thread before the request is queued: log-softmax of the logits at position t-1 scores prompt token t.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from dsv2.engine import CacheError, Engine, RequestError, SamplingError, SamplingParams
from dsv2.engine.sampling import TokenLogprob, token_logprobs
from dsv2.serve.metrics import ServerMetrics

log = logging.getLogger("dsv2.serve")
IDLE_WAIT_S = 0.05


@dataclass
class Delta:
    """What one job produced since its last Delta. `finish_reason` is set on its last one."""

    text: str = ""
    tokens: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None  # stop | length | abort
    prompt_logprobs: list[TokenLogprob | None] | None = None  # first Delta only, when asked for


@dataclass
class Failure:
    """The job failed: `status` 400 (the engine refused the request) or 500 (internal error)."""

    status: int
    message: str
    param: str | None = None


@dataclass
class Job:
    """One engine request on behalf of one completion choice."""

    prompt: list[int]
    params: SamplingParams
    sink: Callable[[Delta | Failure], None]  # thread-safe: hands an item to the waiting handler
    prompt_logprobs: int | None = None  # top-k for each prompt token (echo + logprobs), None = off
    arrival: float = field(default_factory=time.perf_counter)
    # owned by the loop thread
    rid: int | None = None
    req: object | None = None
    admitted: bool = False
    n_out: int = 0  # tokens handed out so far
    n_text: int = 0  # characters of the request's text handed out so far
    last_token_t: float | None = None


class QueueFull(Exception):
    """More requests are waiting for admission than --max-queue allows."""


class ServerStopping(Exception):
    """The loop is stopping (shutdown): no new requests."""


class EngineLoop:
    """Runs `engine` (made with a tokenizer: the text of the output and stop strings) on a daemon thread
    until `stop()`."""

    def __init__(self, engine: Engine, model: torch.nn.Module, metrics: ServerMetrics, max_queue: int) -> None:
        if engine.tokenizer is None:
            raise ValueError("EngineLoop needs an engine with a tokenizer: Engine(model, tokenizer=...)")
        self.engine, self.model, self.metrics = engine, model, metrics
        self.max_queue = max_queue
        self._inbox: queue.SimpleQueue[tuple[str, object]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._waiting = 0  # accepted jobs not yet admitted by the engine (guarded by _lock)
        self._jobs: dict[int, Job] = {}  # rid -> live job (loop thread only)
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dsv2-engine-loop", daemon=True)
        self.alive = False

    # ---- any thread --------------------------------------------------------------------------
    def start(self) -> None:
        self.alive = True
        self._thread.start()

    def submit(self, jobs: list[Job]) -> None:
        """Queue jobs (all or none); QueueFull when they would overfill the admission queue."""
        with self._lock:
            if self._stopping.is_set():
                raise ServerStopping("the server is shutting down")
            if self._waiting + len(jobs) > self.max_queue:
                raise QueueFull(f"{self._waiting} requests are waiting (max {self.max_queue})")
            self._waiting += len(jobs)
        self._inbox.put(("add", jobs))

    def abort(self, jobs: list[Job]) -> None:
        """Abort these jobs (those still running; the finished ones are ignored)."""
        self._inbox.put(("abort", jobs))

    @property
    def waiting(self) -> int:
        with self._lock:
            return self._waiting

    def stop(self, timeout: float = 10.0) -> None:
        """Abort everything still running and end the thread."""
        with self._lock:
            self._stopping.set()
        self._inbox.put(("stop", None))
        if self._thread.is_alive():
            self._thread.join(timeout)
        self.alive = False

    # ---- loop thread -------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            cmds = [] if self.engine.has_unfinished() else [self._inbox.get()]  # idle: sleep until told
            while True:
                try:
                    cmds.append(self._inbox.get_nowait())
                except queue.Empty:
                    break
            try:
                if not self._iterate(cmds):
                    return
            except Exception:  # a bug here must not leave every handler waiting forever
                log.exception("engine loop iteration failed")
                for job in list(self._jobs.values()):
                    self._fail(job, "internal error in the engine loop")

    def _iterate(self, cmds: list[tuple[str, object]]) -> bool:
        """Apply the commands, then run one engine step; False once told to stop."""
        for kind, arg in cmds:
            if kind == "add":
                for job in arg:
                    self._add(job)
            elif kind == "abort":
                for job in arg:
                    self._finish(job, "abort", abort=True)
            elif kind == "stop":
                for job in list(self._jobs.values()):
                    self._finish(job, "abort", abort=True)
                self._update_gauges()
                return False
        if self.engine.has_unfinished():
            self._step()
        self._update_gauges()
        return True

    def _add(self, job: Job) -> None:
        try:
            pl = self._prompt_logprobs(job.prompt, job.prompt_logprobs) if job.prompt_logprobs is not None else None
            req = self.engine.add_request(job.prompt, job.params)
        except (RequestError, SamplingError, CacheError) as e:
            self._dequeue(job)
            job.sink(Failure(400, str(e), "prompt" if isinstance(e, RequestError) else "max_tokens"))
            return
        except Exception:
            log.exception("adding a request failed")
            self._dequeue(job)
            job.sink(Failure(500, "internal error while queueing the request"))
            return
        job.req, job.rid = req, req.rid
        self._jobs[req.rid] = job
        self.metrics.prompt_tokens.inc(len(job.prompt))
        if pl is not None:
            job.sink(Delta(prompt_logprobs=pl))

    @torch.no_grad()
    def _prompt_logprobs(self, prompt: list[int], k: int) -> list[TokenLogprob | None]:
        """log p(prompt[t] | prompt[:t]) and the top-k at each t >= 1 (None for the first token)."""
        if len(prompt) < 2:
            return [None] * len(prompt)
        dev = next(self.model.parameters()).device
        logits = self.model(torch.tensor([prompt], device=dev))[0]  # (T,V)
        return [None, *token_logprobs(logits[:-1], prompt[1:], [k] * (len(prompt) - 1))]

    def _step(self) -> None:
        try:
            events = self.engine.step()
        except Exception:  # the engine itself broke: fail what is running, keep serving
            log.exception("engine step failed")
            for job in list(self._jobs.values()):
                self._fail(job, "internal error in the engine")
            return
        now = time.perf_counter()
        for req, tok in events:
            job = self._jobs.get(req.rid)
            if job is None:
                continue
            self._admitted(job)
            m = self.metrics
            m.generation_tokens.inc()
            if job.last_token_t is None:
                m.ttft.observe(now - job.arrival)
            else:
                m.itl.observe(now - job.last_token_t)
            job.last_token_t = now
            # one step can yield two tokens of a request (its prefill's and its first decode's): count them here
            lps = req.logprobs[job.n_out: job.n_out + 1] if job.params.logprobs is not None else []
            job.n_out += 1
            delta = Delta(req.text[job.n_text:], [tok], list(lps))  # (a stop string's text is never in it)
            job.n_text = len(req.text)
            if req.status == "failed":
                self._fail(job, "internal error while generating")
            elif req.status != "running":  # finished: length, eos or a stop string (retired by the engine)
                self._finish(job, req.finish_reason, last=delta)
            else:
                job.sink(delta)
        for job in list(self._jobs.values()):  # admissions without a token yet, and failures without one
            status = job.req.status
            if status != "waiting":
                self._admitted(job)
            if status == "failed":
                self._fail(job, "internal error while generating")

    def _admitted(self, job: Job) -> None:
        if not job.admitted:
            job.admitted = True
            self._dequeue(job)

    def _dequeue(self, job: Job) -> None:
        with self._lock:
            self._waiting -= 1

    def _fail(self, job: Job, message: str) -> None:
        log.error("request %s failed: %s", job.rid, getattr(job.req, "error", None))
        self.engine.scheduler.failed.pop(job.rid, None)  # reported here: the engine need not keep it
        if self._finish(job, "error", abort=True, last=None):
            job.sink(Failure(500, message))

    def _finish(self, job: Job, reason: str, abort: bool = False, last: Delta | None = None) -> bool:
        """Retire a live job: abort it in the engine if asked, count it, and send its final Delta
        (`last` with finish_reason set; none for "error", whose caller sends a Failure). False if not live."""
        if self._jobs.pop(job.rid, None) is None:
            return False
        if abort:
            self.engine.abort(job.rid)
        self._admitted(job)
        self.metrics.requests.labels(reason).inc()
        self.metrics.e2e.observe(time.perf_counter() - job.arrival)
        if reason != "error":
            last = last or Delta()
            last.finish_reason = reason
            job.sink(last)
        return True

    def _update_gauges(self) -> None:
        sch = self.engine.scheduler
        self.metrics.set_engine_state(len(sch.running), len(sch.waiting), self.engine.cache_report(),
                                      self.engine.stats)
