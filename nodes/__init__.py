"""ComfyUI side of CacheKit. Imports ComfyUI modules: only loaded inside ComfyUI."""
from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from .autotune_node import CacheKitAutotune
from .method_nodes import CacheKitAdaptiveSkip, CacheKitDeepCache, CacheKitFORA

NODES: list[type[io.ComfyNode]] = [CacheKitDeepCache, CacheKitFORA, CacheKitAdaptiveSkip, CacheKitAutotune]


class CacheKitExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return NODES
