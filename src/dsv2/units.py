"""Byte sizes as users write them: '4GiB', '512MiB', '2GB', '1e9' or a plain count."""

from __future__ import annotations

import re

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


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
