"""Trainer tests run tiny models: one intra-op thread is faster than two on a shared 2-core machine
(OpenMP workers spin waiting for a core), and keeps the CPU loss curves bitwise reproducible."""

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
