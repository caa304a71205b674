"""CacheKit core: the cache runtime (sessions, units, stores, reuse strategies, the agreement
point), methods as policies, telemetry, routers and autotune. Pure torch: it imports no host
(no ComfyUI, no diffusers pipelines, no gradio). Hosts: nodes/ (ComfyUI), diffusers_host/."""
from .methods import DeepCacheConfig, ForaConfig
from .methods.adaptive import AdaptiveConfig
from .telemetry import RunTelemetry

__all__ = ["DeepCacheConfig", "ForaConfig", "AdaptiveConfig", "RunTelemetry"]
