"""Checkpoint I/O in the hub layout: exact round trips, per-expert keys, sharding, dtype on load,
tied embeddings, and atomic saves (a save that fails midway leaves the previous checkpoint intact)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import dsv2.checkpoint as ckpt
from dsv2 import DeepseekV2, ModelConfig, atomic

from ._reference import randomize_, rel_err


def _model(seed: int = 41, **overrides) -> DeepseekV2:
    model = DeepseekV2(ModelConfig.from_preset("tiny", **overrides))
    randomize_(model, seed=seed)
    return model.eval()


def _keys(folder: Path) -> dict[str, tuple[int, ...]]:
    out = {}
    for f in folder.glob("*.safetensors"):
        with safe_open(f, framework="pt") as st:
            out.update({k: tuple(st.get_slice(k).get_shape()) for k in st.keys()})
    return out


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


IDS = torch.randint(0, 512, (2, 20), generator=torch.Generator().manual_seed(1))


def test_round_trip_is_exact(tmp_path) -> None:
    model = _model()
    model.save_pretrained(tmp_path)
    back = DeepseekV2.from_pretrained(tmp_path)
    a, b = model.state_dict(), back.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not any(p.is_meta for p in back.parameters())
    with torch.no_grad():
        assert torch.equal(model(IDS), back.eval()(IDS))
    assert back.config == model.config  # derived keys (torch_dtype, head_dim, ...) are not carried over
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "float32"


def test_disk_layout_is_per_expert_hub_names(tmp_path) -> None:
    model = _model()
    model.save_pretrained(tmp_path)
    keys = _keys(tmp_path)
    c = model.config
    assert keys["model.embed_tokens.weight"] == (c.vocab_size, c.hidden_size)
    assert keys["lm_head.weight"] == (c.vocab_size, c.hidden_size)
    for e in range(c.n_routed_experts):
        assert keys[f"model.layers.2.mlp.experts.{e}.gate_proj.weight"] == (c.moe_intermediate_size, c.hidden_size)
        assert keys[f"model.layers.2.mlp.experts.{e}.down_proj.weight"] == (c.hidden_size, c.moe_intermediate_size)
    assert keys["model.layers.1.mlp.gate.weight"] == (c.n_routed_experts, c.hidden_size)
    assert keys["model.layers.0.mlp.gate_proj.weight"] == (c.intermediate_size, c.hidden_size)  # dense layer
    assert keys["model.layers.0.self_attn.kv_a_proj_with_mqa.weight"] == (c.kv_lora_rank + c.qk_rope_head_dim,
                                                                           c.hidden_size)
    assert not any(k.endswith("experts.gate_proj") or "rotary" in k for k in keys)
    # stacked expert e on disk is expert e in memory
    with safe_open(tmp_path / "model.safetensors", framework="pt") as st:
        assert torch.equal(st.get_tensor("model.layers.1.mlp.experts.5.up_proj.weight"),
                           model.layers[1].mlp.experts.up_proj[5])
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] == "deepseek_v2" and cfg["torch_dtype"] == "float32"


def test_sharded_round_trip_and_switch_back_to_single_file(tmp_path) -> None:
    model = _model()
    model.save_pretrained(tmp_path, max_shard_size="30KB")
    shards = sorted(tmp_path.glob("*.safetensors"))
    assert len(shards) > 3
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(_keys(tmp_path))
    for p in shards:  # each shard within the limit, unless a single tensor is larger on its own
        with safe_open(p, framework="pt") as st:
            sizes = [st.get_tensor(k).numel() * 4 for k in st.keys()]
        assert sum(sizes) <= 30_000 or len(sizes) == 1, p.name
    back = DeepseekV2.from_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(model(IDS), back.eval()(IDS))
    model.save_pretrained(tmp_path)  # no stale shards or index afterwards
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    DeepseekV2.from_pretrained(tmp_path)


def test_from_pretrained_builds_on_meta_without_random_init(tmp_path, monkeypatch) -> None:
    """Loading must not materialise (and randomly initialise) a second copy of the weights."""
    _model().save_pretrained(tmp_path)

    def no_init(self, seed=None):
        raise AssertionError("from_pretrained ran reset_parameters")

    monkeypatch.setattr(DeepseekV2, "reset_parameters", no_init)
    back = DeepseekV2.from_pretrained(tmp_path)
    assert not any(p.is_meta for p in back.parameters())


@torch.no_grad()
def test_bf16_in_place_weight_update_is_seen(tmp_path) -> None:
    """Any fp32 compute copy kept for bf16 weights must follow in-place updates (e.g. an optimiser step)."""
    _model().save_pretrained(tmp_path)
    bf = DeepseekV2.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    bf(IDS)
    bf(IDS, attn_impl="absorbed")
    for p in bf.parameters():
        p.mul_(1.25)
    fresh = DeepseekV2.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    for p in fresh.parameters():
        p.mul_(1.25)
    for impl in ("expanded", "absorbed"):
        assert torch.equal(bf(IDS, attn_impl=impl), fresh(IDS, attn_impl=impl)), impl


def test_bf16_load_and_save(tmp_path) -> None:
    model = _model()
    model.save_pretrained(tmp_path / "fp32")
    bf = DeepseekV2.from_pretrained(tmp_path / "fp32", dtype=torch.bfloat16).eval()
    assert {p.dtype for p in bf.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        want, got = model(IDS), bf(IDS)
    assert got.dtype == torch.bfloat16
    assert rel_err(got.float(), want) <= 5e-2
    bf.save_pretrained(tmp_path / "bf16")
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    again = DeepseekV2.from_pretrained(tmp_path / "bf16")  # dtype=None keeps the checkpoint's dtype
    assert {p.dtype for p in again.parameters()} == {torch.bfloat16}
    model.save_pretrained(tmp_path / "cast", dtype=torch.bfloat16)
    with safe_open(tmp_path / "cast" / "model.safetensors", framework="pt") as st:
        assert st.get_tensor("lm_head.weight").dtype == torch.bfloat16


def test_tied_embeddings_round_trip(tmp_path) -> None:
    model = _model(tie_word_embeddings=True)
    assert model.lm_head.weight is model.embed_tokens.weight
    model.save_pretrained(tmp_path)
    assert "lm_head.weight" not in _keys(tmp_path)
    back = DeepseekV2.from_pretrained(tmp_path)
    assert back.lm_head.weight is back.embed_tokens.weight
    with torch.no_grad():
        assert torch.equal(model(IDS), back.eval()(IDS))


def test_save_keeps_foreign_files(tmp_path) -> None:
    _model().save_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{}")
    _model(seed=42).save_pretrained(tmp_path)
    assert (tmp_path / "tokenizer.json").read_text() == "{}"


@pytest.mark.parametrize("fail_at", [0, 2])
def test_failed_save_leaves_previous_checkpoint_unchanged(tmp_path, monkeypatch, fail_at: int) -> None:
    """the shard writer raising on its (fail_at+1)-th call (after some shards are written) must not touch
    the checkpoint already at the path, nor leave temporary folders beside it."""
    folder = tmp_path / "ckpt"
    old = _model(seed=43)
    old.save_pretrained(folder, max_shard_size="40KB")
    (folder / "tokenizer.json").write_text("{}")
    before = _snapshot(folder)
    real = ckpt.write_file
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        if calls["n"] == fail_at:
            raise OSError("disk full (simulated)")
        calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(ckpt, "write_file", flaky)
    with pytest.raises(OSError, match="simulated"):
        _model(seed=44).save_pretrained(folder, max_shard_size="40KB")
    monkeypatch.undo()
    assert _snapshot(folder) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temp folders left behind
    back = DeepseekV2.from_pretrained(folder)
    with torch.no_grad():
        assert torch.equal(old(IDS), back.eval()(IDS))


def test_failed_config_write_leaves_previous_checkpoint_unchanged(tmp_path, monkeypatch) -> None:
    folder = tmp_path / "ckpt"
    _model().save_pretrained(folder)
    before = _snapshot(folder)
    model = _model(seed=45)
    monkeypatch.setattr(model.config, "to_dict", lambda: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        model.save_pretrained(folder)
    assert _snapshot(folder) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_failed_final_swap_leaves_previous_checkpoint_in_place(tmp_path, monkeypatch) -> None:
    """The last step swaps folders with two renames (path -> .old, tmp -> path). If the second one
    fails, the previous checkpoint must be back at `path`, not left under a hidden .old name."""
    folder = tmp_path / "ckpt"
    _model().save_pretrained(folder)
    before = _snapshot(folder)
    real = atomic.os.replace
    calls = {"n": 0}

    def flaky(src, dst):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("rename failed (simulated)")
        return real(src, dst)

    monkeypatch.setattr(atomic.os, "replace", flaky)
    with pytest.raises(OSError, match="simulated"):
        _model(seed=46).save_pretrained(folder)
    monkeypatch.undo()
    assert folder.is_dir() and _snapshot(folder) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_parse_size() -> None:
    assert ckpt.parse_size("4GB") == 4 * 10**9
    assert ckpt.parse_size("512MiB") == 512 * 2**20
    assert ckpt.parse_size(1234) == 1234
    with pytest.raises(ValueError, match="lots"):
        ckpt.parse_size("lots")


def test_one_atomic_writer_for_model_and_training_checkpoints(tmp_path) -> None:
    """A model saved inside a training checkpoint is written in place (no second, nested temp folder),
    both land with the umask's permissions, and clean_stale_temps removes either writer's leftovers."""
    from dsv2.train import ckpt as train_ckpt

    seen: list[list[str]] = []

    def write(folder: Path) -> None:
        _model().save_pretrained(folder)
        seen.append(sorted(p.name for p in tmp_path.iterdir()))
        (folder / train_ckpt.STATE_FILE).write_text("state")

    final = train_ckpt.save_checkpoint(tmp_path, 7, write)
    assert len(seen[0]) == 1 and seen[0][0].startswith(atomic.TEMP_PREFIX + "step-000007")
    assert (final / "model.safetensors").exists() and (final / "config.json").exists()
    mask = os.umask(0)
    os.umask(mask)
    for p in (final, final / "model.safetensors", final / train_ckpt.STATE_FILE):
        assert p.stat().st_mode & 0o777 == (0o777 if p.is_dir() else 0o666) & ~mask, p
    _model().save_pretrained(tmp_path / "plain")
    assert (tmp_path / "plain" / "config.json").stat().st_mode & 0o777 == 0o666 & ~mask
    # leftovers of a crash in either writer (temp folder being filled, old folder being swapped out)
    for name in (".tmp-step-000008-1-abc", ".tmp-plain-2-def", ".old-plain-3-123"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(b"half")
    train_ckpt.clean_stale_temps(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "plain", "step-000007"]
