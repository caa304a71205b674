"""Unit maps of diffusers models, as data: which submodules are units, in which order.

U-Nets (UNet2DConditionModel and its relatives with down_blocks / mid_block / up_blocks):
every resnet, attention, down- and upsampler is a unit, numbered (block, layer) from the
shallow end as the official DeepCacheSDHelper numbers them.

DiTs: per block, the submodules whose outputs are the ungated attention and MLP results that
FORA reuses. Flux's single blocks fuse attention and MLP into one output projection; its
input is fully determined by the reused attention and MLP outputs, so it is a unit as well.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .units import StoreMode, Unit, UnitMap

# class name -> ((block list attribute, ((child attribute, unit kind), ...)), ...)
DIT_LAYOUTS: dict[str, tuple[tuple[str, tuple[tuple[str, str], ...]], ...]] = {
    "DiTTransformer2DModel": (("transformer_blocks", (("attn1", "attn"), ("attn2", "cross_attn"), ("ff", "mlp"))),),
    "PixArtTransformer2DModel": (("transformer_blocks", (("attn1", "attn"), ("attn2", "cross_attn"), ("ff", "mlp"))),),
    "SD3Transformer2DModel": (("transformer_blocks", (("attn", "attn"), ("attn2", "attn2"), ("ff", "mlp"),
                                                      ("ff_context", "mlp_context"))),),
    "FluxTransformer2DModel": (
        ("transformer_blocks", (("attn", "attn"), ("ff", "mlp"), ("ff_context", "mlp_context"))),
        ("single_transformer_blocks", (("attn", "attn"), ("proj_mlp", "mlp"), ("proj_out", "out"))),
    ),
}


@dataclass(frozen=True)
class UnitSlot:
    """Where a unit module lives: parent module and attribute (or list index)."""
    parent: torch.nn.Module
    attr: str

    def get(self) -> torch.nn.Module:
        return self.parent[int(self.attr)] if isinstance(self.parent, torch.nn.ModuleList) else getattr(self.parent, self.attr)

    def set(self, module: torch.nn.Module) -> None:
        if isinstance(self.parent, torch.nn.ModuleList):
            self.parent[int(self.attr)] = module
        else:
            setattr(self.parent, self.attr, module)


def is_unet(model: torch.nn.Module) -> bool:
    return all(hasattr(model, a) for a in ("down_blocks", "mid_block", "up_blocks"))


def unet_units(model: torch.nn.Module) -> tuple[UnitMap, list[UnitSlot], int]:
    """Units of a diffusers U-Net, their slots, and its layers per block (resnets + sampler)."""
    units: list[Unit] = []
    slots: list[UnitSlot] = []

    def add(parent, attr, name, kind, position):
        units.append(Unit(name=name, group=name.rsplit(".", 2)[0] if kind != "mid" else "mid", kind=kind, position=position,
                          protect=True))
        slots.append(UnitSlot(parent, attr))

    for b, block in enumerate(model.down_blocks):
        resnets = block.resnets
        attentions = getattr(block, "attentions", None) or []
        for l in range(len(resnets)):
            add(resnets, str(l), f"down.{b}.resnets.{l}", "down", (b, l))
            if l < len(attentions):
                add(attentions, str(l), f"down.{b}.attentions.{l}", "down", (b, l))
        for d in range(len(block.downsamplers or [])):
            add(block.downsamplers, str(d), f"down.{b}.downsamplers.{d}", "down", (b, len(resnets)))
    add(model, "mid_block", "mid", "mid", (0, 0))
    num_up = len(model.up_blocks)
    for i, block in enumerate(model.up_blocks):
        b = num_up - 1 - i
        resnets = block.resnets
        attentions = getattr(block, "attentions", None) or []
        for j in range(len(resnets)):
            layer = len(resnets) - 1 - j
            add(resnets, str(j), f"up.{b}.resnets.{layer}", "up", (b, layer))
            if j < len(attentions):
                add(attentions, str(j), f"up.{b}.attentions.{layer}", "up", (b, layer))
        for u in range(len(block.upsamplers or [])):
            add(block.upsamplers, str(u), f"up.{b}.upsamplers.{u}", "up", (b, 0))
    layers_per_block = max(len(block.resnets) + (1 if block.downsamplers else 0) for block in model.down_blocks)
    return UnitMap("diffusers-unet", tuple(units)), slots, layers_per_block


def dit_units(model: torch.nn.Module) -> tuple[UnitMap, list[UnitSlot]]:
    layout = DIT_LAYOUTS.get(type(model).__name__)
    if layout is None:
        raise ValueError(
            f"FORA does not know the diffusers model {type(model).__name__}. Supported: "
            f"{', '.join(sorted(DIT_LAYOUTS))}.")
    units: list[Unit] = []
    slots: list[UnitSlot] = []
    for list_attr, children in layout:
        for i, block in enumerate(getattr(model, list_attr)):
            group = f"{list_attr}.{i}"
            for attr, kind in children:
                if getattr(block, attr, None) is None:
                    continue
                units.append(Unit(name=f"{group}.{attr}", group=group, kind=kind, mode=StoreMode.OUTPUT))
                slots.append(UnitSlot(block, attr))
    return UnitMap(f"diffusers-{type(model).__name__}", tuple(units)), slots
