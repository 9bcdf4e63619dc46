"""How many intra-op threads to run torch with: the cores that are idle now, unless told.

PyTorch's CPU kernels split each op across an OpenMP team and wait at the end of every op for the
slowest thread. When another process keeps one of the cores busy, the thread that shares that core
gets a time slice only now and then, and every op of a decode step (hundreds per token) waits for it:
with 2 threads on 2 cores beside one busy process, a step was measured many times slower than with
1 thread (issue 13; BENCHMARKS.md, "Threads under contention"). Fewer threads than cores costs at most
the parallel speed-up; more threads than idle cores costs far more. So by default: torch's thread
count, capped at the cores not busy on average over the last minute (at least 1).
"""

from __future__ import annotations

import os

import torch


class ThreadCountError(ValueError):
    """A thread count that is not a positive integer."""


def idle_cores(cores: int | None = None, load: float | None = None) -> int:
    """Cores this process may use minus the run queue's 1-minute average, rounded, at least 1.

    cores: default the CPU affinity set (what a container or `taskset` allows); load: default
    `os.getloadavg()[0]` (runnable + running tasks, averaged over a minute)."""
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if load is None:
        try:
            load = os.getloadavg()[0]
        except OSError:  # not available on this platform: assume idle
            load = 0.0
    return max(1, min(cores, round(cores - load)))


def pick_threads(requested: int | None, *, cores: int | None = None, load: float | None = None,
                 default: int | None = None) -> int:
    """`requested` if given (>= 1); otherwise `default` (torch's current intra-op thread count) capped at
    `idle_cores(cores, load)`. cores / load / default are for tests; leave them unset."""
    if requested is not None:
        if isinstance(requested, bool) or not isinstance(requested, int) or requested < 1:
            raise ThreadCountError(f"thread count must be an integer >= 1, got {requested!r}")
        return requested
    default = torch.get_num_threads() if default is None else default
    return max(1, min(default, idle_cores(cores, load)))
