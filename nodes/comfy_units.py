"""Unit maps of ComfyUI's model classes, as data.

Each family says which units it has and how CacheKit reaches them:

* "gate":  U-Net blocks (input_blocks, middle_block, output_blocks). ComfyUI runs them with
           forward_timestep_embed, which iterates the block instead of calling it; the block is
           swapped (object patch) for a proxy that yields one gate, handled by a
           forward_timestep_embed_patch.
* "proxy": a submodule called as a module (PixArt / Wan attention, cross-attention, MLP);
           swapped (object patch) for a proxy of itself.
* "dit":   a whole block reached through ComfyUI's patches_replace["dit"] (Flux, Chroma,
           SD3 MMDiT). Their attention is joint across the text and image streams and
           computed inline in the block, so the unit is the block and FORA stores its residual.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core.units import StoreMode, UNetGeometry, Unit, UnitMap, chain_readers


@dataclass(frozen=True)
class Slot:
    how: str                  # "gate" | "proxy" | "dit"
    path: str = ""            # object patch path under the BaseModel ("diffusion_model....")
    dit_key: tuple[str, int] | None = None   # ("double_block", i) / ("single_block", i)


@dataclass(frozen=True)
class ComfyLayout:
    units: UnitMap
    slots: tuple[Slot, ...]


def _class_names(model: torch.nn.Module) -> set[str]:
    return {cls.__name__ for cls in type(model).__mro__}


def is_unet_model(model: torch.nn.Module) -> bool:
    """ComfyUI's UNetModel (SD1.x, SD2.x, SDXL and relatives)."""
    return "UNetModel" in _class_names(model) and hasattr(model, "input_blocks")


def unet_layout(model: torch.nn.Module) -> ComfyLayout:
    """DeepCache units of ComfyUI's UNetModel (SD1.x, SD2.x, SDXL and relatives)."""
    if not is_unet_model(model):
        raise ValueError(
            f"CacheKit DeepCache needs a U-Net model (SD1.x, SD2.x, SDXL); this model is "
            f"{type(model).__name__}. For DiT models (SD3, Flux, PixArt, Wan) use CacheKit FORA.")
    res_blocks = list(model.num_res_blocks)
    levels = len(res_blocks)
    units: list[Unit] = []
    slots: list[Slot] = []
    positions: list[tuple[int, int]] = []
    producers = [-1]            # hs.append order (-1: input_blocks[0], the input convolution)
    skips: dict[int, int] = {}  # output unit -> the input unit whose output it pops from hs

    def add(name, group, kind, position, path):
        units.append(Unit(name, group, kind))
        slots.append(Slot("gate", path))
        positions.append(position)
        return len(units) - 1

    k = 1   # input_blocks[0] is the input convolution: always computed
    for level in range(levels):
        layers = res_blocks[level] + (1 if level < levels - 1 else 0)
        for layer in range(layers):
            producers.append(add(f"input.{k}", f"in {level}.{layer}", "down", (level, layer),
                                 f"diffusion_model.input_blocks.{k}"))
            k += 1
    if k != len(model.input_blocks):
        raise ValueError(f"Unexpected U-Net layout ({len(model.input_blocks)} input blocks, expected {k}); "
                         "CacheKit DeepCache does not support this model.")
    if model.middle_block is not None:
        add("middle", "mid", "mid", (0, 0), "diffusion_model.middle_block")
    m = 0
    for level in reversed(range(levels)):
        for j in range(res_blocks[level] + 1):
            layer = res_blocks[level] - j
            skips[add(f"output.{m}", f"out {level}.{layer}", "up", (level, layer),
                      f"diffusion_model.output_blocks.{m}")] = producers.pop()
            m += 1
    unit_map = UnitMap("unet", tuple(units), readers=chain_readers(len(units), skips),
                       geometry=UNetGeometry(tuple(positions), max(res_blocks) + 1))
    return ComfyLayout(unit_map, tuple(slots))


# DiT families reached with proxies: class name -> (block list, ((child, kind), ...))
PROXY_FAMILIES = {
    "PixArtMS": ("pixart", "blocks", (("attn", "attn"), ("cross_attn", "cross_attn"), ("mlp", "mlp"))),
    "WanModel": ("wan", "blocks", (("self_attn", "attn"), ("cross_attn", "cross_attn"), ("ffn", "mlp"))),
}
# DiT families reached with patches_replace["dit"]: class name -> (family, ((list, key name), ...))
DIT_REPLACE_FAMILIES = {
    "Flux": ("flux", (("double_blocks", "double_block"), ("single_blocks", "single_block"))),
    "Chroma": ("chroma", (("double_blocks", "double_block"), ("single_blocks", "single_block"))),
    "MMDiT": ("mmdit", (("joint_blocks", "double_block"),)),
}
FORA_FAMILIES_TEXT = "SD3 / SD3.5 (MMDiT), Flux, Chroma, PixArt α/Σ, Wan 2.x"


def dit_layout(model: torch.nn.Module) -> ComfyLayout:
    """FORA units of ComfyUI's DiT classes."""
    names = _class_names(model)
    for cls_name, (family, list_attr, children) in PROXY_FAMILIES.items():
        if cls_name in names:
            units, slots = [], []
            for i, block in enumerate(getattr(model, list_attr)):
                for attr, kind in children:
                    if getattr(block, attr, None) is None:
                        continue
                    units.append(Unit(f"{list_attr}.{i}.{attr}", f"block {i}", kind))
                    slots.append(Slot("proxy", f"diffusion_model.{list_attr}.{i}.{attr}"))
            return ComfyLayout(UnitMap(family, tuple(units)), tuple(slots))
    for cls_name, (family, lists) in DIT_REPLACE_FAMILIES.items():
        if cls_name in names:
            units, slots = [], []
            for list_attr, key in lists:
                for i in range(len(getattr(model, list_attr))):
                    short = key.split("_")[0]
                    units.append(Unit(f"{list_attr}.{i}", f"{short} {i}", "block", mode=StoreMode.RESIDUAL))
                    slots.append(Slot("dit", dit_key=(key, i)))
            return ComfyLayout(UnitMap(family, tuple(units)), tuple(slots))
    raise ValueError(
        f"CacheKit FORA does not support {type(model).__name__}. Supported DiT families: "
        f"{FORA_FAMILIES_TEXT}. For SD1.x / SD2.x / SDXL U-Nets use CacheKit DeepCache.")
