"""Checkpoints in the hub (transformers) layout: config.json + safetensors, single file or sharded.

The hub key names live here and nowhere else. In memory dsv2 stacks the routed experts
(`mlp.experts.gate_proj` of shape (E, I, D)); on disk every expert has its own keys
(`model.layers.L.mlp.experts.N.gate_proj.weight`), which transformers, vLLM and SGLang read.

Both directions stream, one tensor at a time (`dsv2.tensorfile`): saving never gathers the model's
tensors into a second copy, and loading maps each stored tensor, converts it into its place (the
stacked expert tensor of its layer, a dtype cast, or an int8/int4 quantisation) and releases it.
A quantised folder (config.json with a `quantization_config`, written by `dsv2 quantize`) keeps its
int8/int4 tensors in dsv2's own layout and is loaded by mapping them, without conversion.

`dsv2.model` never imports this module: `install()` attaches `from_pretrained` / `save_pretrained`
to `DeepseekV2` when the `dsv2` package is imported (see `DeepseekV2._checkpoint_io`).
"""

from __future__ import annotations

import json
import re
import zlib
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from dsv2.atomic import atomic_folder
from dsv2.config import MODEL_TYPE, ConfigError, ModelConfig
from dsv2.model import DeepseekV2
from dsv2.precision import prepare
from dsv2.quant.swap import QUANT_MODEL_TYPE, QuantConfig, quant_config_of, resolve, swap_empty
from dsv2.tensorfile import INDEX_FILE, SINGLE_FILE, CheckpointError, Spec, TensorFiles, write_file, write_tensors
from dsv2.units import parse_bytes

# keys some writers add that carry no weights (rotary tables are derived from the config)
IGNORED_KEYS = re.compile(r".*rotary_emb\.inv_freq$")
_STACKED = re.compile(r"^(layers\.\d+\.mlp\.experts)\.(gate_proj|up_proj|down_proj)$")
__all__ = ["CheckpointError", "load_pretrained", "save_pretrained", "write_random_checkpoint", "install",
           "hub_specs", "INDEX_FILE", "SINGLE_FILE"]


def parse_size(size: int | str) -> int:
    """A shard size limit: '4GB', '500MiB', 1024 -> bytes."""
    return parse_bytes(size, "max_shard_size")


# ---- names ------------------------------------------------------------------------------------
def hub_key(name: str) -> str:
    """State-dict name -> hub key (`model.` prefix, except lm_head)."""
    return name if name.startswith("lm_head.") else f"model.{name}"


def expert_keys(prefix: str, proj: str, n: int) -> list[str]:
    """Hub keys of the n per-expert tensors of a stacked `prefix.proj` parameter."""
    return [hub_key(f"{prefix}.{e}.{proj}.weight") for e in range(n)]


def _entries(model: nn.Module) -> dict[str, torch.Tensor]:
    sd = model.state_dict(keep_vars=True)
    if model.config.tie_word_embeddings and isinstance(model.lm_head, nn.Linear):  # a quantised head is saved
        sd.pop("lm_head.weight", None)
    return sd


def hub_shapes(model: nn.Module) -> dict[str, tuple[tuple[int, ...], str, int]]:
    """hub key -> (shape, state name, expert index or -1) of everything a checkpoint of `model` holds."""
    out = {}
    for name, t in _entries(model).items():
        m = _STACKED.match(name)
        if m:
            for e, k in enumerate(expert_keys(m.group(1), m.group(2), t.shape[0])):
                out[k] = (tuple(t.shape[1:]), name, e)
        else:
            out[hub_key(name)] = (tuple(t.shape), name, -1)
    return out


def hub_specs(model: nn.Module, dtype: torch.dtype | None = None
              ) -> tuple[list[Spec], Callable[[Spec], torch.Tensor]]:
    """What `save_pretrained` writes: the specs and a producer that slices/casts one tensor per call."""
    sd, shapes = _entries(model), hub_shapes(model)

    def cast(t: torch.Tensor) -> torch.Tensor:
        return t.to(dtype) if dtype is not None and t.is_floating_point() else t

    specs = [Spec(k, shape, cast(torch.empty(0, dtype=sd[name].dtype)).dtype) for k, (shape, name, _) in shapes.items()]

    def produce(spec: Spec) -> torch.Tensor:
        _, name, e = shapes[spec.name]
        t = sd[name].detach()
        return cast(t if e < 0 else t[e])

    return specs, produce


# ---- save -------------------------------------------------------------------------------------
def _checkpoint_file(name: str) -> bool:
    return name == "config.json" or name == INDEX_FILE or name.endswith(".safetensors")


def write_config(folder: Path, cfg: ModelConfig, torch_dtype: torch.dtype, qc: QuantConfig | None) -> None:
    d = cfg.to_dict()
    d["torch_dtype"] = str(torch_dtype).removeprefix("torch.")
    d.pop("quantization_config", None)
    if qc is not None:
        d["quantization_config"] = qc.to_dict()
        d["model_type"] = QUANT_MODEL_TYPE
    (folder / "config.json").write_text(json.dumps(d, indent=2, sort_keys=True) + "\n")


def write_checkpoint(path: str | Path, cfg: ModelConfig, specs: list[Spec], produce: Callable[[Spec], torch.Tensor],
                     max_shard_size: int | str, float_dtype: torch.dtype, qc: QuantConfig | None = None) -> None:
    """The one way a checkpoint folder is written: atomically, tensor by tensor, then config.json.

    Files in an existing `path` that are not checkpoint files (e.g. tokenizer.json) are kept; a
    failure at any point leaves the previous checkpoint at `path` untouched.
    """
    limit = parse_size(max_shard_size)
    with atomic_folder(path, carry_over=lambda name: not _checkpoint_file(name)) as tmp:
        for stale in tmp.iterdir():  # writing in place inside an outer atomic folder: start clean
            if _checkpoint_file(stale.name):
                stale.unlink()
        write_tensors(tmp, specs, produce, limit, write=write_file)
        write_config(tmp, cfg, float_dtype, qc)


def save_pretrained(model: nn.Module, path: str | Path, max_shard_size: int | str = "4GB",
                    dtype: torch.dtype | None = None) -> None:
    """Write config.json + safetensors (sharded above max_shard_size) atomically, one tensor at a time.

    A quantised model (`dsv2.quant`) is written in its int8/int4 form with a `quantization_config`.
    """
    specs, produce = hub_specs(model, dtype)
    write_checkpoint(path, model.config, specs, produce, max_shard_size, dtype or model.embed_tokens.weight.dtype,
                     quant_config_of(model))


# ---- load -------------------------------------------------------------------------------------
def weight_files(path: Path) -> list[Path]:
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


def read_config(path: str | Path) -> ModelConfig:
    """The ModelConfig of a checkpoint folder (or config.json), quantised folders included."""
    try:
        return ModelConfig.from_json(path)
    except ConfigError as e:  # a quantised folder's own model_type (QUANT_MODEL_TYPE)?
        file = Path(path) / "config.json" if Path(path).is_dir() else Path(path)
        try:
            data = json.loads(file.read_text())
        except ValueError:
            raise e from None
        if data.get("model_type") != QUANT_MODEL_TYPE:
            raise
        return ModelConfig.from_dict({**data, "model_type": MODEL_TYPE})


def stored_quant_config(cfg: ModelConfig, path: Path) -> QuantConfig | None:
    d = cfg.extra.get("quantization_config")
    return None if d is None else QuantConfig.from_dict(d, where=f"{path / 'config.json'} quantization_config")


def check_keys(path: Path, files: TensorFiles, expected: dict[str, tuple[int, ...]]) -> None:
    have = {k: files.shape(k) for k in files.keys() if not IGNORED_KEYS.match(k)}
    missing = sorted(set(expected) - set(have))
    unexpected = sorted(set(have) - set(expected))
    wrong = sorted(f"{k}: checkpoint {have[k]}, config expects {expected[k]}"
                   for k in set(expected) & set(have) if have[k] != expected[k])
    if missing or unexpected or wrong:
        parts = []
        for title, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", wrong)):
            if items:
                shown = items[:8] + ([f"... and {len(items) - 8} more"] if len(items) > 8 else [])
                parts.append(f"{len(items)} {title} tensor(s): " + "; ".join(shown))
        raise CheckpointError(f"checkpoint {path} does not match its config.json: " + " | ".join(parts))


def load_pretrained(path: str | Path, dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                    weights: str | None = None, group_size: int | None = None) -> DeepseekV2:
    """Build the model on the meta device and fill it from the checkpoint, one stored tensor at a time.

    weights="int8" | "int4" quantises every Linear (but the router and kv_b_proj) and the experts while
    loading: the bf16 model never exists. weights="bf16" loads float weights in bf16. A quantised folder
    loads in its own format; asking it for another is an error. dtype: the float dtype (for a quantised
    model, its activation dtype; default the folder's torch_dtype). None keeps each stored tensor's
    dtype for an unquantised model. The model comes back with `dsv2.precision.prepare` applied.
    """
    from dsv2.quant.loader import fill_model  # the per-module conversions live with the quantised modules

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint folder {path} does not exist")
    cfg = read_config(path)
    stored = stored_quant_config(cfg, path)
    qc = resolve(weights, group_size, stored, where=str(path))
    if weights == "bf16" and dtype is None:
        dtype = torch.bfloat16
    files = TensorFiles(weight_files(path))
    device = torch.device(device or "cpu")
    with torch.device("meta"):
        model = DeepseekV2(cfg, device="meta")
    if qc is not None and stored is None:  # quantise from the float tensors
        check_keys(path, files, {k: v[0] for k, v in hub_shapes(model).items()})
    act = dtype or _folder_dtype(cfg)
    swapped = swap_empty(model, qc, act) if qc is not None else []
    if qc is None or stored is not None:
        check_keys(path, files, {k: v[0] for k, v in hub_shapes(model).items()})
    fill_model(model, files, hub_shapes(model), swapped, dtype if qc is None else act, device,
               quantise=stored is None)
    model = model.to(device) if device.type != "cpu" else model
    return prepare(model)  # the CPU precision policy (a no-op where bf16 GEMMs are native or off the CPU)


def _folder_dtype(cfg: ModelConfig) -> torch.dtype:
    name = cfg.extra.get("torch_dtype")
    dt = getattr(torch, name, None) if isinstance(name, str) else None
    return dt if dt in (torch.float32, torch.bfloat16, torch.float16) else torch.bfloat16


# ---- DeepseekV2.from_pretrained / save_pretrained ----------------------------------------------
class HubIO:
    """What `DeepseekV2._checkpoint_io` points at: this module's load and save."""

    load = staticmethod(load_pretrained)
    save = staticmethod(save_pretrained)


def install() -> None:
    """Give `DeepseekV2.from_pretrained` / `.save_pretrained` their implementation (dsv2/__init__ calls it)."""
    DeepseekV2._checkpoint_io = HubIO


# ---- random checkpoints (`dsv2 init`) ----------------------------------------------------------
def _random_tensor(spec: Spec, std: float, seed: int) -> torch.Tensor:
    """What `DeepseekV2.reset_parameters` would give this tensor: ones for norms, zeros for biases,
    else N(0, std); seeded per key, so the result does not depend on the order of writing."""
    if spec.name.endswith("norm.weight"):
        return torch.ones(spec.shape, dtype=spec.dtype)
    if spec.name.endswith(".bias"):
        return torch.zeros(spec.shape, dtype=spec.dtype)
    gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(spec.name.encode())) % 2**63)
    return torch.empty(spec.shape, dtype=spec.dtype).normal_(0.0, std, generator=gen)


def write_random_checkpoint(cfg: ModelConfig, path: str | Path, dtype: torch.dtype = torch.bfloat16,
                            seed: int = 0, max_shard_size: int | str = "4GB") -> int:
    """A random checkpoint of `cfg`'s real shape in the hub layout, written tensor by tensor (atomically).

    The model is never built: shapes come from a meta-device model, each tensor is drawn when its turn
    to be written comes and freed after, so memory stays at about one tensor (the embedding of
    V2-Lite: 0.4 GB in bf16). Returns the bytes of weights written.
    """
    with torch.device("meta"):
        model = DeepseekV2(cfg, device="meta", dtype=dtype)
    specs, _ = hub_specs(model)
    write_checkpoint(path, cfg, specs, lambda s: _random_tensor(s, cfg.initializer_range, seed), max_shard_size, dtype)
    return sum(s.nbytes for s in specs)
