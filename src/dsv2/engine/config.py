"""`EngineConfig`: every setting of an engine in one validated dataclass (the CLI prints it).

Architecture lives in `ModelConfig`; what belongs to serving (cache format and size, batch limits,
chunking, kernel choices) lives here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from dsv2.engine.attention import DECODE_IMPLS
from dsv2.engine.quant import CACHE_DTYPES

ALLOCATIONS = ("on_demand", "reserve")


class EngineConfigError(ValueError):
    """An engine setting with an invalid value; the message names the field."""


@dataclass(frozen=True)
class EngineConfig:
    kv_cache_dtype: str = "auto"  # auto (= model dtype) | fp32 | bf16 | fp16 | fp8 | int8 | int4 | mixed
    kv_memory: str | int | None = None  # cache budget in bytes ("4GiB"); or max_tokens; default: see Engine
    max_tokens: int | None = None  # cache size in tokens (instead of kv_memory)
    block_size: int = 64  # tokens per cache block
    max_batch: int = 64  # sequences running at once
    max_num_batched_tokens: int = 2048  # tokens of one step (decodes first, then prefill chunks)
    prefill_chunk: int = 2048  # most prompt tokens of one request in one step
    decode_chunk: int | None = None  # rows per upcast chunk of CPU decode attention (default ~4 MiB of fp32)
    key_block: int = 2048  # cached tokens decompressed at a time by a prefill (bounds its memory)
    decode_impl: str = "auto"  # auto | fast (per sequence, in place) | gathered (one padded batch)
    rope_bf16: bool = False  # keep k_R in bf16 when the latent is quantised
    kv_group: int | None = None  # quantisation group of the cache formats (default per format)
    compile: bool = False  # decode-only steps run one compiled graph of the whole forward (engine/compiled.py)
    prefix_caching: bool = True  # reuse cached full blocks of identical prompt prefixes
    allocation: str = "on_demand"  # on_demand (blocks as tokens arrive) | reserve (prompt + max_new_tokens up front)
    watermark: float = 0.01  # fraction of blocks admission leaves free for running requests to grow into
    resident: bool = True  # copy memory-mapped weights (not the embedding) into RAM first
    resident_embedding: bool = False  # with resident: the token embedding too (no page faults on new token ids)
    reuse_freed_memory: bool = True  # CPU, glibc: freed blocks up to 32 MiB kept for reuse (dsv2.resident)
    int8_activations: bool = False  # int8/int4 weights: activations rounded to int8 per 32 (faster, not exact)

    def __post_init__(self) -> None:
        def need(cond: bool, name: str, msg: str) -> None:
            if not cond:
                raise EngineConfigError(f"EngineConfig.{name} {msg}, got {getattr(self, name)!r}")

        def pos_int(name: str, optional: bool = False) -> None:
            v = getattr(self, name)
            need((optional and v is None) or (isinstance(v, int) and not isinstance(v, bool) and v >= 1), name,
                 "must be an integer >= 1" + (" or None" if optional else ""))

        need(self.kv_cache_dtype in CACHE_DTYPES, "kv_cache_dtype", f"must be one of {CACHE_DTYPES}")
        need(self.decode_impl in DECODE_IMPLS, "decode_impl", f"must be one of {DECODE_IMPLS}")
        need(self.kv_memory is None or self.max_tokens is None, "kv_memory", "and max_tokens are exclusive: give one")
        for name in ("block_size", "max_batch", "max_num_batched_tokens", "prefill_chunk", "key_block"):
            pos_int(name)
        for name in ("max_tokens", "decode_chunk", "kv_group"):
            pos_int(name, optional=True)
        need(self.allocation in ALLOCATIONS, "allocation", f"must be one of {ALLOCATIONS}")
        need(isinstance(self.watermark, int | float) and 0 <= self.watermark < 1, "watermark", "must be in [0, 1)")
        for name in ("compile", "prefix_caching", "resident", "resident_embedding", "reuse_freed_memory", "rope_bf16",
                     "int8_activations"):
            need(isinstance(getattr(self, name), bool), name, "must be True or False")
        need(self.max_num_batched_tokens >= self.max_batch, "max_num_batched_tokens",
             f"must be >= max_batch={self.max_batch} (every running sequence decodes each step)")

    def describe(self) -> str:
        """One line per setting, for the CLI."""
        return "\n".join(f"  {k:<24} {v}" for k, v in asdict(self).items())
