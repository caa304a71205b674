"""The diffusers host: CacheKit's one-call API for diffusers models, a peer of the ComfyUI host.

It lives outside core/ (which imports no host) because it knows diffusers' model classes
(unit maps of UNet2DConditionModel, DiT, PixArt, SD3, Flux) and how a diffusers pipeline calls
its model (timesteps from the scheduler, forward hooks); core/ only knows units and sessions.
"""
from .api import CacheHandle, apply_deepcache, apply_fora, apply_router, remove_cache
from .autotune import autotune_diffusers
from .dydit import (DyDiTHandle, apply_dydit, dit_from_official, load_dydit, save_dydit,
                    use_official_timestep_embedding)
from .registry import apply, apply_change_cache
from .step_skip import StepSkipHandle, apply_adaptive_skip, apply_learned_forecast

__all__ = ["CacheHandle", "StepSkipHandle", "apply", "apply_change_cache", "apply_deepcache", "apply_fora",
           "apply_adaptive_skip", "apply_learned_forecast", "apply_router", "remove_cache", "autotune_diffusers",
           "DyDiTHandle", "apply_dydit", "dit_from_official", "load_dydit", "save_dydit",
           "use_official_timestep_embedding"]
