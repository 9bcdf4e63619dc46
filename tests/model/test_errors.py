"""Bad input gets a clear error that names the offending field, key, shape or value."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dsv2 import ConfigError, DeepseekV2, ModelConfig
from dsv2.checkpoint import CheckpointError


@pytest.fixture(scope="module")
def model() -> DeepseekV2:
    return DeepseekV2(ModelConfig.from_preset("tiny")).eval()  # vocab 512, max positions 256


@pytest.fixture()
def saved(tmp_path, model) -> Path:
    model.save_pretrained(tmp_path / "ckpt")
    return tmp_path / "ckpt"


# ---- forward inputs -------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [512, 100000])
def test_token_id_out_of_vocab(model, bad: int) -> None:
    ids = torch.tensor([[1, 2, bad, 3]])
    with pytest.raises(ValueError, match=rf"token id {bad}.*\[0, 512\)"):
        model(ids)


def test_negative_token_id(model) -> None:
    with pytest.raises(ValueError, match=r"token id -1"):
        model(torch.tensor([[1, -1]]))


@pytest.mark.parametrize("shape", [(1, 0), (0, 5)])
def test_empty_input(model, shape) -> None:
    with pytest.raises(ValueError, match="empty"):
        model(torch.zeros(shape, dtype=torch.long))


def test_sequence_longer_than_max_position_embeddings(model) -> None:
    model(torch.zeros(1, 256, dtype=torch.long))  # exactly the limit is fine
    with pytest.raises(ValueError, match="max_position_embeddings=256"):
        model(torch.zeros(1, 257, dtype=torch.long))
    with pytest.raises(ValueError, match="position 300"):
        model(torch.zeros(1, 4, dtype=torch.long), positions=torch.arange(297, 301))


def test_decoding_past_max_position_embeddings_with_a_cache(model) -> None:
    """With a cache and no explicit positions the new tokens sit at len(cache).., so the check must use
    those positions, not 0..T-1 (a 256-token cache + 1 new token is position 256, one past the limit)."""
    from dsv2.model import DenseCache

    cache = DenseCache()
    with torch.no_grad():
        model(torch.zeros(1, 256, dtype=torch.long), cache=cache)
        with pytest.raises(ValueError, match="max_position_embeddings=256"):
            model(torch.zeros(1, 1, dtype=torch.long), cache=cache)


def test_wrong_rank_and_dtype(model) -> None:
    with pytest.raises(ValueError, match=r"\(batch, seq_len\).*\(5,\)"):
        model(torch.zeros(5, dtype=torch.long))
    with pytest.raises(TypeError, match="float32"):
        model(torch.zeros(1, 5))


# ---- checkpoints ------------------------------------------------------------------------------------
def _edit(folder: Path, fn) -> None:
    tensors = load_file(folder / "model.safetensors")
    fn(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def test_missing_tensor_is_named(saved) -> None:
    _edit(saved, lambda t: (t.pop("model.layers.1.self_attn.kv_b_proj.weight"),
                            t.pop("model.layers.2.mlp.experts.3.up_proj.weight")))
    with pytest.raises(CheckpointError, match="missing") as e:
        DeepseekV2.from_pretrained(saved)
    assert "model.layers.1.self_attn.kv_b_proj.weight" in str(e.value)
    assert "model.layers.2.mlp.experts.3.up_proj.weight" in str(e.value)


def test_unexpected_tensor_is_named(saved) -> None:
    _edit(saved, lambda t: t.update({"model.layers.0.self_attn.q_proj.weight": torch.zeros(96, 64)}))
    with pytest.raises(CheckpointError, match=r"unexpected.*model\.layers\.0\.self_attn\.q_proj\.weight"):
        DeepseekV2.from_pretrained(saved)


def test_extra_expert_is_unexpected(saved) -> None:
    _edit(saved, lambda t: t.update({"model.layers.1.mlp.experts.8.gate_proj.weight": torch.zeros(32, 64)}))
    with pytest.raises(CheckpointError, match=r"unexpected.*experts\.8\.gate_proj"):
        DeepseekV2.from_pretrained(saved)


def test_misshaped_tensor_names_key_and_both_shapes(saved) -> None:
    _edit(saved, lambda t: t.update({"model.layers.0.self_attn.kv_b_proj.weight": torch.zeros(100, 32)}))
    with pytest.raises(CheckpointError) as e:
        DeepseekV2.from_pretrained(saved)
    msg = str(e.value)
    assert "model.layers.0.self_attn.kv_b_proj.weight" in msg
    assert "(100, 32)" in msg and "(128, 32)" in msg  # checkpoint shape and the one the config wants


def test_config_that_does_not_match_weights(saved) -> None:
    cfg = json.loads((saved / "config.json").read_text())
    cfg["kv_lora_rank"] = 48
    (saved / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"kv_a_proj_with_mqa.*\(40, 64\).*\(56, 64\)"):
        DeepseekV2.from_pretrained(saved)


def test_config_of_another_model_type(saved) -> None:
    cfg = json.loads((saved / "config.json").read_text())
    cfg["model_type"] = "llama"
    (saved / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="model_type='llama'"):
        DeepseekV2.from_pretrained(saved)


def test_truncated_safetensors(saved) -> None:
    f = saved / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*(truncated|corrupt)"):
        DeepseekV2.from_pretrained(saved)


def test_truncated_header(saved) -> None:
    f = saved / "model.safetensors"
    f.write_bytes(f.read_bytes()[:5])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        DeepseekV2.from_pretrained(saved)


def test_sharded_index_pointing_at_missing_shard(tmp_path, model) -> None:
    model.save_pretrained(tmp_path, max_shard_size="60KB")
    shard = sorted(tmp_path.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=shard.name):
        DeepseekV2.from_pretrained(tmp_path)


def test_folder_without_weights_or_config(tmp_path, model) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere"):
        DeepseekV2.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="config.json"):
        DeepseekV2.from_pretrained(tmp_path)
    model.config.to_json(tmp_path / "config.json")
    with pytest.raises(CheckpointError, match="no safetensors"):
        DeepseekV2.from_pretrained(tmp_path)


def test_a_cache_without_a_length_needs_positions(model) -> None:
    """A backend that cannot say how many tokens precede the new ones (e.g. the engine's paged backend)
    with no positions must raise, not silently start RoPE at 0."""

    class Lengthless:
        def mla(self, *args):  # never reached
            raise AssertionError("attention ran")

        gqa = mla

    with pytest.raises(ValueError, match="positions are required with a Lengthless"):
        model(torch.zeros(1, 3, dtype=torch.long), cache=Lengthless())
