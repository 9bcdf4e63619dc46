"""Shared helpers for the benchmark scripts: timing, machine description, transformers twin models."""

from __future__ import annotations

import os
import platform
import resource
import statistics
import tempfile
import time
from collections.abc import Callable

import torch

from dsv2.units import DTYPES as DTYPES  # the project's one dtype-name map, re-exported to the scripts


def machine() -> str:
    cpu = platform.processor() or "cpu"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"capability {torch.backends.cpu.get_cpu_capability()}")


def peak_rss_gib() -> float:
    """Peak resident memory of this process so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def synced(fn: Callable[[], object], device: torch.device | str) -> Callable[[], object]:
    """fn followed by a device synchronisation, so that timing it measures the work, not the launch."""
    dev = torch.device(device)
    if dev.type == "cpu":
        return fn
    sync = getattr(torch, dev.type).synchronize

    def run() -> object:
        out = fn()
        sync()
        return out
    return run


def peak_memory_gib(device: torch.device | str) -> float:
    """Peak process RSS (CPU) or peak allocated accelerator memory (CUDA and the like), GiB."""
    dev = torch.device(device)
    if dev.type == "cpu":
        return peak_rss_gib()
    return getattr(torch, dev.type).max_memory_allocated() / 2**30


def timeit(fn: Callable[[], object], repeat: int = 3, warmup: int = 1) -> float:
    """Median seconds per call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def timed_rounds(fns: dict[str, tuple[Callable[[], object], int]], batch: int = 1,
                 warm_each_round: bool = False) -> dict[str, float]:
    """Best seconds a call of each function, calls interleaved round by round so that load from other jobs
    on the machine hits every implementation alike. fns: name -> (function, timed rounds). batch: calls timed
    together per round (the time is their mean); warm_each_round: one untimed call before each round's (for
    kernels whose data fits a cache the other functions' calls evict)."""
    for fn, _ in fns.values():
        fn()  # warm-up
    best = {name: float("inf") for name in fns}
    for r in range(max(n for _, n in fns.values())):
        for name, (fn, n) in fns.items():
            if r < n:
                if warm_each_round:
                    fn()
                t0 = time.perf_counter()
                for _ in range(batch):
                    fn()
                best[name] = min(best[name], (time.perf_counter() - t0) / batch)
    return best


def transformers_twin(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """The same weights loaded into transformers' DeepseekV2ForCausalLM (through a hub-layout checkpoint)."""
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        hf = AutoModelForCausalLM.from_pretrained(d, dtype=dtype, attn_implementation="sdpa")
    return hf.eval()
