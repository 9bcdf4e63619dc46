"""Quantised models: quality against the bf16 original, the streaming load against the in-memory pass,
save -> load round trips, what one decode token reads, and clear errors for conflicting requests."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from dsv2 import DeepseekV2, ModelConfig
from dsv2.checkpoint import CheckpointError
from dsv2.model.moe import Experts
from dsv2.quant import QuantError, QuantExperts, QuantLinear, quantize_model, set_int8_activations
from model._reference import randomize_  # tests/ is on sys.path (rootdir packages)

IDS = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
# mean KL(p_bf16 || p_quant) per token on the randomised tiny model (measured: int8 4e-5, int4 g128 4.6e-3)
KL_BOUND = {"int8": 1e-3, "int4": 2e-2}


def _bf16_model(**overrides) -> DeepseekV2:
    m = DeepseekV2(ModelConfig.from_preset("tiny", **overrides))
    with torch.no_grad():
        randomize_(m, seed=3)
    return m.to(torch.bfloat16).eval()


@pytest.fixture(scope="module")
def bf16_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("q") / "bf16"
    _bf16_model().save_pretrained(folder)
    return folder


def _kl(ref: torch.Tensor, got: torch.Tensor) -> float:
    p, q = ref.float().log_softmax(-1), got.float().log_softmax(-1)
    return float((p.exp() * (p - q)).sum(-1).mean())


@pytest.mark.parametrize("weights, group", [("int8", 128), ("int4", 128), ("int4", 32)])
@torch.no_grad()
def test_quantised_logits_stay_close_to_the_bf16_original(weights: str, group: int) -> None:
    model = _bf16_model()
    ref = model(IDS)
    q = quantize_model(copy.deepcopy(model), weights, group)
    kinds = {type(m) for m in q.modules()}
    assert QuantLinear in kinds and QuantExperts in kinds and Experts not in kinds
    assert isinstance(q.lm_head, QuantLinear)
    assert not isinstance(q.layers[1].mlp.gate, QuantLinear)  # the router stays float
    got = q(IDS)
    assert got.dtype == torch.bfloat16
    assert _kl(ref, got) <= KL_BOUND[weights]
    # the same bound on the absorbed (decode) path
    assert _kl(ref, q(IDS, attn_impl="absorbed")) <= KL_BOUND[weights]


@pytest.mark.parametrize("weights, group", [("int8", 128), ("int4", 128), ("int4", 32)])
@torch.no_grad()
def test_int8_activations_stay_close_to_the_bf16_original(weights: str, group: int) -> None:
    """Rounding the activations to int8 (per 32 values) on top of the weights: the same KL bound as the
    weights alone, and at most twice their KL (8-bit activations lose about what 8-bit weights lose;
    measured on this model: int8 +15% natively, +57% where bf16 is emulated (AVX2), int4 +2%). The switch
    changes the result (it is not the exact product) and turns back off."""
    model = _bf16_model()
    ref = model(IDS)
    q = quantize_model(copy.deepcopy(model), weights, group)
    exact = q(IDS)
    assert set_int8_activations(q) == sum(isinstance(m, QuantLinear | QuantExperts) for m in q.modules())
    rounded = q(IDS)
    assert not torch.equal(rounded, exact)
    bound = min(KL_BOUND[weights], 2.0 * _kl(ref, exact))
    assert _kl(ref, rounded) <= bound
    assert _kl(ref, q(IDS, attn_impl="absorbed")) <= bound
    set_int8_activations(q, False)
    assert torch.equal(q(IDS), exact)


@pytest.mark.parametrize("weights, group", [("int8", None), ("int4", 64)])
@torch.no_grad()
def test_streaming_load_equals_quantising_the_loaded_model(bf16_folder, weights: str, group: int | None) -> None:
    streamed = DeepseekV2.from_pretrained(bf16_folder, weights=weights, group_size=group)
    in_memory = quantize_model(DeepseekV2.from_pretrained(bf16_folder), weights, group or 128)
    a, b = streamed.state_dict(), in_memory.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert torch.equal(streamed(IDS), in_memory(IDS))


@pytest.mark.parametrize("weights, shard", [("int8", "4GB"), ("int4", "20KB")])
@torch.no_grad()
def test_quantised_save_and_load_round_trip_is_exact(bf16_folder, tmp_path, weights: str, shard: str) -> None:
    q = DeepseekV2.from_pretrained(bf16_folder, weights=weights)
    q.save_pretrained(tmp_path / "q", max_shard_size=shard)
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())
    assert cfg["quantization_config"]["weights"] == weights and cfg["quantization_config"]["quant_method"] == "dsv2"
    back = DeepseekV2.from_pretrained(tmp_path / "q")
    assert back.quant_config == q.quant_config
    sa, sb = q.state_dict(), back.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert torch.equal(q(IDS), back(IDS))
    assert DeepseekV2.from_pretrained(tmp_path / "q", weights=weights) is not None  # the same request is fine


@torch.no_grad()
def test_tied_embeddings_quantise_the_head_from_the_embedding(tmp_path) -> None:
    model = _bf16_model(tie_word_embeddings=True)
    model.save_pretrained(tmp_path / "f")
    q = DeepseekV2.from_pretrained(tmp_path / "f", weights="int8")
    ref = QuantLinear.from_weight(model.embed_tokens.weight, None, "int8", dtype=torch.bfloat16)
    assert torch.equal(q.lm_head.qweight, ref.qweight)
    assert _kl(model(IDS), q(IDS)) <= KL_BOUND["int8"]


@torch.no_grad()
def test_one_decode_token_reads_the_active_parameters_only() -> None:
    """Bytes read by one token = every quantised Linear once + K of the E experts per MoE layer
    (counted from the config, not from the modules' own bookkeeping)."""
    model = quantize_model(_bf16_model(), "int8")
    cfg = model.config
    for m in model.modules():
        if hasattr(m, "bytes_read"):
            m.bytes_read = 0
    model(IDS[:1, :1])
    got = sum(m.bytes_read for m in model.modules() if hasattr(m, "bytes_read"))
    d, i = cfg.hidden_size, cfg.moe_intermediate_size
    expert = 3 * i * d + (2 * i + d) * 2  # int8 codes + bf16 scales of gate/up (2I rows) and down (D rows)
    linear = sum(m.in_features * m.out_features + m.out_features * 2 for m in model.modules()
                 if isinstance(m, QuantLinear))
    n_moe = sum(cfg.is_moe_layer(j) for j in range(cfg.num_hidden_layers))
    assert got == linear + n_moe * cfg.num_experts_per_tok * expert
    assert got < linear + n_moe * cfg.n_routed_experts * expert  # (not all experts)


def test_conflicting_and_bad_requests_are_clear_errors(bf16_folder, tmp_path) -> None:
    with pytest.raises(QuantError, match="weights must be one of"):
        DeepseekV2.from_pretrained(bf16_folder, weights="int3")
    with pytest.raises(QuantError, match=r"group_size must be one of .*48"):
        DeepseekV2.from_pretrained(bf16_folder, weights="int4", group_size=48)
    with pytest.raises(QuantError, match="group_size=64 applies to weights='int4' only"):
        DeepseekV2.from_pretrained(bf16_folder, weights="int8", group_size=64)
    DeepseekV2.from_pretrained(bf16_folder, weights="int4", group_size=64).save_pretrained(tmp_path / "q4")
    with pytest.raises(QuantError, match=r"already quantised \(weights='int4', group_size=64\).*weights='int8'"):
        DeepseekV2.from_pretrained(tmp_path / "q4", weights="int8")
    with pytest.raises(QuantError, match=r"already quantised.*group_size=128"):
        DeepseekV2.from_pretrained(tmp_path / "q4", weights="int4", group_size=128)
    with pytest.raises(QuantError, match="already quantised"):
        DeepseekV2.from_pretrained(tmp_path / "q4", weights="bf16")
    # a reader of another format version, or another tool's quantization_config, says so
    cfg = json.loads((tmp_path / "q4" / "config.json").read_text())
    cfg["quantization_config"]["format_version"] = 2
    (tmp_path / "q4" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(QuantError, match=r"quantization_config: format_version=2, this dsv2 reads 1"):
        DeepseekV2.from_pretrained(tmp_path / "q4")
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (tmp_path / "q4" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(QuantError, match="quant_method='gptq' is not one dsv2 reads"):
        DeepseekV2.from_pretrained(tmp_path / "q4")


def test_quantised_folder_missing_a_tensor_is_named(bf16_folder, tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    DeepseekV2.from_pretrained(bf16_folder, weights="int8").save_pretrained(tmp_path / "q")
    f = tmp_path / "q" / "model.safetensors"
    tensors = load_file(f)
    del tensors["model.layers.1.mlp.experts.down_scales"]
    save_file(tensors, f)
    with pytest.raises(CheckpointError, match=r"missing.*layers\.1\.mlp\.experts\.down_scales"):
        DeepseekV2.from_pretrained(tmp_path / "q")


def test_transformers_refuses_a_quantised_folder_with_a_message(bf16_folder, tmp_path) -> None:
    transformers = pytest.importorskip("transformers")
    DeepseekV2.from_pretrained(bf16_folder, weights="int8").save_pretrained(tmp_path / "q")
    with pytest.raises(Exception, match=r"(?i)quantization|quant_method|dsv2"):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "q")


@torch.no_grad()
def test_bf16_request_loads_float_weights_in_bf16(tmp_path) -> None:
    fp32 = DeepseekV2(ModelConfig.from_preset("tiny"))
    with torch.no_grad():
        randomize_(fp32, seed=5)
    fp32.save_pretrained(tmp_path)
    model = DeepseekV2.from_pretrained(tmp_path, weights="bf16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert isinstance(model.layers[1].mlp.experts, Experts)
    assert torch.equal(model.layers[1].mlp.experts.up_proj[3], fp32.layers[1].mlp.experts.up_proj[3].bfloat16())
