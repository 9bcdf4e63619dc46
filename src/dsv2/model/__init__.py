"""Single-device DeepSeek-V2 modules and pure math. Imports torch and dsv2.config only."""

from dsv2.model.attention import GQA, MLA, AttentionBackend, DenseCache, SdpaBackend
from dsv2.model.moe import Experts, MoE, Routing, route
from dsv2.model.transformer import DecoderLayer, DeepseekV2

__all__ = ["DeepseekV2", "DecoderLayer", "MLA", "GQA", "AttentionBackend", "SdpaBackend", "DenseCache",
           "Experts", "MoE", "Routing", "route"]
