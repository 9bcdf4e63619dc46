"""`dsv2 quantize`: a float checkpoint folder -> a quantised one, streamed (the float model never exists)."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from dsv2.quant.kernels import QuantError


def quantize_folder(src: str | Path, out: str | Path, weights: str, group_size: int | None = None,
                    dtype: torch.dtype = torch.bfloat16, max_shard_size: int | str = "4GB") -> Path:
    """Load `src` quantising tensor by tensor, write it to `out` (atomically) with its quantization_config,
    and copy the folder's other files (tokenizer, generation config) beside it. Returns `out`."""
    from dsv2.checkpoint import load_pretrained, save_pretrained, weight_files

    src, out = Path(src), Path(out)
    if out.resolve() == src.resolve():
        raise QuantError(f"--out {out} is the source folder: write the quantised model to a new folder")
    model = load_pretrained(src, dtype=dtype, weights=weights, group_size=group_size)
    save_pretrained(model, out, max_shard_size=max_shard_size)
    skip = {"config.json", "model.safetensors.index.json"} | {f.name for f in weight_files(src)}
    for f in src.iterdir():
        if f.is_file() and f.name not in skip and not f.name.endswith(".safetensors") and not (out / f.name).exists():
            shutil.copy2(f, out / f.name)
    return out
