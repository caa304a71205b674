"""The CacheKit method nodes: take a MODEL, return a patched clone."""
from __future__ import annotations

from comfy_api.latest import io

from ..core.methods import DeepCacheConfig, DeepCachePolicy, ForaConfig, ForaPolicy
from ..core.methods.adaptive import AdaptiveConfig
from ..core.methods.deepcache import SCHEDULES
from .comfy_host import diffusion_model_of, install
from .comfy_step_skip import install_step_skip
from .comfy_units import FORA_FAMILIES_TEXT, dit_layout, unet_layout

CATEGORY = "CacheKit"
# Settings chosen by the Autotune node: {"method": ..., "settings": {...}}; wired into a method
# node they replace that node's widget values.
Settings = io.Custom("CACHEKIT_SETTINGS")


def apply_method(method: str, model, settings: dict, node_id: str | None = None):
    """Patch a clone of `model` with a method; `settings` are the method node's inputs."""
    if method == "deepcache":
        config = DeepCacheConfig(**settings)
        layout = unet_layout(diffusion_model_of(model))
        policy = DeepCachePolicy(config, layout.layers_per_block)
        policy.validate(layout.units)
        return install(model, layout, policy, config.start_percent, config.end_percent, node_id)
    if method == "fora":
        config = ForaConfig(**settings)
        layout = dit_layout(diffusion_model_of(model))
        return install(model, layout, ForaPolicy(config), config.start_percent, config.end_percent, node_id)
    if method == "adaptive":
        return install_step_skip(model, AdaptiveConfig(**settings), node_id)
    raise ValueError(f"unknown CacheKit method {method!r}")


def _with_settings(method: str, widgets: dict, settings: dict | None) -> dict:
    if settings is None:
        return widgets
    if settings.get("method") != method:
        raise ValueError(f"These settings were tuned for {settings.get('method')!r}, not {method!r}: connect them to "
                         f"the matching CacheKit node, or re-run Autotune with method {method!r}.")
    return {**widgets, **settings["settings"]}


def _settings_input():
    return Settings.Input("settings", optional=True,
                          tooltip="From Autotune (CacheKit): when connected, these settings replace the widgets above.")


# Every node that patches a MODEL: its unique_id credits the runs, and not_idempotent puts the
# node id into ComfyUI's cache key. Without it (ComfyUI 0.3.64 leaves a V3 node's hidden
# unique_id out of the key) an identical node under another id, in this prompt or a later one,
# is served the first node's patched MODEL, and its runs are credited to that node.
PATCH_NODE = {"hidden": [io.Hidden.unique_id], "not_idempotent": True}


def _node_id(cls) -> str | None:
    # None when the node is executed directly from Python rather than by ComfyUI's executor.
    return getattr(cls.hidden, "unique_id", None) if getattr(cls, "hidden", None) else None


def _percent_inputs(start_default: float = 0.0, end_default: float = 1.0) -> list:
    return [
        io.Float.Input("start_percent", default=start_default, min=0.0, max=1.0, step=0.01,
                       tooltip="Caching starts at this fraction of the sampling (by sigma); before it every step is computed."),
        io.Float.Input("end_percent", default=end_default, min=0.0, max=1.0, step=0.01,
                       tooltip="Caching ends at this fraction of the sampling; after it every step is computed."),
    ]


class CacheKitDeepCache(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CacheKitDeepCache",
            display_name="DeepCache (CacheKit)",
            category=CATEGORY,
            description=("DeepCache for U-Nets (SD1.x, SD2.x, SDXL): on cache steps only the shallow branch of the "
                         "U-Net runs; the deep features come from the last full step."),
            inputs=[
                io.Model.Input("model"),
                io.Int.Input("cache_interval", default=3, min=1, max=100,
                             tooltip="A full U-Net step every N steps (uniform schedule). 1 disables caching."),
                io.Int.Input("cache_branch", default=0, min=0, max=100,
                             tooltip="Which skip branch stays live: 0 = shallowest (fastest). Same meaning as the official DeepCacheSDHelper."),
                io.Combo.Input("schedule", options=list(SCHEDULES), default="uniform",
                               tooltip="uniform: full step every cache_interval steps. non-uniform: the official quadratic schedule, "
                                       "same number of full steps, packed around center."),
                io.Int.Input("center", default=15, min=0, max=1000,
                             tooltip="non-uniform only: the step around which full steps gather."),
                io.Float.Input("power", default=1.4, min=1.01, max=3.0, step=0.01,
                               tooltip="non-uniform only: how strongly full steps gather around center."),
                *_percent_inputs(),
                _settings_input(),
            ],
            outputs=[io.Model.Output(tooltip="The model with DeepCache.")],
            **PATCH_NODE,
        )

    @classmethod
    def execute(cls, model, cache_interval, cache_branch, schedule, center, power, start_percent, end_percent,
                settings=None) -> io.NodeOutput:
        widgets = dict(cache_interval=cache_interval, cache_branch=cache_branch, schedule=schedule, center=center,
                       power=power, start_percent=start_percent, end_percent=end_percent)
        return io.NodeOutput(apply_method("deepcache", model, _with_settings("deepcache", widgets, settings),
                                          _node_id(cls)))


class CacheKitFORA(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CacheKitFORA",
            display_name="FORA (CacheKit)",
            category=CATEGORY,
            description=("FORA for DiTs: every N steps compute everything; in between reuse each block's attention and "
                         f"MLP outputs. Covers {FORA_FAMILIES_TEXT}. SD3, Flux and Chroma reuse whole-block residuals "
                         "(their attention is joint and inline)."),
            inputs=[
                io.Model.Input("model"),
                io.Int.Input("interval", default=3, min=1, max=100,
                             tooltip="Refresh every N steps (the first and last steps are always computed). 1 disables caching."),
                *_percent_inputs(),
                _settings_input(),
            ],
            outputs=[io.Model.Output(tooltip="The model with FORA.")],
            **PATCH_NODE,
        )

    @classmethod
    def execute(cls, model, interval, start_percent, end_percent, settings=None) -> io.NodeOutput:
        widgets = dict(interval=interval, start_percent=start_percent, end_percent=end_percent)
        return io.NodeOutput(apply_method("fora", model, _with_settings("fora", widgets, settings), _node_id(cls)))


class CacheKitAdaptiveSkip(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CacheKitAdaptiveSkip",
            display_name="Adaptive Step Skip (CacheKit)",
            category=CATEGORY,
            description=("AdaptiveDiffusion for any model: a step reuses the previous noise prediction when the latents "
                         "change smoothly (third-order difference small against the first-order one). A skipped step "
                         "runs nothing: no CFG branch, no ControlNet. The first 4 steps always run. Samplers with "
                         "several model calls per step (heun, dpm_2) decide once per step, on the first call."),
            inputs=[
                io.Model.Input("model"),
                io.Float.Input("delta", default=0.01, min=0.0, max=1.0, step=0.001,
                               tooltip="Skip threshold. 0 never skips; larger skips more. 0.01 is the official default."),
                io.Int.Input("max_skip_steps", default=4, min=1, max=100,
                             tooltip="At most this many skipped steps in a row. (The official code lets the first run of "
                                     "skips after the warm-up reach 5 whatever this is; CacheKit keeps the cap.)"),
                _settings_input(),
            ],
            outputs=[io.Model.Output(tooltip="The model with adaptive step skipping.")],
            **PATCH_NODE,
        )

    @classmethod
    def execute(cls, model, delta, max_skip_steps, settings=None) -> io.NodeOutput:
        widgets = dict(delta=float(delta), max_skip_steps=int(max_skip_steps))
        return io.NodeOutput(apply_method("adaptive", model, _with_settings("adaptive", widgets, settings),
                                          _node_id(cls)))
