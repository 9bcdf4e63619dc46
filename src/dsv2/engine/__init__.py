"""Inference engine: paged (optionally quantised) latent cache, absorbed decode, continuous batching."""

from dsv2.engine.cache import CacheError, PagedCache, parse_bytes
from dsv2.engine.config import EngineConfig, EngineConfigError
from dsv2.engine.engine import Engine, EngineStats, GenerationError, TokenEvent
from dsv2.engine.quant import CACHE_DTYPES, KVFormat, make_format
from dsv2.engine.sampling import SamplingError, SamplingParams
from dsv2.engine.scheduler import Request, RequestError

__all__ = ["Engine", "EngineConfig", "EngineConfigError", "SamplingParams", "SamplingError", "PagedCache",
           "CacheError", "RequestError", "GenerationError", "TokenEvent", "EngineStats", "KVFormat",
           "make_format", "CACHE_DTYPES", "parse_bytes", "Request"]
