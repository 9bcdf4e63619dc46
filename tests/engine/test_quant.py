"""Quantised cache storage: round trips against a float64 reference of the same scheme, exact sizes."""

from __future__ import annotations

import pytest
import torch

from dsv2.config import ModelConfig
from dsv2.engine.quant import KVFormatError, dequantise, make_format, quantise

QMAX = {"int8": 127, "int4": 7}


def _rows(n: int = 37, w: int = 576, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, w, generator=g, dtype=torch.float64)
    x[3, :64] *= 50  # an outlier group
    x[5, 64:128] = 0  # an all-zero group
    return x


def _ref_int(x: torch.Tensor, kind: str, group: int) -> torch.Tensor:
    """float64 reference: scale = amax/qmax rounded to fp16, codes = round(x/scale) clamped."""
    xg = x.view(x.shape[0], -1, group)
    scale = (xg.abs().amax(-1, keepdim=True) / QMAX[kind]).to(torch.float16).double()
    q = torch.round(xg / scale.clamp_min(1e-300)).clamp(-QMAX[kind], QMAX[kind])
    return (q * scale).view_as(x)


@pytest.mark.parametrize("kind,group", [("int8", 64), ("int8", 32), ("int4", 32), ("int4", 16)])
def test_int_round_trip_matches_float64_reference(kind: str, group: int) -> None:
    x = _rows()
    codes, scale = quantise(x.float(), kind, group)
    y = dequantise(codes, scale, kind, group, torch.float64)
    ref = _ref_int(x.float().double(), kind, group)
    # equal up to the odd tie broken differently by an fp32 vs fp64 division
    close = (y - ref).abs() <= 1e-6 * ref.abs().clamp_min(1)
    assert close.float().mean() > 0.999
    # and within half a quantisation step of the input everywhere
    step = x.view(x.shape[0], -1, group).abs().amax(-1, keepdim=True) / QMAX[kind]
    assert ((y - x).view_as(step.expand(-1, -1, group)).abs() <= step * 0.51 + 1e-6).all()
    if kind == "int4":
        assert codes.dtype == torch.uint8 and codes.shape == (x.shape[0], x.shape[1] // 2)


def test_fp8_round_trip_relative_error() -> None:
    x = _rows()[:, :512].contiguous()  # the c_kv part: 4 groups of 128
    codes, scale = quantise(x.float(), "fp8", 128)
    assert codes.dtype == torch.float8_e4m3fn and scale.dtype == torch.float32
    y = dequantise(codes, scale, "fp8", 128, torch.float64)
    xs = x.view(x.shape[0], -1, 128)
    s = (xs.abs().amax(-1, keepdim=True) / 448).float().double()
    ref = (xs / s.clamp_min(1e-300)).float().to(torch.float8_e4m3fn).double() * s  # same rounding, f64 scale
    assert torch.allclose(y, ref.view_as(x), rtol=1e-6, atol=1e-12)
    # e4m3 keeps 3 mantissa bits: relative error <= 2^-4 for values in the normal range
    normal = xs.abs() / s >= 2**-6
    err = ((y.view_as(xs) - xs).abs() / xs.abs().clamp_min(1e-30))[normal]
    assert err.max() <= 2**-4 + 1e-9


def test_bits_per_element_on_v2_shapes() -> None:
    cfg = ModelConfig.from_preset("deepseek-v2-lite")
    w, c = cfg.kv_elements_per_token_per_layer(), cfg.kv_lora_rank
    fmt = {name: make_format(name, w, torch.bfloat16, c) for name in ("bf16", "fp8", "int8", "int4", "mixed")}
    assert fmt["bf16"].bytes_per_row() == 576 * 2
    assert fmt["fp8"].bytes_per_row() == 576 + 4 * (4 + 1)  # codes + fp32 scale per 128 (c_kv 4, k_R 1)
    assert fmt["int8"].bytes_per_row() == 576 + 2 * (8 + 1)  # fp16 scale per 64
    assert fmt["int4"].bytes_per_row() == 288 + 2 * (16 + 2)  # fp16 scale per 32
    assert fmt["mixed"].bytes_per_row() == 256 + 2 * 16 + 64 * 2
    assert fmt["mixed"].bits_per_element() <= 6.0
    rb = make_format("fp8", w, torch.bfloat16, c, rope_bf16=True)
    assert rb.bytes_per_row() == 512 + 4 * 4 + 64 * 2  # FlashMLA's 656-byte row


@pytest.mark.parametrize("name", ["fp8", "int8", "int4", "mixed"])
def test_format_encode_decode_rows(name: str) -> None:
    x = _rows(w=40).float()
    fmt = make_format(name, 40, torch.float32, split=32)
    y = fmt.decode(fmt.encode(x))
    assert y.shape == x.shape and y.dtype == torch.float32
    rel = (y - x).norm() / x.norm()
    assert rel < {"fp8": 0.05, "int8": 0.01, "int4": 0.15, "mixed": 0.15}[name]
    if name == "mixed":  # k_R kept in bf16
        assert torch.equal(y[:, 32:], x[:, 32:].bfloat16().float())


def test_format_errors_name_the_argument() -> None:
    with pytest.raises(KVFormatError, match="kv_cache_dtype"):
        make_format("int3", 40, torch.float32, 32)
    with pytest.raises(KVFormatError, match="MLA"):
        make_format("mixed", 40, torch.float32, None)
    with pytest.raises(KVFormatError, match="group"):
        make_format("int4", 40, torch.float32, 32, group=6)


def test_quantised_cache_quality_ordering() -> None:
    """Teacher-forced KL vs the bf16 cache grows as bits shrink; 8-bit modes keep greedy tokens."""
    from dsv2.engine.quality import kv_quality
    from dsv2.model import DeepseekV2

    cfg = ModelConfig.from_preset("tiny", kv_lora_rank=64, max_position_embeddings=256)
    model = DeepseekV2(cfg).eval()
    model.reset_parameters(seed=0)
    with torch.no_grad():  # peaky next-token distributions, attention that matters
        model.lm_head.weight.mul_(30)
        for layer in model.layers:
            layer.self_attn.q_b_proj.weight.mul_(8)
    res = {q.mode: q for q in kv_quality(model, list(range(1, 40)), steps=24,
                                        modes=[("fp32", False), ("int8", False), ("fp8", False),
                                               ("int4", False), ("mixed", False)], reference="fp32")}
    assert res["fp32"].mean_kl == 0 and res["fp32"].greedy_agreement == 1
    assert res["int8"].mean_kl < res["int4"].mean_kl
    assert res["fp8"].mean_kl < res["int4"].mean_kl
    assert res["int8"].greedy_agreement >= 0.95
    assert res["mixed"].bits_per_element < res["int8"].bits_per_element


def test_quality_fed_a_continuation() -> None:
    """Feeding the reference's own greedy tokens as the continuation reproduces the greedy-fed result;
    a continuation shorter than the steps is rejected."""
    from dsv2.engine import Engine, SamplingParams
    from dsv2.engine.quality import kv_quality
    from dsv2.model import DeepseekV2

    model = DeepseekV2(ModelConfig.from_preset("tiny")).eval()
    model.reset_parameters(seed=2)
    prompt, steps = list(range(3, 20)), 10
    greedy = Engine(model, kv_cache_dtype="fp32", max_tokens=64).generate([prompt], SamplingParams(
        max_new_tokens=steps))[0]
    kw = dict(steps=steps, modes=[("int4", False)], reference="fp32")
    a = kv_quality(model, prompt, **kw)[0]
    b = kv_quality(model, prompt, continuation=greedy, **kw)[0]
    assert a == b and a.mean_kl > 0
    with pytest.raises(ValueError, match="continuation"):
        kv_quality(model, prompt, continuation=greedy[:3], **kw)
