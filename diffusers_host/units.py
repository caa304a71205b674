"""Unit maps of diffusers models, as data: which submodules are units, in which order.

U-Nets (UNet2DConditionModel and its relatives with down_blocks / mid_block / up_blocks):
every resnet, attention, down- and upsampler is a unit, numbered (block, layer) from the
shallow end as the official DeepCacheSDHelper numbers them (the U-Net's geometry). Each down
and up block is a region (skipped with one lookup when all its units are reused), and the map
says who reads what: the next unit in execution order, and for each up resnet the skip
connection it pops, found by replaying the U-Net's push/pop order.

DiTs: per block, the submodules whose outputs are the ungated attention and MLP results that
FORA reuses. Flux's single blocks fuse attention and MLP into one output projection; its
input is fully determined by the reused attention and MLP outputs, so it is a unit as well.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core.units import Region, StoreMode, UNetGeometry, Unit, UnitMap, chain_readers

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


def unet_units(model: torch.nn.Module) -> tuple[UnitMap, list[UnitSlot], list[UnitSlot]]:
    """Units of a diffusers U-Net and their slots, and the slots of its regions (down / up blocks)."""
    units: list[Unit] = []
    slots: list[UnitSlot] = []
    positions: list[tuple[int, int]] = []
    regions: list[Region] = []
    region_slots: list[UnitSlot] = []
    producers = [-1]            # skip connections pushed, in order (-1: conv_in, not a unit)
    skips: dict[int, int] = {}  # up resnet -> the unit whose output it pops

    def add(parent, attr, name, kind, position):
        units.append(Unit(name=name, group=name.rsplit(".", 2)[0] if kind != "mid" else "mid", kind=kind))
        slots.append(UnitSlot(parent, attr))
        positions.append(position)
        return len(units) - 1

    for b, block in enumerate(model.down_blocks):
        first = len(units)
        resnets = block.resnets
        attentions = getattr(block, "attentions", None) or []
        for l in range(len(resnets)):
            last = add(resnets, str(l), f"down.{b}.resnets.{l}", "down", (b, l))
            if l < len(attentions):
                last = add(attentions, str(l), f"down.{b}.attentions.{l}", "down", (b, l))
            producers.append(last)
        for d in range(len(block.downsamplers or [])):
            producers.append(add(block.downsamplers, str(d), f"down.{b}.downsamplers.{d}", "down", (b, len(resnets))))
        regions.append(Region(f"down.{b}", tuple(range(first, len(units)))))
        region_slots.append(UnitSlot(model.down_blocks, str(b)))
    add(model, "mid_block", "mid", "mid", (0, 0))
    num_up = len(model.up_blocks)
    for i, block in enumerate(model.up_blocks):
        first = len(units)
        b = num_up - 1 - i
        resnets = block.resnets
        attentions = getattr(block, "attentions", None) or []
        for j in range(len(resnets)):
            layer = len(resnets) - 1 - j
            skips[add(resnets, str(j), f"up.{b}.resnets.{layer}", "up", (b, layer))] = producers.pop()
            if j < len(attentions):
                add(attentions, str(j), f"up.{b}.attentions.{layer}", "up", (b, layer))
        for u in range(len(block.upsamplers or [])):
            add(block.upsamplers, str(u), f"up.{b}.upsamplers.{u}", "up", (b, 0))
        regions.append(Region(f"up.{b}", tuple(range(first, len(units)))))
        region_slots.append(UnitSlot(model.up_blocks, str(i)))
    layers_per_block = max(len(block.resnets) + (1 if block.downsamplers else 0) for block in model.down_blocks)
    unit_map = UnitMap("diffusers-unet", tuple(units), readers=chain_readers(len(units), skips),
                       regions=tuple(regions), geometry=UNetGeometry(tuple(positions), layers_per_block))
    return unit_map, slots, region_slots


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
