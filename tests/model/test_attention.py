"""MLA: expanded vs absorbed paths, incremental decoding with DenseCache, and both against a float64
re-computation of DeepSeek-V2 §2.1 (per head, interleaved-pair RoPE, YaRN from the formulas).
MHA/GQA/MQA baselines against a naive float64 reference."""

from __future__ import annotations

import pytest
import torch

from dsv2 import DeepseekV2, ModelConfig
from dsv2.model import GQA, MLA, DenseCache, SdpaBackend

from ._reference import (
    ALL_CASES,
    SEQ_LEN,
    case_config,
    randomize_,
    ref_amplitude,
    ref_baseline,
    ref_inv_freq,
    ref_mla,
    ref_scale,
    rel_err,
)

REL = 1e-5  # expanded vs absorbed, fp32


@pytest.fixture(scope="module", params=list(ALL_CASES))
def case_model(request) -> tuple[str, DeepseekV2]:
    model = DeepseekV2(case_config(request.param))
    randomize_(model, seed=11)
    return request.param, model.eval()


def _ids(cfg: ModelConfig, b: int = 2, t: int = SEQ_LEN) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, (b, t), generator=torch.Generator().manual_seed(3))


# ---- expanded vs absorbed ------------------------------------------------------------------------
@torch.no_grad()
def test_expanded_equals_absorbed_full_sequence(case_model) -> None:
    name, model = case_model
    ids = _ids(model.config)
    a, b = model(ids, attn_impl="expanded"), model(ids, attn_impl="absorbed")
    assert rel_err(b, a) <= REL, f"{name}: {rel_err(b, a):.2e}"


@torch.no_grad()
def test_expanded_equals_absorbed_incremental(case_model) -> None:
    """Prefill 60, decode 2 single tokens, then a chunk of 8 (T > 1 against a cache) that ends past
    original_max_position_embeddings, on each path."""
    name, model = case_model
    ids = _ids(model.config, t=60 + 2 + 8)
    full = model(ids, attn_impl="expanded")
    for impl in ("expanded", "absorbed"):
        cache = DenseCache()
        steps = [model(ids[:, :60], cache=cache, attn_impl=impl)]
        for t in range(60, 62):
            steps.append(model(ids[:, t : t + 1], cache=cache, attn_impl=impl))
        steps.append(model(ids[:, 62:], cache=cache, attn_impl=impl))
        assert len(cache) == ids.shape[1]
        got = torch.cat(steps, dim=1)
        assert rel_err(got, full) <= REL, f"{name}/{impl}: {rel_err(got, full):.2e}"


@torch.no_grad()
def test_cache_rows_are_latent_and_rope_key_only(case_model) -> None:
    _, model = case_model
    c = model.config
    cache = DenseCache()
    model(_ids(c, t=10), cache=cache)
    for layer in range(c.num_hidden_layers):
        assert cache.layers[layer].shape == (2, 10, c.kv_lora_rank + c.qk_rope_head_dim)  # [c_kv ; k_R] rows
    assert c.kv_elements_per_token_per_layer() == c.kv_lora_rank + c.qk_rope_head_dim


@torch.no_grad()
def test_attend_paths_agree_under_explicit_mask() -> None:
    """Explicit (B,1,T,S) bool mask (left padding on row 1): both paths equal, and equal to running the
    unpadded sequence alone."""
    cfg = case_config("qlora-glg-yarn-fk1")
    model = DeepseekV2(cfg)
    randomize_(model, seed=12)
    attn: MLA = model.layers[0].self_attn
    t, pad = 12, 5
    x = torch.randn(2, t, cfg.hidden_size)
    pos = torch.arange(t)
    cos, sin = model.rope(pos)
    qn, qp = attn.project_q(x, cos, sin)
    ckv, kpe = attn.project_kv(x, cos, sin)
    mask = torch.ones(t, t, dtype=torch.bool).tril().expand(2, 1, t, t).clone()
    mask[1, :, :, :pad] = False
    mask[1, :, :pad, :] = torch.eye(t, dtype=torch.bool)[:pad]  # pad rows attend to themselves only
    e = attn.attend_expanded(qn, qp, ckv, kpe, mask)
    a = attn.attend_absorbed(qn, qp, ckv, kpe, mask)
    assert rel_err(a, e) <= REL
    alone = attn.attend_expanded(qn[1:, pad:], qp[1:, pad:], ckv[1:, pad:], kpe[1:, pad:], None)
    assert rel_err(e[1:, pad:], alone) <= REL
    assert rel_err(e[:1], attn.attend_expanded(qn[:1], qp[:1], ckv[:1], kpe[:1], None)) <= REL


@torch.no_grad()
def test_per_row_positions() -> None:
    """positions (B,T) with a different offset per row == running each row alone with its positions."""
    cfg = case_config("qlora-glg-yarn-fk1")
    model = DeepseekV2(cfg).eval()
    randomize_(model, seed=17)
    ids = _ids(cfg, t=16)
    pos = torch.stack([torch.arange(16), torch.arange(100, 116)])
    for impl in ("expanded", "absorbed"):
        both = model(ids, positions=pos, attn_impl=impl)
        for r in range(2):
            alone = model(ids[r : r + 1], positions=pos[r], attn_impl=impl)
            assert rel_err(both[r : r + 1], alone) <= REL


def test_absorbed_weights_follow_kv_b_proj_updates() -> None:
    """The absorbed path caches W_UK/W_UV: an in-place weight update must not leave it stale."""
    cfg = case_config("noq-greedy-plain-fk0")
    model = DeepseekV2(cfg).eval()
    randomize_(model, seed=13)
    ids = _ids(cfg, t=8)
    with torch.no_grad():
        model(ids, attn_impl="absorbed")
        for layer in model.layers:
            layer.self_attn.kv_b_proj.weight.mul_(1.5)
        a, b = model(ids, attn_impl="expanded"), model(ids, attn_impl="absorbed")
    assert rel_err(b, a) <= REL


def test_bad_attn_impl_is_named() -> None:
    model = DeepseekV2(case_config("qlora-glg-yarn-fk1"))
    with pytest.raises(ValueError, match="attn_impl.*flash"):
        model(torch.zeros(1, 3, dtype=torch.long), attn_impl="flash")


# ---- MLA against the float64 formulas -------------------------------------------------------------
@pytest.mark.parametrize("case", ["qlora-glg-yarn-fk1", "noq-greedy-plain-fk0", "noq-glg-yarnamp-rsf2.5"])
@pytest.mark.parametrize("impl", ["expanded", "absorbed"])
def test_mla_matches_float64_formulas(case: str, impl: str) -> None:
    cfg = case_config(case)
    model = DeepseekV2(cfg)
    randomize_(model, seed=14, std=0.1)
    attn: MLA = model.layers[1].self_attn
    x = torch.randn(2, SEQ_LEN, cfg.hidden_size)
    pos = torch.arange(SEQ_LEN)
    with torch.no_grad():
        cos, sin = model.rope(pos)
        got = attn(x, cos, sin, SdpaBackend(), impl=impl)
    want = ref_mla(attn, cfg, x, pos)
    assert rel_err(got, want) <= 2e-5, f"{case}/{impl}: {rel_err(got, want):.2e}"
    assert attn.scale == pytest.approx(ref_scale(cfg.qk_head_dim, cfg.rope_scaling), rel=1e-12)


@pytest.mark.parametrize("v_head_dim", [8, 32])  # narrower and wider than qk_nope + qk_rope = 24
def test_value_width_other_than_query_width(v_head_dim: int) -> None:
    cfg = case_config("qlora-glg-yarn-fk1").replace(v_head_dim=v_head_dim)
    model = DeepseekV2(cfg).eval()
    randomize_(model, seed=18, std=0.1)
    attn: MLA = model.layers[0].self_attn
    x = torch.randn(2, 40, cfg.hidden_size)
    pos = torch.arange(40)
    with torch.no_grad():
        cos, sin = model.rope(pos)
        e, a = attn(x, cos, sin, SdpaBackend()), attn(x, cos, sin, SdpaBackend(), impl="absorbed")
        ids = _ids(cfg, t=20)
        assert rel_err(model(ids, attn_impl="absorbed"), model(ids)) <= REL
    want = ref_mla(attn, cfg, x, pos)
    assert rel_err(e, want) <= 2e-5 and rel_err(a, want) <= 2e-5


@pytest.mark.parametrize("case", list(ALL_CASES))
def test_rope_tables_match_formulas(case: str) -> None:
    cfg = case_config(case)
    model = DeepseekV2(cfg, device="meta")  # the rope tables need no weights
    inv = ref_inv_freq(cfg.qk_rope_head_dim, cfg.rope_theta, cfg.rope_scaling)
    amp = ref_amplitude(cfg.rope_scaling)
    pos = torch.arange(0, 250, 7)
    cos, sin = model.rope(pos)
    ang = pos.double()[:, None] * inv
    assert cos.shape == (len(pos), cfg.qk_rope_head_dim // 2) and cos.dtype == torch.float32
    torch.testing.assert_close(cos.double(), ang.cos() * amp, rtol=0, atol=1e-5)
    torch.testing.assert_close(sin.double(), ang.sin() * amp, rtol=0, atol=1e-5)


def test_v2_yarn_frequencies_blend_between_dims_10_and_23() -> None:
    cfg = ModelConfig.from_preset("deepseek-v2-lite")
    model = DeepseekV2(cfg.replace(num_hidden_layers=1), device="meta")
    inv = model.rope.inv_freq.double()
    base = torch.tensor([10000.0 ** (-2 * i / 64) for i in range(32)], dtype=torch.float64)
    torch.testing.assert_close(inv[:11], base[:11].float().double(), rtol=1e-6, atol=0)  # extrapolated
    torch.testing.assert_close(inv[23:], (base[23:] / 40).float().double(), rtol=1e-6, atol=0)  # ÷ s
    between = inv[11:23] / base[11:23]
    assert bool(((between < 1) & (between > 1 / 40)).all())
    torch.testing.assert_close(inv, ref_inv_freq(64, 10000.0, cfg.rope_scaling).float().double(), rtol=1e-6,
                               atol=0)
    assert ref_amplitude(cfg.rope_scaling) == 1.0 and model.rope.amplitude == pytest.approx(1.0)


# ---- MHA / GQA / MQA baselines ------------------------------------------------------------------
BASELINES = {
    "mha": dict(attention_type="mha"),
    "gqa": dict(attention_type="gqa", num_key_value_heads=2),
    "mqa": dict(attention_type="mqa"),
    "gqa-plain-rope": dict(attention_type="gqa", num_key_value_heads=2, rope_scaling=None, baseline_head_dim=24),
}


@pytest.mark.parametrize("kind", list(BASELINES))
def test_baseline_attention_matches_float64(kind: str) -> None:
    cfg = ModelConfig.from_preset("tiny", **BASELINES[kind])
    model = DeepseekV2(cfg)
    randomize_(model, seed=15, std=0.1)
    attn = model.layers[0].self_attn
    assert isinstance(attn, GQA)
    x = torch.randn(2, SEQ_LEN, cfg.hidden_size)
    pos = torch.arange(SEQ_LEN)
    with torch.no_grad():
        cos, sin = model.rope(pos)
        got = attn(x, cos, sin, SdpaBackend())
    want = ref_baseline(attn, cfg, x, pos)
    assert rel_err(got, want) <= 2e-5, f"{kind}: {rel_err(got, want):.2e}"
    hkv = {"mha": 4, "gqa": 2, "mqa": 1}[cfg.attention_type]
    assert cfg.kv_elements_per_token_per_layer() == 2 * hkv * cfg.head_dim


@pytest.mark.parametrize("kind", ["mha", "gqa", "mqa"])
@torch.no_grad()
def test_baseline_incremental_equals_full(kind: str) -> None:
    cfg = ModelConfig.from_preset("tiny", **BASELINES[kind])
    model = DeepseekV2(cfg)
    randomize_(model, seed=16)
    model.eval()
    ids = _ids(cfg, t=40)
    full = model(ids)
    cache = DenseCache()
    got = torch.cat([model(ids[:, :32], cache=cache)] + [model(ids[:, t : t + 1], cache=cache)
                                                         for t in range(32, 40)], dim=1)
    assert rel_err(got, full) <= REL
    assert cache.layers[0].shape == (2, 40, 2 * cfg.kv_heads * cfg.head_dim)  # [k ; v] rows
