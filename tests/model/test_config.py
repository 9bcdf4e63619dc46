"""ModelConfig: presets against the paper's numbers, config.json I/O in both rope forms, validation."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from dsv2 import ConfigError, ModelConfig
from dsv2.model.rope import yarn_correction_range

# The published deepseek-ai/DeepSeek-V2-Lite config.json, every field (remote-code era, "rope_scaling").
HUB_V2_LITE = {
    "architectures": ["DeepseekV2ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "auto_map": {
        "AutoConfig": "configuration_deepseek.DeepseekV2Config",
        "AutoModel": "modeling_deepseek.DeepseekV2Model",
        "AutoModelForCausalLM": "modeling_deepseek.DeepseekV2ForCausalLM",
    },
    "aux_loss_alpha": 0.001,
    "bos_token_id": 100000,
    "eos_token_id": 100001,
    "first_k_dense_replace": 1,
    "hidden_act": "silu",
    "hidden_size": 2048,
    "initializer_range": 0.02,
    "intermediate_size": 10944,
    "kv_lora_rank": 512,
    "max_position_embeddings": 163840,
    "model_type": "deepseek_v2",
    "moe_intermediate_size": 1408,
    "moe_layer_freq": 1,
    "n_group": 1,
    "n_routed_experts": 64,
    "n_shared_experts": 2,
    "norm_topk_prob": False,
    "num_attention_heads": 16,
    "num_experts_per_tok": 6,
    "num_hidden_layers": 27,
    "num_key_value_heads": 16,
    "pretraining_tp": 1,
    "q_lora_rank": None,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "rms_norm_eps": 1e-06,
    "rope_scaling": {
        "beta_fast": 32,
        "beta_slow": 1,
        "factor": 40,
        "mscale": 0.707,
        "mscale_all_dim": 0.707,
        "original_max_position_embeddings": 4096,
        "type": "yarn",
    },
    "rope_theta": 10000,
    "routed_scaling_factor": 1.0,
    "scoring_func": "softmax",
    "seq_aux": True,
    "tie_word_embeddings": False,
    "topk_group": 1,
    "topk_method": "greedy",
    "torch_dtype": "bfloat16",
    "transformers_version": "4.33.1",
    "use_cache": True,
    "v_head_dim": 128,
    "vocab_size": 102400,
}
# The differences of the published DeepSeek-V2 (236B) config.json from V2-Lite's.
HUB_V2_DIFF = {
    "hidden_size": 5120, "intermediate_size": 12288, "moe_intermediate_size": 1536, "n_group": 8,
    "n_routed_experts": 160, "num_attention_heads": 128, "num_hidden_layers": 60, "num_key_value_heads": 128,
    "q_lora_rank": 1536, "routed_scaling_factor": 16.0, "topk_group": 3, "topk_method": "group_limited_greedy",
    "aux_loss_alpha": 0.003, "ep_size": 1,
}
MATH_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "kv_lora_rank", "q_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
               "rope_theta", "rope_scaling", "n_routed_experts", "n_shared_experts", "num_experts_per_tok",
               "moe_intermediate_size", "moe_layer_freq", "first_k_dense_replace", "topk_method", "n_group",
               "topk_group", "norm_topk_prob", "routed_scaling_factor", "rms_norm_eps",
               "max_position_embeddings", "bos_token_id", "eos_token_id", "aux_loss_alpha")


# ---- presets -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, billions", [("deepseek-v2", 236), ("deepseek-v2-lite", 15.7)])
def test_preset_parameter_count(name: str, billions: float) -> None:
    n = ModelConfig.from_preset(name).num_parameters()
    assert abs(n / 1e9 - billions) / billions < 0.005, f"{name}: {n / 1e9:.3f}B, paper {billions}B"


def test_v2_lite_activated_params_about_2_4b() -> None:
    """2.4B activated: embeddings + attention + 2 shared + 6 routed experts per MoE layer (paper §3.1)."""
    c = ModelConfig.from_preset("deepseek-v2-lite")
    dense = c.replace(n_routed_experts=None).num_parameters()  # every layer a dense FFN of 10944
    d, mi = c.hidden_size, c.moe_intermediate_size
    per_moe = (c.n_shared_experts + c.num_experts_per_tok) * 3 * d * mi + c.n_routed_experts * d
    active = dense + (c.num_hidden_layers - 1) * (per_moe - 3 * d * c.intermediate_size)
    # the paper's 2.4B excludes the input embedding table (102400 x 2048 = 0.21B)
    assert 2.3e9 < active - c.vocab_size * d < 2.5e9


@pytest.mark.parametrize("name", ["deepseek-v2", "deepseek-v2-lite"])
def test_v2_softmax_scale_and_yarn_dims(name: str) -> None:
    c = ModelConfig.from_preset(name)
    assert c.softmax_scale() == pytest.approx(0.114721, abs=5e-7)
    # the same number from the formula: 1/sqrt(192) * (0.1 * 0.707 * ln 40 + 1)^2
    assert c.softmax_scale() == pytest.approx(192**-0.5 * (0.0707 * math.log(40) + 1) ** 2, rel=1e-12)
    rs = c.rope_scaling
    lo_hi = yarn_correction_range(rs["beta_fast"], rs["beta_slow"], c.qk_rope_head_dim, c.rope_theta,
                                  rs["original_max_position_embeddings"])
    assert lo_hi == (10, 23)
    assert c.qk_rope_head_dim // 2 == 32


@pytest.mark.parametrize("name", ["deepseek-v2", "deepseek-v2-lite"])
def test_v2_presets_match_the_published_configs(name: str) -> None:
    c = ModelConfig.from_preset(name)
    big = name == "deepseek-v2"
    want = dict(num_hidden_layers=60 if big else 27, hidden_size=5120 if big else 2048,
                num_attention_heads=128 if big else 16, kv_lora_rank=512, q_lora_rank=1536 if big else None,
                qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128, n_shared_experts=2,
                n_routed_experts=160 if big else 64, num_experts_per_tok=6,
                moe_intermediate_size=1536 if big else 1408, intermediate_size=12288 if big else 10944,
                topk_method="group_limited_greedy" if big else "greedy", routed_scaling_factor=16.0 if big else 1.0,
                first_k_dense_replace=1, vocab_size=102400, max_position_embeddings=163840,
                norm_topk_prob=False, rms_norm_eps=1e-6, bos_token_id=100000, eos_token_id=100001)
    assert {k: getattr(c, k) for k in want} == want
    if big:
        assert (c.n_group, c.topk_group) == (8, 3)
        assert (c.aux_loss_alpha, c.device_aux_loss_alpha, c.comm_aux_loss_alpha) == (0.003, 0.05, 0.02)
    else:
        assert (c.aux_loss_alpha, c.device_aux_loss_alpha, c.comm_aux_loss_alpha) == (0.001, 0.0, 0.0)
    assert c.kv_elements_per_token_per_layer() == 576


def test_kv_elements_table_1_and_9() -> None:
    """Table 9: small MoE (V2-Lite dims) 110.6K (MHA) vs 15.6K (MLA) elements per token; V2 34.6K;
    DeepSeek 67B (GQA, 8 KV heads of 128, 95 layers) 194,560."""
    lite, v2 = ModelConfig.from_preset("deepseek-v2-lite"), ModelConfig.from_preset("deepseek-v2")
    assert lite.kv_elements_per_token_per_layer() * 27 == 15_552
    assert lite.replace(attention_type="mha").kv_elements_per_token_per_layer() * 27 == 110_592
    assert v2.kv_elements_per_token_per_layer() * 60 == 34_560
    g67 = ModelConfig.from_preset("deepseek-67b")
    assert g67.kv_elements_per_token_per_layer() * g67.num_hidden_layers == 194_560
    assert lite.replace(attention_type="mqa").kv_elements_per_token_per_layer() == 2 * 128
    assert lite.replace(attention_type="gqa", num_key_value_heads=4).kv_elements_per_token_per_layer() == 1024


def test_small_presets_exist_and_are_small() -> None:
    tiny, small = ModelConfig.from_preset("tiny"), ModelConfig.from_preset("small")
    assert tiny.num_parameters() < 5e6
    assert 20e6 <= small.num_parameters() <= 50e6
    # tiny has every feature on
    assert tiny.q_lora_rank and tiny.topk_method == "group_limited_greedy" and tiny.rope_type == "yarn"


def test_unknown_preset_lists_available() -> None:
    with pytest.raises(ConfigError, match="deepseek-v2-lite"):
        ModelConfig.from_preset("deepseek-v9")


def _fields(c: ModelConfig) -> dict:
    """Every dataclass field but `extra` (which also collects what to_dict derives, e.g. head_dim)."""
    return {f.name: getattr(c, f.name) for f in dataclasses.fields(c) if f.name != "extra"}


# ---- config.json I/O -----------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["tiny", "small", "deepseek-v2", "deepseek-v2-lite", "deepseek-67b"])
def test_json_round_trip(tmp_path, name: str) -> None:
    c = ModelConfig.from_preset(name)
    c.to_json(tmp_path / "config.json")
    back = ModelConfig.from_json(tmp_path)  # a folder works too
    assert _fields(back) == _fields(c)
    assert back.to_dict() == c.to_dict()  # and the file it would write is the same
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "deepseek_v2"


@pytest.mark.parametrize("variant", ["lite", "v2"])
def test_hub_config_json_loads(tmp_path, variant: str) -> None:
    raw = dict(HUB_V2_LITE, **(HUB_V2_DIFF if variant == "v2" else {}))
    (tmp_path / "config.json").write_text(json.dumps(raw))
    c = ModelConfig.from_json(tmp_path / "config.json")
    preset = ModelConfig.from_preset("deepseek-v2" if variant == "v2" else "deepseek-v2-lite")
    assert {k: getattr(c, k) for k in MATH_FIELDS} == {k: getattr(preset, k) for k in MATH_FIELDS}
    assert c.num_parameters() == preset.num_parameters()
    assert c.softmax_scale() == pytest.approx(0.114721, abs=5e-7)
    # fields that do not change the math survive a round trip (auto_map is dropped on purpose: dsv2
    # checkpoints need no remote code)
    out = c.to_dict()
    for k in ("pretraining_tp", "use_cache", "scoring_func", "seq_aux", "aux_loss_alpha", "moe_layer_freq"):
        assert out[k] == raw[k], k
    if variant == "v2":
        assert out["ep_size"] == 1
    assert "auto_map" not in out
    assert ModelConfig.from_dict(out).to_dict() == out


def test_rope_parameters_form_equals_rope_scaling_form() -> None:
    hub = dict(HUB_V2_LITE)
    t5 = dict(HUB_V2_LITE)
    rs = t5.pop("rope_scaling")
    t5.pop("rope_theta")
    t5["rope_parameters"] = {**{k: v for k, v in rs.items() if k != "type"}, "rope_type": "yarn",
                             "rope_theta": 10000.0}
    a, b = ModelConfig.from_dict(hub), ModelConfig.from_dict(t5)
    assert a.rope_scaling == b.rope_scaling
    assert a.rope_theta == b.rope_theta == 10000
    assert a.softmax_scale() == b.softmax_scale()


def test_rope_parameters_default_type_means_no_scaling() -> None:
    d = dict(HUB_V2_LITE, rope_scaling=None)
    d.pop("rope_theta")
    d["rope_parameters"] = {"rope_type": "default", "rope_theta": 50000.0}
    c = ModelConfig.from_dict(d)
    assert c.rope_scaling is None and c.rope_type == "default" and c.rope_theta == 50000.0
    assert c.softmax_scale() == pytest.approx(192**-0.5)


def test_eos_token_id_list_is_accepted() -> None:
    c = ModelConfig.from_dict(dict(HUB_V2_LITE, eos_token_id=[100001, 100002]))
    assert c.eos_token_id == 100001


def test_eos_token_id_list_survives_round_trip(tmp_path) -> None:
    """A config.json with several eos ids must be written back with all of them (generation stops on
    any); dropping the rest silently changes the checkpoint's behaviour in other tools."""
    c = ModelConfig.from_dict(dict(HUB_V2_LITE, eos_token_id=[100001, 100002]))
    c.to_json(tmp_path / "config.json")
    assert json.loads((tmp_path / "config.json").read_text())["eos_token_id"] == [100001, 100002]


# ---- validation: each error names the fields and the values ----------------------------------------
def _tiny(**kw) -> ModelConfig:
    return ModelConfig.from_preset("tiny", **kw)


@pytest.mark.parametrize("overrides, words", [
    (dict(n_routed_experts=6, n_group=4), ["n_routed_experts", "6", "n_group", "4"]),
    (dict(topk_group=5, n_group=4), ["topk_group", "5", "n_group", "4"]),
    (dict(num_experts_per_tok=5, n_group=4, topk_group=2),  # 2 kept groups x 2 experts = 4 < 5
     ["num_experts_per_tok", "5", "topk_group", "4"]),
    (dict(topk_method="noaux_tc"), ["topk_method", "noaux_tc"]),
    (dict(rope_scaling={"type": "dynamic", "factor": 2.0}), ["rope", "dynamic"]),
    (dict(rope_scaling={"rope_type": "longrope", "factor": 2.0}), ["rope", "longrope"]),
    (dict(rope_scaling={"type": "yarn", "factor": 4}), ["original_max_position_embeddings"]),
    (dict(num_experts_per_tok=9), ["num_experts_per_tok", "9", "8"]),
    (dict(scoring_func="sigmoid"), ["scoring_func", "sigmoid"]),
    (dict(qk_rope_head_dim=7), ["qk_rope_head_dim", "7"]),
    (dict(attention_type="gqa", num_key_value_heads=3), ["num_key_value_heads", "3", "num_attention_heads"]),
    (dict(attention_type="flash"), ["attention_type", "flash"]),
    (dict(hidden_size=0), ["hidden_size", "0"]),
])
def test_validation_errors_name_fields_and_values(overrides: dict, words: list[str]) -> None:
    with pytest.raises(ConfigError) as e:
        _tiny(**overrides)
    for w in words:
        assert w in str(e.value), f"{w!r} not in {str(e.value)!r}"


def test_other_model_type_rejected(tmp_path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(dict(HUB_V2_LITE, model_type="deepseek_v3")))
    with pytest.raises(ConfigError, match="model_type.*deepseek_v3"):
        ModelConfig.from_json(tmp_path / "config.json")


def test_invalid_json_and_missing_file(tmp_path) -> None:
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="config.json"):
        ModelConfig.from_json(tmp_path / "config.json")
    with pytest.raises(FileNotFoundError, match="config.json"):
        ModelConfig.from_json(tmp_path / "nowhere")


def test_replace_revalidates() -> None:
    with pytest.raises(ConfigError, match="topk_group"):
        _tiny().replace(topk_group=9)
