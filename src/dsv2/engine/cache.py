"""Paged KV cache: per-layer pools of fixed-size blocks, a block allocator and per-sequence block tables.

Shapes: L layers, NB blocks, BS block_size (tokens per block), W row width, N rows, S tokens of a sequence.

MLA rows are [c_kv (C) ; k_R (R)] -- the normalised latent and the RoPE'd shared key, nothing per head.
Baseline rows are [k (Hkv·Dh) ; v (Hkv·Dh)]. Either way the width comes from
`cfg.kv_elements_per_token_per_layer()`, and the storage of a row from a `KVFormat` (quant.py).

A sequence reserves the blocks for its whole budget (prompt + max_new_tokens) when admitted, as one
contiguous run of blocks when the pool has one. Its block table grows on demand out of that reservation.
Reserving up front means a running sequence can never run out of cache (no preemption, no corruption);
contiguity means its rows are one zero-copy slice of the pool, so decode reads the cache in place.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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


class BlockAllocator:
    """Free/used map of NB blocks with first-fit contiguous allocation (bytearray.find runs in C)."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self._used = bytearray(num_blocks)  # 0 free, 1 used
        self.num_free = num_blocks

    def allocate(self, n: int) -> list[int]:
        """n block ids: one contiguous run if there is one, else the lowest free blocks."""
        if n > self.num_free:
            raise CacheError(f"need {n} blocks, {self.num_free} free of {self.num_blocks}")
        if n == 0:
            return []
        start = self._used.find(bytes(n))
        if start >= 0:
            ids = list(range(start, start + n))
        else:
            ids, pos = [], 0
            while len(ids) < n:
                pos = self._used.find(0, pos)
                ids.append(pos)
                pos += 1
        for i in ids:
            self._used[i] = 1
        self.num_free -= n
        return ids

    def free(self, ids: list[int]) -> None:
        for i in ids:
            if not self._used[i]:
                raise CacheError(f"block {i} freed twice")
            self._used[i] = 0
        self.num_free += len(ids)


@dataclass
class SeqSlots:
    """One sequence's place in the cache: its reserved blocks and how many tokens are written."""

    reserved: list[int]
    length: int = 0
    runs_cache: list[tuple[int, int]] = field(default_factory=list)  # (start_slot, n) runs of `reserved`

    def __post_init__(self) -> None:
        runs: list[list[int]] = []
        for b in self.reserved:
            if runs and runs[-1][0] + runs[-1][1] == b:
                runs[-1][1] += 1
            else:
                runs.append([b, 1])
        self.runs_cache = [(b, n) for b, n in runs]  # in blocks; converted to slots by PagedCache

    @property
    def contiguous(self) -> bool:
        return len(self.runs_cache) <= 1


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
        self.allocator = BlockAllocator(num_blocks)

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

    def can_reserve(self, tokens: int) -> bool:
        return self.blocks_for(tokens) <= self.allocator.num_free

    def reserve(self, tokens: int) -> SeqSlots:
        """Blocks for `tokens` tokens (a contiguous run when possible). CacheError if they are not free."""
        if self.blocks_for(tokens) > self.num_blocks:
            raise CacheError(f"a sequence of {tokens} tokens needs {self.blocks_for(tokens)} blocks but the "
                             f"whole cache has {self.num_blocks} ({self.capacity_tokens} tokens)")
        return SeqSlots(self.allocator.allocate(self.blocks_for(tokens)))

    def release(self, seq: SeqSlots) -> None:
        self.allocator.free(seq.reserved)
        seq.reserved, seq.runs_cache, seq.length = [], [], 0

    def slots(self, seq: SeqSlots, start: int, n: int) -> torch.Tensor:
        """Flat slot ids (n,) of tokens [start, start+n) of `seq` (slot = block * BS + offset)."""
        if start + n > len(seq.reserved) * self.block_size:
            raise CacheError(f"token {start + n - 1} is past the {len(seq.reserved) * self.block_size} "
                             "tokens reserved for this sequence")
        pos = torch.arange(start, start + n)
        blocks = torch.tensor(seq.reserved, dtype=torch.long)[pos // self.block_size]
        return blocks * self.block_size + pos % self.block_size

    def runs(self, seq: SeqSlots, length: int) -> list[tuple[int, int]]:
        """Tokens [0, length) of `seq` as (start_slot, n) runs of consecutive slots (1 run if contiguous)."""
        out, left, bs = [], length, self.block_size
        for b, nblk in seq.runs_cache:
            if left <= 0:
                break
            n = min(left, nblk * bs)
            out.append((b * bs, n))
            left -= n
        return out

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

    def read(self, layer: int, seq: SeqSlots, length: int) -> torch.Tensor:
        """All rows (length, W) of a sequence; zero-copy when it is contiguous and the format plain."""
        chunks = [self.read_run(layer, s, n) for s, n in self.runs(seq, length)]
        if not chunks:
            return self.pools[layer][0].new_zeros(0, self.width, dtype=self.format.compute_dtype)
        return chunks[0] if len(chunks) == 1 else torch.cat(chunks, dim=0)
