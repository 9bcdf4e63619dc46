"""Paged cache: allocator, sizing from budgets, exact bytes/token, zero-copy and fragmented reads."""

from __future__ import annotations

import pytest
import torch

from dsv2.config import ModelConfig
from dsv2.engine.cache import BlockAllocator, CacheError, PagedCache, parse_bytes


def test_parse_bytes() -> None:
    assert parse_bytes("4GiB") == 4 * 2**30
    assert parse_bytes("512MiB") == 512 * 2**20
    assert parse_bytes("2GB") == 2 * 10**9
    assert parse_bytes("1e6") == 10**6
    assert parse_bytes(1234) == 1234
    for bad in ("4 parsecs", "-1GiB", "0", ""):
        with pytest.raises(ValueError, match="kv_memory"):
            parse_bytes(bad)


def test_allocator_contiguous_then_fragmented() -> None:
    a = BlockAllocator(10)
    x, y, z = a.allocate(3), a.allocate(3), a.allocate(3)
    assert x == [0, 1, 2] and y == [3, 4, 5] and z == [6, 7, 8]
    a.free(x)
    a.free(z)
    assert a.allocate(4) == [6, 7, 8, 9]  # the first contiguous run of 4
    assert a.allocate(3) == [0, 1, 2]
    a.free([0, 2])
    assert a.allocate(2) == [0, 2]  # no run of 2: the lowest free blocks
    with pytest.raises(CacheError, match="need 1 blocks, 0 free"):
        a.allocate(1)
    with pytest.raises(CacheError, match="freed twice"):
        a.free([9, 9])


@pytest.mark.parametrize("attn", ["mla", "mha", "gqa", "mqa"])
@pytest.mark.parametrize("dtype,name,el", [(torch.float32, "auto", 4), (torch.bfloat16, "auto", 2),
                                           (torch.float32, "bf16", 2)])
def test_bytes_per_token_exact(attn: str, dtype: torch.dtype, name: str, el: int) -> None:
    kw = {"num_key_value_heads": 2} if attn == "gqa" else {}
    cfg = ModelConfig.from_preset("tiny", attention_type=attn, **kw)
    cache = PagedCache(cfg, num_blocks=5, block_size=8, kv_cache_dtype=name, dtype=dtype)
    if attn == "mla":
        per_layer = cfg.kv_lora_rank + cfg.qk_rope_head_dim
    else:
        per_layer = 2 * {"mha": 4, "gqa": 2, "mqa": 1}[attn] * cfg.head_dim
    assert cache.bytes_per_token == per_layer * cfg.num_hidden_layers * el
    assert cache.nbytes() == cache.bytes_per_token * cache.capacity_tokens
    assert cache.pools[0][0].shape == (5, 8, per_layer)


def test_bytes_per_token_v2_lite_and_quantised_pools() -> None:
    cfg = ModelConfig.from_preset("deepseek-v2-lite")
    assert PagedCache.bytes_per_token_for(cfg, "bf16") == 576 * 27 * 2
    tiny = ModelConfig.from_preset("tiny")
    for name in ("fp8", "int8", "int4", "mixed"):
        cache = PagedCache(tiny, num_blocks=3, block_size=4, kv_cache_dtype=name)
        assert cache.nbytes() == cache.bytes_per_token * cache.capacity_tokens
        assert cache.bytes_per_token == PagedCache.bytes_per_token_for(tiny, name)


def test_from_budget() -> None:
    cfg = ModelConfig.from_preset("tiny")
    per_tok = PagedCache.bytes_per_token_for(cfg, "auto", torch.float32)
    cache = PagedCache.from_budget(cfg, kv_memory=per_tok * 16 * 10 + 5, block_size=16)
    assert cache.num_blocks == 10 and cache.nbytes() <= per_tok * 16 * 10 + 5
    assert PagedCache.from_budget(cfg, max_tokens=33, block_size=16).num_blocks == 3
    with pytest.raises(ValueError, match="exactly one"):
        PagedCache.from_budget(cfg, kv_memory="1MiB", max_tokens=10)
    with pytest.raises(ValueError, match="holds no block"):
        PagedCache.from_budget(cfg, kv_memory=10)


def test_rows_round_trip_contiguous_is_zero_copy_and_fragmented_gathers() -> None:
    cfg = ModelConfig.from_preset("tiny")
    cache = PagedCache(cfg, num_blocks=6, block_size=4)
    a, b = cache.reserve(8), cache.reserve(4)  # blocks [0, 1], [2]
    cache.reserve(4)  # [3]
    e = cache.reserve(8)  # [4, 5]
    cache.release(a)
    cache.release(e)
    c = cache.reserve(9)  # 3 blocks, no free run of 3: [0, 1] + [4] -> fragmented
    assert c.reserved == [0, 1, 4] and not c.contiguous
    rows = torch.randn(9, cache.width)
    cache.write(1, cache.slots(c, 0, 9), rows)
    assert torch.equal(cache.read(1, c, 9), rows)
    assert cache.runs(c, 9) == [(0, 8), (16, 1)]
    rb = torch.randn(3, cache.width)
    cache.write(1, cache.slots(b, 0, 3), rb)
    view = cache.read(1, b, 3)
    assert torch.equal(view, rb) and view.data_ptr() == cache.pools[1][0][2].data_ptr()  # a view
    with pytest.raises(CacheError, match="past the 4 tokens reserved"):
        cache.slots(b, 3, 2)
    with pytest.raises(CacheError, match="whole cache has 6"):
        cache.reserve(33)


def test_cpu_pools_hold_memory_only_for_written_blocks() -> None:
    """A 256 MiB pool is zeros but costs (nearly) no resident memory until blocks are written."""
    from dsv2.engine.quant import zeros_on_demand

    def rss_mib() -> float:
        return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20

    before = rss_mib()
    pool = zeros_on_demand((512, 64, 2048), torch.bfloat16, "cpu")  # 512 blocks of 64 rows, 256 MiB
    assert pool.shape == (512, 64, 2048) and pool.dtype == torch.bfloat16 and pool.is_contiguous()
    pool[3] = 1.5
    assert rss_mib() - before < 64
    assert bool((pool[3] == 1.5).all()) and bool((pool[:3] == 0).all()) and bool((pool[4:40] == 0).all())
