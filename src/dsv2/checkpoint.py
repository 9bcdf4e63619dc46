"""Checkpoints in the hub (transformers) layout: config.json + safetensors, single file or sharded.

The hub key names live here and nowhere else. In memory dsv2 stacks the routed experts
(`mlp.experts.gate_proj` of shape (E, I, D)); on disk every expert has its own keys
(`model.layers.L.mlp.experts.N.gate_proj.weight`), which transformers, vLLM and SGLang read.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from dsv2.config import ModelConfig
from dsv2.model import DeepseekV2
from dsv2.units import parse_bytes

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# keys some writers add that carry no weights (rotary tables are derived from the config)
IGNORED_KEYS = re.compile(r".*rotary_emb\.inv_freq$")
_EXPERT_KEY = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_STACKED = re.compile(r"^layers\.(\d+)\.mlp\.experts\.(gate_proj|up_proj|down_proj)$")


class CheckpointError(ValueError):
    """A checkpoint folder that does not match its config (missing/unexpected/mis-shaped/corrupt)."""


def parse_size(size: int | str) -> int:
    """A shard size limit: '4GB', '500MiB', 1024 -> bytes."""
    return parse_bytes(size, "max_shard_size")


# ---- names ------------------------------------------------------------------------------------
def to_hub_state_dict(model: DeepseekV2, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(hub key, tensor) pairs; stacked experts are split into per-expert keys."""
    for name, t in model.state_dict().items():
        if model.config.tie_word_embeddings and name == "lm_head.weight":
            continue
        t = t if dtype is None else t.to(dtype)
        m = _STACKED.match(name)
        if m:
            layer, proj = m.groups()
            for e in range(t.shape[0]):
                yield f"model.layers.{layer}.mlp.experts.{e}.{proj}.weight", t[e]
        else:
            yield (name if name.startswith("lm_head.") else f"model.{name}"), t


def _expected_shapes(model: DeepseekV2) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for name, p in model.state_dict().items():
        if model.config.tie_word_embeddings and name == "lm_head.weight":
            continue
        m = _STACKED.match(name)
        if m:
            for e in range(p.shape[0]):
                shapes[f"model.layers.{m.group(1)}.mlp.experts.{e}.{m.group(2)}.weight"] = tuple(p.shape[1:])
        else:
            shapes[name if name.startswith("lm_head.") else f"model.{name}"] = tuple(p.shape)
    return shapes


# ---- save -------------------------------------------------------------------------------------
def save_pretrained(model: DeepseekV2, path: str | Path, max_shard_size: int | str = "4GB",
                    dtype: torch.dtype | None = None) -> None:
    """Write config.json + safetensors (sharded above max_shard_size) atomically.

    Everything is written to a temporary folder beside `path`, which then replaces `path` in one
    rename; a failure at any point leaves a previous checkpoint at `path` untouched.
    """
    path = Path(path)
    limit = parse_size(max_shard_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    tmp.chmod(0o755)  # mkdtemp's 0700 would make the published checkpoint private
    try:
        tensors = [(k, t.detach().contiguous().cpu()) for k, t in to_hub_state_dict(model, dtype)]
        shards: list[dict[str, torch.Tensor]] = [{}]
        size = 0
        for k, t in tensors:
            n = t.numel() * t.element_size()
            if shards[-1] and size + n > limit:
                shards.append({})
                size = 0
            shards[-1][k] = t
            size += n
        meta = {"format": "pt"}
        if len(shards) == 1:
            save_file(shards[0], tmp / SINGLE_FILE, metadata=meta)
        else:
            weight_map = {}
            for i, shard in enumerate(shards):
                fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, tmp / fname, metadata=meta)
                weight_map.update(dict.fromkeys(shard, fname))
            total = sum(t.numel() * t.element_size() for _, t in tensors)
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        cfg = model.config.to_dict()
        cfg["torch_dtype"] = str(dtype or next(model.parameters()).dtype).removeprefix("torch.")
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        _replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _replace_dir(new: Path, dest: Path) -> None:
    """Move `new` to `dest`, keeping files in `dest` that are not checkpoint files (e.g. tokenizer.json)."""
    for f in new.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if dest.exists():
        for f in dest.iterdir():  # carry over what the save does not own
            if not (f.name == "config.json" or f.name == INDEX_FILE or f.suffix == ".safetensors"):
                if not (new / f.name).exists():
                    (shutil.copytree if f.is_dir() else shutil.copy2)(f, new / f.name)
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        os.replace(dest, old)
        try:
            os.replace(new, dest)
        except BaseException:
            os.replace(old, dest)  # put the previous checkpoint back before reporting the failure
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new, dest)


# ---- load -------------------------------------------------------------------------------------
def _weight_files(path: Path) -> list[Path]:
    index = path / INDEX_FILE
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index: {e}") from e
        files = [path / f for f in dict.fromkeys(weight_map.values())]
    elif (path / SINGLE_FILE).exists():
        files = [path / SINGLE_FILE]
    else:
        files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no safetensors weights in {path} (expected {SINGLE_FILE} or {INDEX_FILE})")
    missing = [str(f) for f in files if not f.exists()]
    if missing:
        raise CheckpointError(f"weight files listed in {INDEX_FILE} are missing: {missing}")
    return files


def read_hub_tensors(path: str | Path, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint folder, memory-mapped where the device is the CPU."""
    out: dict[str, torch.Tensor] = {}
    for f in _weight_files(Path(path)):
        try:
            with safe_open(f, framework="pt", device=str(device)) as st:
                for k in st.keys():
                    out[k] = st.get_tensor(k)
        except (SafetensorError, OSError, RuntimeError) as e:
            raise CheckpointError(f"cannot read {f}: the file is truncated or corrupt ({e})") from e
    return out


def load_pretrained(path: str | Path, dtype: torch.dtype | None = None,
                    device: torch.device | str | None = None) -> DeepseekV2:
    """Build the model on the meta device and assign the checkpoint's tensors (no second copy)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint folder {path} does not exist")
    cfg = ModelConfig.from_json(path / "config.json")
    device = torch.device(device or "cpu")
    with torch.device("meta"):
        model = DeepseekV2(cfg, device="meta")
    tensors = {k: v for k, v in read_hub_tensors(path, device).items() if not IGNORED_KEYS.match(k)}
    expected = _expected_shapes(model)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = sorted(f"{k}: checkpoint {tuple(tensors[k].shape)}, config expects {expected[k]}"
                   for k in set(expected) & set(tensors) if tuple(tensors[k].shape) != expected[k])
    if missing or unexpected or wrong:
        parts = []
        for title, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", wrong)):
            if items:
                shown = items[:8] + ([f"... and {len(items) - 8} more"] if len(items) > 8 else [])
                parts.append(f"{len(items)} {title} tensor(s): " + "; ".join(shown))
        raise CheckpointError(f"checkpoint {path} does not match its config.json: " + " | ".join(parts))

    def cast(t: torch.Tensor) -> torch.Tensor:  # dtype=None keeps each tensor's stored dtype
        return t if dtype is None else t.to(dtype)

    # Consume the checkpoint tensor by tensor so at most one layer's experts exist twice (while stacked).
    state: dict[str, torch.Tensor] = {}
    pending: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
    n_experts = cfg.n_routed_experts or 0
    for k in list(tensors):
        t = tensors.pop(k)
        m = _EXPERT_KEY.match(k)
        if not m:
            state[k.removeprefix("model.")] = cast(t)
            continue
        group = pending.setdefault((m.group(1), m.group(3)), {})
        group[int(m.group(2))] = t
        if len(group) == n_experts:
            state[f"layers.{m.group(1)}.mlp.experts.{m.group(3)}"] = torch.stack(
                [cast(group.pop(e)) for e in range(n_experts)])
            del pending[(m.group(1), m.group(3))]
    if cfg.tie_word_embeddings:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    return model.to(device)
