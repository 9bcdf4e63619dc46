"""safetensors files written and read one tensor at a time.

`write_tensors` plans the shards from the tensors' shapes (known before any data exists), writes
each file's header, then streams every tensor's bytes as the producer makes it: the writer never
holds more than the tensor in hand, so a 31 GB random checkpoint (`dsv2 init`) or a quantised model
can be written in a few hundred MB. `TensorFiles` reads the headers of a folder's files and maps
one tensor at a time (`get`): the mapping lives exactly as long as the returned tensor, so
read -> quantise -> release keeps one tensor resident, and a tensor kept (a quantised weight)
stays a file-backed view that costs no anonymous memory. Files follow the safetensors format
(an 8-byte little-endian header length, a JSON header, the data), so `safetensors`,
transformers, vLLM and SGLang read them.
"""

from __future__ import annotations

import json
import math
import mmap
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

_CODES = {torch.float64: "F64", torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16",
          torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
          torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}
_DTYPES = {v: k for k, v in _CODES.items()}


class CheckpointError(ValueError):
    """A checkpoint folder that does not match its config (missing/unexpected/mis-shaped/corrupt)."""


@dataclass(frozen=True)
class Spec:
    """One tensor to write: its name, shape and dtype (the data comes later)."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


def plan_shards(specs: list[Spec], max_shard_bytes: int) -> list[list[Spec]]:
    """Consecutive groups of tensors, each at most max_shard_bytes (a larger tensor gets its own)."""
    shards: list[list[Spec]] = [[]]
    size = 0
    for s in specs:
        if shards[-1] and size + s.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(s)
        size += s.nbytes
    return shards


def _header(specs: list[Spec], metadata: dict[str, str]) -> bytes:
    entries: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for s in specs:
        entries[s.name] = {"dtype": _CODES[s.dtype], "shape": list(s.shape),
                           "data_offsets": [offset, offset + s.nbytes]}
        offset += s.nbytes
    raw = json.dumps(entries, separators=(",", ":")).encode()
    raw += b" " * (-(len(raw) + 8) % 64)  # pad so the data (and most tensors) start 64-byte aligned
    return struct.pack("<Q", len(raw)) + raw


def write_file(path: Path, specs: list[Spec], tensors: Iterable[torch.Tensor],
               metadata: dict[str, str] | None = None) -> None:
    """One safetensors file: `tensors` yields the data of `specs`, in order, one at a time."""
    with open(path, "wb") as f:
        f.write(_header(specs, metadata or {"format": "pt"}))
        for spec, t in zip(specs, tensors, strict=True):
            if tuple(t.shape) != spec.shape or t.dtype != spec.dtype:
                raise CheckpointError(f"{spec.name}: produced {tuple(t.shape)} {t.dtype}, "
                                      f"planned {spec.shape} {spec.dtype}")
            flat = t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)  # (bytes,)
            f.write(memoryview(flat.numpy()))


def write_tensors(folder: Path, specs: list[Spec], produce: Callable[[Spec], torch.Tensor],
                  max_shard_bytes: int, metadata: dict[str, str] | None = None,
                  write: Callable[..., None] = write_file) -> list[str]:
    """Write `specs` into `folder` as one file or shards + index; produce(spec) makes each tensor when its
    turn comes. Returns the file names written."""
    shards = plan_shards(specs, max_shard_bytes)
    if len(shards) == 1:
        write(folder / SINGLE_FILE, shards[0], (produce(s) for s in shards[0]), metadata)
        return [SINGLE_FILE]
    names, weight_map = [], {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write(folder / name, shard, (produce(s) for s in shard), metadata)
        names.append(name)
        weight_map.update(dict.fromkeys((s.name for s in shard), name))
    index = {"metadata": {"total_size": sum(s.nbytes for s in specs)}, "weight_map": weight_map}
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return names


# ---- reading ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Entry:
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    nbytes: int


def read_header(path: Path) -> dict[str, _Entry]:
    """name -> where its bytes are; CheckpointError names the file if the header or size is wrong."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: truncated (no header)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise CheckpointError(f"{path}: truncated or corrupt (header of {n} bytes, file of {size})")
            header = json.loads(f.read(n))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not a safetensors file, truncated or corrupt ({e})") from e
    out: dict[str, _Entry] = {}
    for name, h in header.items():
        if name == "__metadata__":
            continue
        if h.get("dtype") not in _DTYPES:
            raise CheckpointError(f"{path}: tensor {name} has an unsupported dtype {h.get('dtype')!r}")
        begin, end = h["data_offsets"]
        out[name] = _Entry(path, _DTYPES[h["dtype"]], tuple(h["shape"]), 8 + n + begin, end - begin)
        if 8 + n + end > size:
            raise CheckpointError(f"{path}: truncated or corrupt ({name} ends at byte {8 + n + end}, "
                                  f"the file has {size})")
    return out


class TensorFiles:
    """The tensors of a list of safetensors files, mapped one at a time on request."""

    def __init__(self, files: list[Path]) -> None:
        self.entries: dict[str, _Entry] = {}
        for f in files:
            self.entries.update(read_header(f))

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name].shape

    def dtype(self, name: str) -> torch.dtype:
        return self.entries[name].dtype

    def get(self, name: str) -> torch.Tensor:
        """The tensor as a private, copy-on-write mapping of its bytes (unmapped when it is freed)."""
        e = self.entries.get(name)
        if e is None:
            raise CheckpointError(f"no tensor {name!r} in the checkpoint")
        if e.nbytes == 0:
            return torch.empty(e.shape, dtype=e.dtype)
        base = e.start - e.start % mmap.ALLOCATIONGRANULARITY
        with open(e.file, "rb") as f:
            mm = mmap.mmap(f.fileno(), e.start + e.nbytes - base, offset=base, access=mmap.ACCESS_COPY)
        raw = torch.frombuffer(mm, dtype=torch.uint8, offset=e.start - base, count=e.nbytes)  # keeps mm alive
        return raw.view(e.dtype).view(e.shape)
