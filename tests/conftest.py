"""Shared pytest set-up: every test starts from the same torch RNG state."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
