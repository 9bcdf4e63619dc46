"""Units users type: byte sizes ('4GiB', '512MiB', '2GB', '1e9') and dtype names ('fp32', 'bf16', 'fp16').

Every flag or argument that takes a size or a dtype name goes through this module, so the spellings
accepted are the same everywhere.
"""

from __future__ import annotations

import re

import torch

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}

# the one name -> dtype map of the project (CLI flags, benchmarks, cache formats, checkpoints)
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_bytes(text: str | int | float, field: str = "size") -> int:
    """'4GiB', '512MiB', '2GB', '1e9', 1000 -> bytes (> 0); errors name `field`."""
    if isinstance(text, int | float) and not isinstance(text, bool):
        n = int(text)
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
        if not m or m.group(2).lower() not in _UNITS:
            raise ValueError(f"{field} must look like '4GiB', '512MiB', '2GB' or a byte count, got {text!r}")
        n = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if n <= 0:
        raise ValueError(f"{field} must be > 0 bytes, got {text!r}")
    return n


def parse_dtype(name: str | torch.dtype, field: str = "dtype") -> torch.dtype:
    """'fp32' / 'bf16' / 'fp16' (or a torch.dtype of those) -> torch.dtype; errors name `field`."""
    if isinstance(name, torch.dtype) and name in DTYPES.values():
        return name
    if isinstance(name, str) and name in DTYPES:
        return DTYPES[name]
    raise ValueError(f"{field} must be one of {', '.join(DTYPES)}, got {name!r}")


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> 'bf16' (the inverse of DTYPES)."""
    for k, v in DTYPES.items():
        if v == dtype:
            return k
    raise ValueError(f"no short name for {dtype} (known: {', '.join(DTYPES)})")
