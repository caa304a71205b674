"""CacheKit core: the cache runtime, methods and the diffusers adapter. Pure torch."""
from .diffusers_api import CacheHandle, apply_deepcache, apply_fora, remove_cache
from .methods import DeepCacheConfig, ForaConfig
from .telemetry import RunTelemetry

__all__ = ["CacheHandle", "apply_deepcache", "apply_fora", "remove_cache", "DeepCacheConfig", "ForaConfig", "RunTelemetry"]
