"""KV-cache accounting (DeepSeek-V2 Table 1): per-token cache of MLA beside MHA/GQA/MQA of the same dims.

Elements per token per layer: MHA 2·n_h·d_h, GQA 2·n_g·d_h, MQA 2·d_h, MLA d_c + d_R.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dsv2.config import ModelConfig

# stored bits per element, scales included where a format has them
BITS_PER_ELEMENT: dict[str, float] = {"fp32": 32, "fp16": 16, "bf16": 16, "fp8": 8, "int8": 8, "int4": 4,
                                      "6bit": 6}


@dataclass(frozen=True)
class KVRow:
    name: str
    formula: str
    elements_per_layer: int
    layers: int
    bits: float

    @property
    def elements(self) -> int:
        return self.elements_per_layer * self.layers

    @property
    def bytes_per_layer(self) -> float:
        return self.elements_per_layer * self.bits / 8

    @property
    def bytes(self) -> float:
        return self.elements * self.bits / 8


def parse_bits(dtype: str) -> float:
    """'bf16' -> 16, '6bit' -> 6, '4.5' -> 4.5 bits per element."""
    if dtype in BITS_PER_ELEMENT:
        return BITS_PER_ELEMENT[dtype]
    try:
        bits = float(dtype.removesuffix("bit").removesuffix("bits"))
    except ValueError:
        raise ValueError(f"unknown KV dtype {dtype!r}; use one of {', '.join(BITS_PER_ELEMENT)} "
                         "or a number of bits per element") from None
    if not 0 < bits <= 64:
        raise ValueError(f"bits per element must be in (0, 64], got {bits}")
    return bits


def cache_bits(cfg: ModelConfig, dtype: str) -> float:
    """Stored bits per element of a KV dtype for cfg's cache rows, scales included.

    The engine's formats (fp8, int8, int4 with group scales; `mixed` = int4 c_kv + bf16 k_R; a
    `+rope_bf16` suffix keeps k_R in bf16) are measured from the format itself; other names
    ('6bit', a number) are nominal bits per element.
    """
    from dsv2.engine.quant import CACHE_DTYPES, make_format  # the engine owns the storage formats

    name, rope_bf16 = dtype.removesuffix("+rope_bf16"), dtype.endswith("+rope_bf16")
    if name in CACHE_DTYPES and name != "auto":
        split = cfg.kv_lora_rank if cfg.attention_type == "mla" else None
        fmt = make_format(name, cfg.kv_elements_per_token_per_layer(), torch.bfloat16, split, rope_bf16)
        return fmt.bits_per_element()
    return parse_bits(dtype)


def kv_rows(cfg: ModelConfig, bits: float, gqa_groups: int | None = None) -> list[KVRow]:
    """MHA, GQA, MQA and MLA rows for the attention dims of `cfg` (d_h = its head dim)."""
    n_h, d_h, layers = cfg.num_attention_heads, cfg.head_dim, cfg.num_hidden_layers
    groups = gqa_groups or (cfg.num_key_value_heads if cfg.attention_type == "gqa" else None) or max(1, n_h // 8)
    if n_h % groups:
        raise ValueError(f"gqa groups={groups} must divide num_attention_heads={n_h}")
    rows = [
        KVRow("MHA", "2·n_h·d_h·l", 2 * n_h * d_h, layers, bits),
        KVRow(f"GQA ({groups} groups)", "2·n_g·d_h·l", 2 * groups * d_h, layers, bits),
        KVRow("MQA", "2·d_h·l", 2 * d_h, layers, bits),
    ]
    if cfg.attention_type == "mla":
        rows.append(KVRow("MLA", "(d_c+d_R)·l", cfg.kv_lora_rank + cfg.qk_rope_head_dim, layers, bits))
    return rows


def model_kv_row(cfg: ModelConfig, bits: float) -> KVRow:
    """The cache of the attention the config actually uses."""
    name = cfg.attention_type.upper()
    return KVRow(name, "", cfg.kv_elements_per_token_per_layer(), cfg.num_hidden_layers, bits)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.2f} {unit}"
        n /= 1024
    raise AssertionError


def human_count(n: float) -> str:
    """110592 -> '110.6K' (the paper's notation)."""
    if n >= 1e6:
        return f"{n / 1e6:.2f}M"
    return f"{n / 1000:.1f}K" if n >= 1000 else f"{n:.0f}"


def report(cfg: ModelConfig, name: str, dtype: str = "bf16", context: int = 4096,
           gqa_groups: int | None = None, compare: ModelConfig | None = None, compare_name: str = "",
           compare_dtype: str = "bf16") -> str:
    """The text `dsv2 kv` prints."""
    bits = cache_bits(cfg, dtype)
    lines = [f"{name}: {cfg.num_hidden_layers} layers, {cfg.num_attention_heads} heads, d_h {cfg.head_dim}"
             + (f", d_c {cfg.kv_lora_rank}, d_R {cfg.qk_rope_head_dim}" if cfg.attention_type == "mla" else
                f", attention {cfg.attention_type}"),
             f"KV cache per token at {dtype} ({bits:.3g} bits/element, scales included); "
             f"per sequence at {context:,} tokens", ""]
    header = f"{'attention':<18}{'formula':<14}{'elem/layer':>11}{'elem/token':>12}{'bytes/layer':>13}" \
             f"{'bytes/token':>14}{'per sequence':>15}"
    lines += [header, "-" * len(header)]
    rows = kv_rows(cfg, bits, gqa_groups)
    for r in rows:
        lines.append(f"{r.name:<18}{r.formula:<14}{r.elements_per_layer:>11,}{r.elements:>12,}"
                     f"{human_bytes(r.bytes_per_layer):>13}{human_bytes(r.bytes):>14}"
                     f"{human_bytes(r.bytes * context):>15}")
    mine = rows[-1] if cfg.attention_type == "mla" else model_kv_row(cfg, bits)
    if cfg.attention_type == "mla":
        mha = rows[0]
        lines += ["", f"MLA caches {human_count(mine.elements)} elements/token vs MHA's "
                  f"{human_count(mha.elements)}: {mha.elements / mine.elements:.1f}x smaller "
                  f"(-{100 * (1 - mine.elements / mha.elements):.1f}%)"]
    if compare is not None:
        ref = model_kv_row(compare, parse_bits(compare_dtype))
        lines += ["", f"vs {compare_name} ({compare.attention_type.upper()}, {compare.num_hidden_layers} layers, "
                  f"{ref.elements:,} elements/token at {compare_dtype}: {ref.bytes:,.0f} B/token)"]
        # nominal 8/6 bits are the paper's figures; fp8 and mixed are the engine's formats with their scales
        for label in dict.fromkeys((dtype, "bf16", "8bit", "fp8", "6bit", "mixed")):
            if label == "mixed" and cfg.attention_type != "mla":
                continue
            r = model_kv_row(cfg, cache_bits(cfg, label))
            lines.append(f"  {name} at {label:<6} {r.bytes:>10,.0f} B/token  "
                         f"{100 * (r.bytes / ref.bytes - 1):+.1f}%")
    return "\n".join(lines)
