"""RoPE's cached cos/sin table (CPU) against the formula it is built from."""

from __future__ import annotations

import torch

from dsv2 import ModelConfig
from dsv2.model.rope import Rotary, rope_cos_sin


def test_table_rows_equal_the_formula_as_the_table_grows() -> None:
    cfg = ModelConfig.from_preset("tiny", rope_scaling={"type": "yarn", "factor": 4.0,
                                                        "original_max_position_embeddings": 64,
                                                        "beta_fast": 32, "beta_slow": 1, "mscale": 0.707,
                                                        "mscale_all_dim": 0.707})
    rot = Rotary(cfg)
    for positions in (torch.arange(7), torch.tensor([300]), torch.tensor([[5, 6, 7], [1000, 1001, 1002]]),
                      torch.tensor([3, 3, 0])):
        cos, sin = rot(positions)
        want_cos, want_sin = rope_cos_sin(rot.inv_freq, positions, rot.amplitude)
        assert cos.shape == want_cos.shape == (*positions.shape, rot.dim // 2)
        # the same fp32 formula; only the vectorised vs scalar cos/sin of one element may differ (1 ulp)
        torch.testing.assert_close(cos, want_cos, rtol=0, atol=1e-6)
        torch.testing.assert_close(sin, want_sin, rtol=0, atol=1e-6)
    assert rot._table is not None and rot._table[0].shape[0] == 1024  # grown to a power of two, not further
    table = rot._table
    rot(torch.arange(10))
    assert rot._table is table  # smaller positions reuse it


def test_negative_positions_use_the_formula() -> None:
    rot = Rotary(ModelConfig.from_preset("tiny"))
    cos, _ = rot(torch.tensor([-2, 5]))
    torch.testing.assert_close(cos, rope_cos_sin(rot.inv_freq, torch.tensor([-2, 5]), rot.amplitude)[0])
