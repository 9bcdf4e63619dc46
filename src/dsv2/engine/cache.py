"""Paged KV cache: per-layer pools of fixed-size blocks, read and written through block tables.

Shapes: L layers, NB blocks, BS block_size (tokens per block), W row width, N rows, S tokens of a sequence.

MLA rows are [c_kv (C) ; k_R (R)] -- the normalised latent and the RoPE'd shared key, nothing per head.
Baseline rows are [k (Hkv·Dh) ; v (Hkv·Dh)]. Either way the width comes from
`cfg.kv_elements_per_token_per_layer()`, and the storage of a row from a `KVFormat` (quant.py).

The cache owns the storage only. Which blocks a sequence holds is owned by one `BlockManager`
(blocks.py, the engine's scheduler's); code outside the scheduler that needs cache rows of its own
(`kv_quality`, benchmarks) borrows blocks from that same manager through `Engine.reserve`. A block table
(a list of block ids in token order) is all the cache needs to find a sequence's rows; consecutive
block ids are one zero-copy slice of the pool.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dsv2 import units
from dsv2.config import ModelConfig
from dsv2.engine.quant import KVFormat, make_format


class CacheError(RuntimeError):
    """The cache cannot hold a request (too long for the whole cache, or out of blocks)."""


def parse_bytes(text: str | int | float) -> int:
    """A kv_memory budget: '4GiB', '512MiB', '2GB', '1e9', 1000 -> bytes."""
    return units.parse_bytes(text, "kv_memory")


def _indexable(t: torch.Tensor) -> torch.Tensor:
    """t, or its bytes for fp8 (PyTorch has no index_copy / index_select kernels for fp8 on the CPU)."""
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


def slot_runs(blocks: Sequence[int], length: int, block_size: int) -> tuple[tuple[int, int], ...]:
    """Tokens [0, length) of a sequence with block table `blocks` as runs of consecutive slots."""
    out: list[list[int]] = []
    need = -(-length // block_size)
    if need > len(blocks):
        raise IndexError(f"{length} tokens need {need} blocks, the block table has {len(blocks)}")
    for b in blocks[:need]:
        if out and out[-1][0] + out[-1][1] == b * block_size:
            out[-1][1] += block_size
        else:
            out.append([b * block_size, block_size])
    if out:
        out[-1][1] -= need * block_size - length
    return tuple((s, n) for s, n in out)


class PagedCache:
    """Per-layer block pools for all sequences of an engine, in one storage format."""

    def __init__(self, cfg: ModelConfig, num_blocks: int, block_size: int = 64,
                 kv_cache_dtype: str = "auto", dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None, rope_bf16: bool = False,
                 group: int | None = None) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.cfg = cfg
        self.num_layers = cfg.num_hidden_layers
        self.width = cfg.kv_elements_per_token_per_layer()
        self.split = cfg.kv_lora_rank if cfg.attention_type == "mla" else None
        self.block_size, self.num_blocks = block_size, num_blocks
        self.format: KVFormat = make_format(kv_cache_dtype, self.width, dtype, self.split, rope_bf16, group)
        self.pools = [self.format.allocate(num_blocks, block_size, device) for _ in range(self.num_layers)]

    # ---- sizing ------------------------------------------------------------------------------
    @staticmethod
    def bytes_per_token_for(cfg: ModelConfig, kv_cache_dtype: str = "auto",
                            dtype: torch.dtype = torch.float32, rope_bf16: bool = False,
                            group: int | None = None) -> int:
        """(stored bytes of one row, scales included) x layers."""
        split = cfg.kv_lora_rank if cfg.attention_type == "mla" else None
        fmt = make_format(kv_cache_dtype, cfg.kv_elements_per_token_per_layer(), dtype, split, rope_bf16, group)
        return fmt.bytes_per_row() * cfg.num_hidden_layers

    @classmethod
    def from_budget(cls, cfg: ModelConfig, kv_memory: str | int | None = None, max_tokens: int | None = None,
                    block_size: int = 64, **kw) -> PagedCache:
        """Size the pool from a byte budget ('4GiB') or a token count (exactly one of the two)."""
        if (kv_memory is None) == (max_tokens is None):
            raise ValueError("give exactly one of kv_memory (bytes, e.g. '4GiB') and max_tokens")
        if max_tokens is not None:
            if max_tokens < 1:
                raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
            blocks = -(-max_tokens // block_size)
        else:
            per_token = cls.bytes_per_token_for(cfg, kw.get("kv_cache_dtype", "auto"),
                                                kw.get("dtype", torch.float32), kw.get("rope_bf16", False),
                                                kw.get("group"))
            budget = parse_bytes(kv_memory)
            blocks = budget // (per_token * block_size)
            if blocks < 1:
                raise ValueError(f"kv_memory={kv_memory!r} holds no block of {block_size} tokens "
                                 f"({per_token * block_size} bytes)")
        return cls(cfg, blocks, block_size, **kw)

    @property
    def bytes_per_token(self) -> int:
        return self.format.bytes_per_row() * self.num_layers

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def nbytes(self) -> int:
        """Bytes actually held by the pools (== bytes_per_token * capacity_tokens)."""
        return sum(t.numel() * t.element_size() for pool in self.pools for t in pool)

    # ---- sequences ---------------------------------------------------------------------------
    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def slots(self, blocks: Sequence[int], start: int, n: int) -> torch.Tensor:
        """Flat slot ids (n,) of tokens [start, start+n) of the sequence whose block table is `blocks`
        (slot = block * BS + offset)."""
        if start + n > len(blocks) * self.block_size:
            raise CacheError(f"token {start + n - 1} is past the {len(blocks) * self.block_size} "
                             "tokens of this block table")
        pos = torch.arange(start, start + n)
        table = torch.tensor(list(blocks), dtype=torch.long)[pos // self.block_size]
        return table * self.block_size + pos % self.block_size

    def runs(self, blocks: Sequence[int], length: int) -> tuple[tuple[int, int], ...]:
        """Tokens [0, length) of a block table as (start_slot, n) runs of consecutive slots."""
        return slot_runs(blocks, length, self.block_size)

    # ---- rows --------------------------------------------------------------------------------
    def write(self, layer: int, slots: torch.Tensor, rows: torch.Tensor) -> None:
        """Store rows (N, W) at flat slots (N,) of one layer."""
        slots = slots.to(self.pools[layer][0].device)
        for t, part in zip(self.pools[layer], self.format.encode(rows)):
            _indexable(t).view(-1, t.shape[-1]).index_copy_(0, slots, _indexable(part))

    def read_run(self, layer: int, start: int, n: int) -> torch.Tensor:
        """Rows (n, W) at slots [start, start+n): a zero-copy view of the pool for plain formats."""
        parts = [t.view(-1, t.shape[-1])[start: start + n] for t in self.pools[layer]]
        return parts[0] if self.format.plain else self.format.decode(parts)

    def gather(self, layer: int, slots: torch.Tensor) -> torch.Tensor:
        """Rows (..., W) at flat slots (...) of one layer, decoded: one indexing op per stored part, so a
        whole decode batch is read in a few kernels whatever the sequences' lengths and block tables."""
        idx = slots.to(self.pools[layer][0].device).flatten()
        parts = [_indexable(t).view(-1, t.shape[-1]).index_select(0, idx).view(t.dtype) for t in self.pools[layer]]
        rows = parts[0] if self.format.plain else self.format.decode(parts)
        return rows.view(*slots.shape, rows.shape[-1])

    def read(self, layer: int, blocks: Sequence[int], length: int) -> torch.Tensor:
        """All rows (length, W) of a sequence's block table; zero-copy when its blocks are consecutive and the
        format plain."""
        chunks = [self.read_run(layer, s, n) for s, n in self.runs(blocks, length)]
        if not chunks:
            return self.pools[layer][0].new_zeros(0, self.width, dtype=self.format.compute_dtype)
        return chunks[0] if len(chunks) == 1 else torch.cat(chunks, dim=0)
