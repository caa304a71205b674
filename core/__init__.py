"""CacheKit core: the cache runtime, methods and the diffusers adapter. Pure torch."""
from .diffusers_api import CacheHandle, apply_deepcache, apply_fora, apply_router, remove_cache
from .diffusers_autotune import autotune_diffusers
from .diffusers_step_skip import StepSkipHandle, apply_adaptive_skip
from .methods import DeepCacheConfig, ForaConfig
from .methods.adaptive import AdaptiveConfig
from .telemetry import RunTelemetry

__all__ = ["CacheHandle", "StepSkipHandle", "apply_deepcache", "apply_fora", "apply_adaptive_skip", "apply_router", "remove_cache", "autotune_diffusers",
           "DeepCacheConfig", "ForaConfig", "AdaptiveConfig", "RunTelemetry"]
