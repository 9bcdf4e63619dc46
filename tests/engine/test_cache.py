"""Paged cache: sizing from budgets, exact bytes/token, zero-copy and fragmented reads; blocks borrowed from the
engine's one block manager."""

from __future__ import annotations

import pytest
import torch

from dsv2.config import ModelConfig
from dsv2.engine import Engine, SamplingParams
from dsv2.engine.cache import CacheError, PagedCache, parse_bytes
from dsv2.model import DeepseekV2


def test_parse_bytes() -> None:
    assert parse_bytes("4GiB") == 4 * 2**30
    assert parse_bytes("512MiB") == 512 * 2**20
    assert parse_bytes("2GB") == 2 * 10**9
    assert parse_bytes("1e6") == 10**6
    assert parse_bytes(1234) == 1234
    for bad in ("4 parsecs", "-1GiB", "0", ""):
        with pytest.raises(ValueError, match="kv_memory"):
            parse_bytes(bad)


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
    b, c = [2], [0, 1, 4]  # block tables: one block; a run of two and a stray one
    rows = torch.randn(9, cache.width)
    cache.write(1, cache.slots(c, 0, 9), rows)
    assert torch.equal(cache.read(1, c, 9), rows)
    assert cache.runs(c, 9) == ((0, 8), (16, 1))
    rb = torch.randn(3, cache.width)
    cache.write(1, cache.slots(b, 0, 3), rb)
    view = cache.read(1, b, 3)
    assert torch.equal(view, rb) and view.data_ptr() == cache.pools[1][0][2].data_ptr()  # a view
    assert torch.equal(cache.read(1, c, 9), rows)  # untouched by b's write
    with pytest.raises(CacheError, match="past the 4 tokens of this block table"):
        cache.slots(b, 3, 2)


def test_engine_reserve_borrows_blocks_from_the_scheduler() -> None:
    """Blocks reserved outside any request come from the scheduler's block manager: requests cannot get
    them while they are held (a request needing them waits), and they are all given back when the `with`
    block ends, also on an exception. One owner: no second allocator can hand out the same block."""
    model = DeepseekV2(ModelConfig.from_preset("tiny"), dtype=torch.float32).eval()
    model.reset_parameters(seed=0)
    eng = Engine(model, max_tokens=64, block_size=8, prefix_caching=False)  # 8 blocks
    manager = eng.scheduler.blocks
    with eng.reserve(40) as held:  # 5 blocks
        assert len(held) == 5 == manager.num_blocks - manager.num_free
        assert held == sorted(held) and held[-1] - held[0] == 4  # one run
        req = eng.add_request(list(range(1, 30)), SamplingParams(max_new_tokens=1))  # needs 4 blocks, 3 free
        eng.step()
        assert req.status == "waiting" and manager.num_free == 3  # nothing taken from the reservation
        with pytest.raises(CacheError, match="need 4 blocks for 25 tokens, 3 free of 8"):
            with eng.reserve(25):
                pass
        manager.check_invariants()
    assert manager.num_free == 8
    while eng.has_unfinished():
        eng.step()
    assert req.status == "finished"
    with pytest.raises(RuntimeError, match="boom"):
        with eng.reserve(8):
            raise RuntimeError("boom")
    assert manager.num_free == 8
    with pytest.raises(CacheError, match="whole cache has 8"):
        with eng.reserve(65):
            pass
