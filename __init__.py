"""CacheKit: faster diffusion sampling by reusing what barely changes between steps.

ComfyUI loads this folder as a custom node pack (V3 entry point below). The same engine is
usable on diffusers models: `apply_deepcache`, `apply_fora`, `apply_adaptive_skip`,
`apply_learned_forecast`, `apply_change_cache`, `apply_router`, `apply` (any method by key), `autotune_diffusers`, `remove_cache`,
`apply_dydit` (DyDiT: dynamic heads / MLP groups / tokens).
Only relative imports here: ComfyUI has top-level modules named `nodes`, and this pack must
never shadow them.
"""
WEB_DIRECTORY = "./web"
__version__ = "0.1.0"

# pytest imports a checkout's root __init__.py as a plain module when the folder name is not
# an identifier (e.g. "ComfyUI-CacheKit"); relative imports only work inside a package.
if __package__:
    from .diffusers_host import (CacheHandle, StepSkipHandle, apply, apply_adaptive_skip, apply_change_cache,
                                 apply_deepcache, apply_fora, apply_learned_forecast, apply_router,
                                 autotune_diffusers, remove_cache)
    from .diffusers_host import (DyDiTHandle, apply_dydit, dit_from_official, load_dydit, save_dydit,
                                 use_official_timestep_embedding)


async def comfy_entrypoint():
    from .nodes import CacheKitExtension   # imports ComfyUI modules: only inside ComfyUI
    return CacheKitExtension()


__all__ = ["CacheHandle", "StepSkipHandle", "apply", "apply_change_cache", "apply_deepcache", "apply_fora",
           "apply_adaptive_skip", "apply_learned_forecast", "apply_router", "remove_cache", "autotune_diffusers",
           "comfy_entrypoint",
           "WEB_DIRECTORY", "DyDiTHandle", "apply_dydit", "dit_from_official", "load_dydit", "save_dydit",
           "use_official_timestep_embedding"]
