"""Keep a model's weights in anonymous memory, not in memory-mapped file pages.

`DeepseekV2.from_pretrained` keeps a stored tensor as a private mapping of the checkpoint file when
no cast is needed (a quantised folder loads in seconds that way). Those pages belong to the page
cache: the kernel may drop a page that is read only once per step and read it back from disk on the
next step, which made decode 3-30x slower on a machine with proactive page-out (issue 13).
`make_resident(model)` copies every such parameter and buffer into ordinary process memory.

How file backing is detected: a CPU tensor's storage is file-backed when its first byte lies inside a
mapping that /proc/self/maps lists with a file path (a regular file, inode != 0). Anonymous memory --
malloc's heap, its mmap'ed large blocks, torch's allocator -- has no path there (or a bracketed name
such as [heap]). This catches every way a tensor gets mapped from a file (`mmap` + `torch.frombuffer`
as `dsv2.tensorfile` does, `torch.load(mmap=True)`, `torch.from_file`, safetensors' mappings), and it
needs no knowledge of how the tensor was made. Off Linux (no /proc/self/maps) nothing is found.
"""

from __future__ import annotations

import bisect
import ctypes
import os
from pathlib import Path

import torch
from torch import nn

_MAPS = Path("/proc/self/maps")


def _file_ranges() -> tuple[list[int], list[int]]:
    """(starts, ends) of this process's file-backed mappings, sorted by start."""
    spans: list[tuple[int, int]] = []
    try:
        lines = _MAPS.read_text().splitlines()
    except OSError:
        return [], []
    for line in lines:
        parts = line.split(maxsplit=5)
        # address perms offset dev inode [path]
        if len(parts) < 6 or parts[4] == "0" or not parts[5].startswith("/"):
            continue
        lo, hi = parts[0].split("-")
        spans.append((int(lo, 16), int(hi, 16)))
    spans.sort()
    return [s for s, _ in spans], [e for _, e in spans]


def _is_file_backed(t: torch.Tensor, ranges: tuple[list[int], list[int]]) -> bool:
    if t.device.type != "cpu" or t.untyped_storage().nbytes() == 0:
        return False
    ptr = t.untyped_storage().data_ptr()
    starts, ends = ranges
    i = bisect.bisect_right(starts, ptr) - 1
    return i >= 0 and ptr < ends[i]


def file_backed(model: nn.Module) -> list[str]:
    """Names (state-dict style) of the parameters and buffers whose storage is a file mapping."""
    ranges = _file_ranges()
    tensors = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))
    return [name for name, t in tensors if t is not None and _is_file_backed(t, ranges)]


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_MADV_DONTNEED = 4  # Linux
_CHUNK = 16 << 20  # bytes copied between page drops: the peak while copying a 400 MiB lm_head stays ~16 MiB over


def _drop_pages(ptr: int, nbytes: int) -> None:
    """Give back the file pages of [ptr, ptr + nbytes) that were just copied: the pages wholly inside the range
    (a page shared with a neighbouring tensor stays), so that the copy does not sit beside a second,
    file-backed copy (the peak RSS of an engine on a 1.1 GB bf16 checkpoint was 1.38 GiB, its steady state
    0.99). Only the mapping's resident pages go (the file is read-only here); best effort."""
    lo = -(-ptr // _PAGE) * _PAGE
    hi = (ptr + nbytes) // _PAGE * _PAGE
    if hi <= lo:
        return
    try:
        _libc().madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), ctypes.c_int(_MADV_DONTNEED))
    except (OSError, AttributeError):
        pass


_LIBC: dict[str, ctypes.CDLL] = {}


def _libc() -> ctypes.CDLL:
    if "libc" not in _LIBC:  # loaded once: _drop_pages runs every chunk copied
        _LIBC["libc"] = ctypes.CDLL(None, use_errno=True)
    return _LIBC["libc"]


# glibc's mallopt parameters (malloc.h) and the values `reuse_freed_memory` sets
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 32 << 20  # the largest glibc accepts (HEAP_MAX_SIZE / 2 on 64-bit)
TRIM_THRESHOLD = 512 << 20


def reuse_freed_memory() -> bool:
    """Make glibc's malloc keep freed blocks of up to 32 MiB for reuse (process-wide, from now on).

    By default glibc serves a block above a moving threshold (128 KiB to 32 MiB) by a fresh `mmap` and unmaps
    it when freed, so each new activation tensor of a prefill or a batched step is faulted in page by page
    and zeroed by the kernel: 20-45 thousand page faults, ~90 ms of system time, per 512-token prefill of issue
    13's 2-layer model (2 Zen 4 cores), against ~0.3-13 thousand with these settings. Blocks up to 32 MiB then come
    from the heap, and up to 512 MiB of freed heap top stays mapped: the peak RSS stays about the same (+0-20
    MiB on issue 13's 2-layer model after a 512-token prompt and 4 x 32 decode steps), and memory a big step freed
    stays with the process for the next one (+30-50 MiB at the end there) rather than going back. Returns whether
    the settings took (False off glibc)."""
    try:
        libc = _libc()
        if not hasattr(libc, "gnu_get_libc_version"):
            return False
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
            libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    except (OSError, AttributeError):
        return False


@torch.no_grad()
def make_resident(model: nn.Module, keep_embeddings_mapped: bool = True) -> int:
    """Replace every file-backed parameter / buffer of `model` by an anonymous in-memory copy, in place.

    One storage at a time, 16 MiB at a time, each chunk's file pages given back once copied (peak memory:
    the model plus one chunk); tensors that shared a storage (tied embeddings, views) share the copy, and
    a Parameter stays the same object (its `.data` is swapped).
    keep_embeddings_mapped: leave a storage that only `nn.Embedding` modules use as file pages. A lookup
    reads one row per token, so an evicted page costs one page read now and then, never a whole step,
    while copying the table would add it all to the resident memory (0.4 GiB for DeepSeek-V2's 102,400 x
    2,048 bf16 vocabulary); a table tied to the output layer is read whole every step and is copied.
    Returns the bytes copied (0 when nothing was file-backed)."""
    ranges = _file_ranges()
    if not ranges[0]:
        return 0
    # first find every file-backed slot, grouped by storage, holding names only (no references to the
    # old tensors, so each mapping is released as soon as its group is copied)
    groups: dict[int, list[tuple[nn.Module, str, str, tuple]]] = {}
    for module in model.modules():
        for kind, slots in (("param", module._parameters), ("buffer", module._buffers)):
            for name, t in slots.items():
                if t is not None and _is_file_backed(t, ranges):
                    view = (t.dtype, t.storage_offset(), tuple(t.size()), t.stride())
                    groups.setdefault(t.untyped_storage().data_ptr(), []).append((module, kind, name, view))
    if keep_embeddings_mapped:
        groups = {k: slots for k, slots in groups.items()
                  if not all(isinstance(module, nn.Embedding) for module, *_ in slots)}
    copied = 0
    for slots in groups.values():
        module, kind, name, _ = slots[0]
        old = getattr(module, name).untyped_storage()
        new = torch.UntypedStorage(old.nbytes(), device=old.device)
        src = torch.empty(0, dtype=torch.uint8).set_(old)
        dst = torch.empty(0, dtype=torch.uint8, device=new.device).set_(new)
        for a in range(0, old.nbytes(), _CHUNK):  # a chunk at a time, its file pages given back after it
            b = min(old.nbytes(), a + _CHUNK)
            dst[a:b].copy_(src[a:b])
            _drop_pages(old.data_ptr() + a, b - a)
        copied += old.nbytes()
        del old, src, dst
        views: dict[tuple, torch.Tensor] = {}
        swapped: set[int] = set()
        for module, kind, name, view in slots:
            if view not in views:
                dtype, offset, size, stride = view
                views[view] = torch.empty(0, dtype=dtype, device=new.device).set_(new, offset, size, stride)
            if kind == "buffer":
                module._buffers[name] = views[view]
            elif id(p := module._parameters[name]) not in swapped:  # a tied Parameter is swapped once
                p.data = views[view]
                swapped.add(id(p))
    return copied
