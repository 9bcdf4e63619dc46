"""The realistic request mix of the scheduler issue, shared by throughput.py (and anything driving an Engine).

Prompts of 32-512 random tokens, every request asking `max_new_tokens=512`, and each output ending
after 16-128 tokens as if it had hit a stop token. A random-weight model cannot be made to emit a stop
token on cue, so the driver stands in for it: after the k-th token it aborts the request, which frees
its blocks exactly as a stop token would (`finish_reason` is "abort" instead of "stop"; the cache,
the scheduler and the timings see the same thing). The scheduler is not told k: like a real engine it
only knows max_new_tokens.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

from dsv2.engine import Engine, SamplingParams


@dataclass(frozen=True)
class Job:
    prompt: list[int]
    stop_after: int  # tokens after which the output "hits its stop token"
    max_new_tokens: int = 512


def realistic_mix(n: int, vocab: int, seed: int = 0, prompt_len: tuple[int, int] = (32, 512),
                  stop_after: tuple[int, int] = (16, 128), max_new_tokens: int = 512) -> list[Job]:
    rng = random.Random(seed)
    return [Job([rng.randrange(vocab) for _ in range(rng.randint(*prompt_len))], rng.randint(*stop_after),
                max_new_tokens) for _ in range(n)]


def drive(eng: Engine, jobs: list[Job]) -> dict[str, float]:
    """Submit every job at once and step until all end; returns sequences held (most and mean running per
    decode step), generated tokens/s end to end and in decode, and the wall time."""
    reqs = [(eng.add_request(j.prompt, SamplingParams(max_new_tokens=j.max_new_tokens)), j) for j in jobs]
    running: list[int] = []
    t0 = time.perf_counter()
    while eng.has_unfinished():
        eng.step()
        running.append(len(eng.scheduler.running))
        for req, job in reqs:
            if req.status == "running" and len(req.output) >= job.stop_after:
                eng.abort(req.rid)
    wall = time.perf_counter() - t0
    n = sum(min(len(r.output), j.stop_after) for r, j in reqs)
    st = eng.stats
    busy = [r for r in running if r]
    return {"max_running": max(running, default=0), "mean_running": sum(busy) / max(len(busy), 1),
            "tok_s": n / wall, "decode_tok_s": st.decode_tokens_per_s, "wall": wall,
            "preemptions": st.preemptions}
