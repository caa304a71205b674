"""The CacheKit method nodes: take a MODEL, return a patched clone.

Each node is generated from its method's declaration in the registry (core/methods/registry.py):
node id, title, description, widgets (name, type, default, range, tooltip, in declaration
order) and output. Saved workflows store widget values by position, so a declaration's settings
keep their order. `apply_method` patches a model with any registered method by key.
"""
from __future__ import annotations

from comfy_api.latest import io

from ..core.methods import registry
from ..core.methods.registry import MethodSpec, Setting
from .comfy_host import diffusion_model_of, install
from .comfy_step_skip import install_step_skip
from .comfy_units import FORA_BLOCK_FAMILIES_TEXT, FORA_FAMILIES_TEXT, ComfyLayout, dit_layout, is_unet_model, unet_layout

CATEGORY = "CacheKit"
# Settings chosen by the Autotune node: {"method": ..., "settings": {...}}; wired into a method
# node they replace that node's widget values.
Settings = io.Custom("CACHEKIT_SETTINGS")
# Facts of this host that node descriptions name in braces.
HOST_FACTS = {"dit_families": FORA_FAMILIES_TEXT, "dit_block_families": FORA_BLOCK_FAMILIES_TEXT}


def method_layout(spec: MethodSpec, model) -> ComfyLayout:
    """The units a unit-level method caches on this model (a clear error for the wrong kind)."""
    diffusion_model = diffusion_model_of(model)
    if spec.fits == "unet":
        return unet_layout(diffusion_model)
    if spec.fits == "dit":
        return dit_layout(diffusion_model)
    if is_unet_model(diffusion_model):      # fits "any": whichever the model is
        return unet_layout(diffusion_model)
    try:
        return dit_layout(diffusion_model)
    except ValueError:
        raise ValueError(f"{spec.name} does not support {type(diffusion_model).__name__}. It works on SD1.x / SD2.x / "
                         f"SDXL U-Nets and on these DiT families: {FORA_FAMILIES_TEXT}.") from None


def apply_method(method: str, model, settings: dict, node_id: str | None = None):
    """Patch a clone of `model` with a registered method; `settings` are the method node's inputs."""
    spec = registry.get(method)
    config = spec.make_config(settings)
    policy = spec.make_policy(config)
    if spec.level == "call":
        return install_step_skip(model, node_id=node_id, policy=policy)
    layout = method_layout(spec, model)
    spec.check_units(policy, layout.units)
    start, end = spec.window(config)
    return install(model, layout, policy, start, end, node_id)


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


def widget(setting: Setting):
    """A registry setting as a ComfyUI input (None fields are left out of the schema, as unset)."""
    tooltip = setting.tooltip or None
    optional = setting.optional      # added after release: old API prompts without it still validate
    if setting.type == "int":
        return io.Int.Input(setting.name, default=setting.default, min=setting.min, max=setting.max,
                            step=setting.step, tooltip=tooltip, optional=optional)
    if setting.type == "float":
        return io.Float.Input(setting.name, default=setting.default, min=setting.min, max=setting.max,
                              step=setting.step, tooltip=tooltip, optional=optional)
    if setting.type == "combo":
        return io.Combo.Input(setting.name, options=list(setting.options), default=setting.default, tooltip=tooltip,
                              optional=optional)
    return io.Boolean.Input(setting.name, default=setting.default, tooltip=tooltip, optional=optional)


class _Facts(dict):
    def __missing__(self, key):
        return "{" + key + "}"


def method_node(spec: MethodSpec) -> type[io.ComfyNode]:
    """The node class of a registered method with a generated node."""
    node = spec.node
    key, names = spec.key, [s.name for s in spec.settings]

    class MethodNode(io.ComfyNode):
        @classmethod
        def define_schema(cls) -> io.Schema:
            return io.Schema(
                node_id=node.node_id,
                display_name=node.display_name,
                category=CATEGORY,
                description=node.description.format_map(_Facts(HOST_FACTS)),
                inputs=[io.Model.Input("model"), *(widget(s) for s in spec.settings), _settings_input()],
                outputs=[io.Model.Output(tooltip=node.output_tooltip)],
                **PATCH_NODE,
            )

        @classmethod
        def execute(cls, model, *values, settings=None, **widgets) -> io.NodeOutput:
            # Widgets by name (ComfyUI) or in declaration order (direct calls).
            widgets = {**dict(zip(names, values)), **widgets}
            widgets = {name: spec.setting(name).coerce(value) if spec.setting(name) else value
                       for name, value in widgets.items()}
            return io.NodeOutput(apply_method(key, model, _with_settings(key, widgets, settings), _node_id(cls)))

    MethodNode.__name__ = MethodNode.__qualname__ = node.node_id
    MethodNode.__doc__ = f"{spec.name}: {spec.summary}"
    return MethodNode


# key -> node class, for every registered method whose node is generated.
METHOD_NODES: dict[str, type[io.ComfyNode]] = {spec.key: method_node(spec) for spec in registry.methods()
                                               if spec.node is not None and spec.node.generated}
CacheKitDeepCache = METHOD_NODES["deepcache"]
CacheKitFORA = METHOD_NODES["fora"]
CacheKitAdaptiveSkip = METHOD_NODES["adaptive"]
