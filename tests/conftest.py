"""Shared pytest set-up: the same torch RNG state for every test, one intra-op thread per module.

The tests run tiny models: one thread is faster than two, far faster when the machine's cores are
shared with other jobs (OpenMP workers spin waiting for a core), and keeps CPU results bitwise
reproducible. Module scope, so module fixtures that build references run single-threaded too.
"""

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
