"""The 2-process job (tests/parallel/worker.py "all") runs once per session; tests read its results."""

from __future__ import annotations

import time

import pytest
import torch

from . import launch


@pytest.fixture(scope="session")
def job(tmp_path_factory):
    """(out folder, exit codes, seconds, [rank0 results, rank1 results])."""
    out = tmp_path_factory.mktemp("parallel")
    t0 = time.monotonic()
    codes = launch.run("all", out, timeout_s=20.0)
    elapsed = time.monotonic() - t0
    assert all((out / f"rank{r}.pt").exists() for r in range(2)), launch.logs(out)
    return out, codes, elapsed, [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]
