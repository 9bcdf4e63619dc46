"""Single-device DeepSeek-V2 modules and pure math. Imports torch and dsv2.config only."""

from dsv2.model.attention import GQA, MLA, DenseCache, KVCache
from dsv2.model.moe import MoE, Routing, route
from dsv2.model.transformer import DecoderLayer, DeepseekV2

__all__ = ["DeepseekV2", "DecoderLayer", "MLA", "GQA", "DenseCache", "KVCache", "MoE", "Routing", "route"]
