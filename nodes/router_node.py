"""Learned Router (CacheKit): apply an L2C / HarmoniCa router file from models/cachekit_routers/.

Its `reuse` input (optional and last, so workflows saved before it stay valid) defaults to
"as trained": the reuse strategy the router records (hold for official and older routers), since
its decisions were learned against it; hold / forecast1 / forecast2 override it."""
from __future__ import annotations

import os

import folder_paths
from comfy_api.latest import io

from ..core.methods.registry import reuse_setting
from ..core.methods.router import RouterPolicy, check_threshold, not_a_dit
from ..core.reuse import STRATEGIES
from ..core.routers import load_any
from .comfy_host import diffusion_model_of, install
from .comfy_units import FORA_FAMILIES_TEXT, ComfyLayout, dit_layout, unet_layout
from .method_nodes import CATEGORY, PATCH_NODE, _node_id

FOLDER = "cachekit_routers"
EXTENSIONS = {".safetensors", ".pt", ".pth"}
AS_TRAINED = "as trained"          # the reuse the router records (Router.reuse)
REUSE_TOOLTIP = (f"{reuse_setting().tooltip} {AS_TRAINED} = the reuse the router was trained for (hold for "
                 "official and older routers).")


def register_folder() -> None:
    """models/cachekit_routers/ (plus any extra_model_paths.yaml entries for it)."""
    if FOLDER not in folder_paths.folder_names_and_paths:
        folder_paths.add_model_folder_path(FOLDER, os.path.join(folder_paths.models_dir, FOLDER))
    paths, extensions = folder_paths.folder_names_and_paths[FOLDER]
    folder_paths.folder_names_and_paths[FOLDER] = (paths, set(extensions) | EXTENSIONS)


def load_router_file(name: str):
    path = folder_paths.get_full_path(FOLDER, name)
    if path is None:
        raise ValueError(f"Router {name!r} is not in models/{FOLDER}/. Put router files there (our .safetensors, "
                         "or an official L2C .pt / .pth) and refresh.")
    return load_any(path)


def _is_unet(diffusion_model) -> bool:
    try:
        unet_layout(diffusion_model)
        return True
    except ValueError:
        return False


def router_layout(model) -> ComfyLayout:
    """The model's DiT sub-layers; any other model is refused in router words (not FORA's)."""
    diffusion_model = diffusion_model_of(model)
    try:
        return dit_layout(diffusion_model)
    except ValueError:
        raise not_a_dit(type(diffusion_model).__name__, FORA_FAMILIES_TEXT, _is_unet(diffusion_model),
                        "DeepCache (CacheKit)") from None


class CacheKitRouter(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        register_folder()
        return io.Schema(
            node_id="CacheKitRouter",
            display_name="Learned Router (CacheKit)",
            category=CATEGORY,
            description=("Learning-to-Cache / HarmoniCa: a trained router decides, per step and sub-layer, whether to "
                         "recompute or reuse the cached output. The router must match the model (depth, sub-layers) "
                         f"and the sampler's step count. Router files go in models/{FOLDER}/."),
            inputs=[
                io.Model.Input("model"),
                io.Combo.Input("router_name", options=folder_paths.get_filename_list(FOLDER),
                               tooltip=f"A router in models/{FOLDER}/ (.safetensors, or an official L2C .pt/.pth)."),
                io.Float.Input("threshold", default=0.0, min=0.0, max=0.99, step=0.01,
                               tooltip="Recompute where sigmoid(logit) > threshold. 0 uses the router's own threshold; "
                                       "higher reuses more."),
                io.Combo.Input("reuse", options=[AS_TRAINED, *STRATEGIES], default=AS_TRAINED, optional=True,
                               tooltip=REUSE_TOOLTIP),
            ],
            outputs=[io.Model.Output(tooltip="The model with the learned router.")],
            **PATCH_NODE,
        )

    @classmethod
    def execute(cls, model, router_name, threshold, reuse=AS_TRAINED) -> io.NodeOutput:
        check_threshold(threshold)                # ComfyUI's min/max check lets NaN through
        router = load_router_file(router_name)
        policy = RouterPolicy(router, threshold if threshold > 0 else None, None if reuse == AS_TRAINED else reuse)
        layout = router_layout(model)
        policy.check_units(layout.units)          # depth / layout now; the step count when sampling starts
        return io.NodeOutput(install(model, layout, policy, 0.0, 1.0, _node_id(cls)))
