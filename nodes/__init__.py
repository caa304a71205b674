"""ComfyUI side of CacheKit. Imports ComfyUI modules: only loaded inside ComfyUI."""
from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from . import routes
from .autotune_node import CacheKitAutotune
from .dyflux_node import CacheKitDyFLUX
from .method_nodes import METHOD_NODES
from .router_node import CacheKitRouter
from .stats_node import CacheKitStats
from .train_router_node import CacheKitTrainRouter

# Method nodes come from the method registry (core/methods/registry.py), in its order.
NODES: list[type[io.ComfyNode]] = [*METHOD_NODES.values(), CacheKitRouter, CacheKitTrainRouter, CacheKitAutotune,
                                   CacheKitStats, CacheKitDyFLUX]


class CacheKitExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        routes.register()     # ComfyUI 0.3.64 never calls on_load; this runs once at load time
        return NODES
