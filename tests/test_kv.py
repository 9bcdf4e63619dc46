"""`dsv2 kv`: Table 1 formulas, Table 9 figures and the -93.3% / -82.2% headline, recomputed by hand."""

from __future__ import annotations

import pytest

from dsv2.cli import main
from dsv2.config import ModelConfig
from dsv2.kv import cache_bits, kv_rows, model_kv_row, parse_bits, report


def test_table1_formulas_for_v2() -> None:
    cfg = ModelConfig.from_preset("deepseek-v2")
    rows = {r.name.split()[0]: r for r in kv_rows(cfg, 16, gqa_groups=8)}
    n_h, d_h, layers = 128, 128, 60
    assert rows["MHA"].elements == 2 * n_h * d_h * layers
    assert rows["GQA"].elements == 2 * 8 * d_h * layers
    assert rows["MQA"].elements == 2 * d_h * layers
    assert rows["MLA"].elements == (512 + 64) * layers == 34_560


def test_table9_small_moe() -> None:
    rows = {r.name.split()[0]: r for r in kv_rows(ModelConfig.from_preset("deepseek-v2-lite"), 16)}
    assert rows["MHA"].elements == 110_592  # "110.6K"
    assert rows["MLA"].elements == 15_552  # "15.6K" = 576 x 27


def test_headline_reduction_vs_deepseek_67b() -> None:
    v2, ref = ModelConfig.from_preset("deepseek-v2"), ModelConfig.from_preset("deepseek-67b")
    ref_row = model_kv_row(ref, 16)
    assert ref_row.elements == 95 * 2 * 8 * 128 == 194_560
    assert ref_row.bytes == 389_120
    six_bit = model_kv_row(v2, 6).bytes
    assert six_bit == 25_920
    assert round(100 * (1 - six_bit / ref_row.bytes), 1) == 93.3
    assert round(100 * (1 - model_kv_row(v2, 16).bytes / ref_row.bytes), 1) == 82.2
    assert round(100 * (1 - model_kv_row(v2, 8).bytes / ref_row.bytes), 1) == 91.1
    text = report(v2, "deepseek-v2", compare=ref, compare_name="deepseek-67b")
    assert "-93.3%" in text and "-82.2%" in text


def test_engine_formats_count_their_scales() -> None:
    v2 = ModelConfig.from_preset("deepseek-v2")
    # mixed = int4 c_kv (512 x 4 bits + 16 fp16 scales) + bf16 k_R (64 x 16 bits) per row of 576
    assert cache_bits(v2, "mixed") == pytest.approx((512 * 4 + 16 * 16 + 64 * 16) / 576)
    assert cache_bits(v2, "mixed") <= 6
    assert cache_bits(v2, "bf16") == 16


def test_bad_dtype_and_cli(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ValueError, match="unknown KV dtype 'foo'"):
        parse_bits("foo")
    assert main(["kv", "--preset", "deepseek-v2-lite", "--context", "32K"]) == 0
    assert "110,592" in capsys.readouterr().out
    assert main(["kv", "--preset", "nope"]) == 2
    assert "neither a preset" in capsys.readouterr().err
