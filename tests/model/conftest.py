"""The model tests run tiny tensors: one intra-op thread is faster than two, and far faster when the
machine's cores are shared with other jobs (OpenMP workers spin waiting for a core)."""

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
