"""`dsv2 quantize`: a float checkpoint folder -> a quantised one, one module at a time.

Neither the float model nor the quantised one is ever held: the output's tensors are planned from a
meta-device model with the quantised modules swapped in, and when the writer reaches a quantised
module's first tensor, that module alone is built and quantised from the source tensors (mapped one
at a time), written, and dropped. Peak memory: one module (a layer's 64 experts, ~0.6 GB in int8 for
V2-Lite) plus one source tensor.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import torch
from torch import nn

from dsv2.quant.kernels import QuantError
from dsv2.quant.loader import quantise_from
from dsv2.quant.swap import resolve, swap_empty
from dsv2.tensorfile import Spec, TensorFiles


def quantize_folder(src: str | Path, out: str | Path, weights: str, group_size: int | None = None,
                    dtype: torch.dtype = torch.bfloat16, max_shard_size: int | str = "4GB") -> Path:
    """Write `src` quantised to `out` (atomically) with its quantization_config, and copy the folder's
    other files (tokenizer, generation config) beside it. dtype: the float tensors' and scales' dtype."""
    from dsv2.checkpoint import (
        INDEX_FILE,
        check_keys,
        hub_shapes,
        hub_specs,
        read_config,
        stored_quant_config,
        weight_files,
        write_checkpoint,
    )
    from dsv2.model import DeepseekV2

    src, out = Path(src), Path(out)
    if out.resolve() == src.resolve():
        raise QuantError(f"--out {out} is the source folder: write the quantised model to a new folder")
    if not src.is_dir():
        raise FileNotFoundError(f"checkpoint folder {src} does not exist")
    cfg = read_config(src)
    stored = stored_quant_config(cfg, src)
    qc = resolve(weights, group_size, stored, where=str(src))  # (a conflicting request is an error here)
    if stored is not None or qc is None:
        raise QuantError(f"{src} is already quantised ({stored.weights if stored else 'float requested'}); "
                         "quantise its float original")
    files = TensorFiles(weight_files(src))
    with torch.device("meta"):
        model = DeepseekV2(cfg, device="meta", dtype=dtype)
    check_keys(src, files, {k: v[0] for k, v in hub_shapes(model).items()})
    swapped = dict(swap_empty(model, qc, dtype))
    specs, _ = hub_specs(model)
    shapes = hub_shapes(model)
    tied = bool(cfg.tie_word_embeddings)
    current: dict[str, nn.Module] = {}  # the one quantised module being written

    def produce(spec: Spec) -> torch.Tensor:
        _, name, _ = shapes[spec.name]
        owner = next((m for m in swapped if name.startswith(m + ".")), None)
        if owner is None:
            t = files.get(spec.name)
            return t.to(dtype) if t.is_floating_point() else t
        if owner not in current:
            current.clear()  # the previous module's tensors are all written (state order is module order)
            m = copy.deepcopy(swapped[owner])  # meta; materialised and quantised by quantise_from
            quantise_from(files, owner, m, tied, torch.device("cpu"))
            current[owner] = m
        return getattr(current[owner], name[len(owner) + 1:])

    write_checkpoint(out, cfg, specs, produce, max_shard_size, dtype, qc)
    skip = {f.name for f in weight_files(src)} | {"config.json", INDEX_FILE}
    for f in src.iterdir():
        if (f.is_file() and f.name not in skip and not f.name.endswith(".safetensors")
                and not (out / f.name).exists()):
            shutil.copy2(f, out / f.name)
    return out
