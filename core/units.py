"""Units: the parts of a model whose work the runtime may skip, described as data.

A host (ComfyUI, diffusers) describes a model as a UnitMap: its units in execution order, which
units read which other units' outputs (so only values a computed unit will read are stored),
regions (consecutive units a policy can skip with one lookup), and family-specific geometry
that a method needs (DeepCache's U-Net numbering). Methods decide per step and unit; the
session executes the decision. Units are identified by their index in the map.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum


class StoreMode(str, Enum):
    # The unit's output is stored and returned as is on reuse (U-Net blocks, ungated DiT
    # attention / MLP outputs).
    OUTPUT = "output"
    # The unit's output minus its input is stored; on reuse the current input plus the stored
    # residual is returned (whole DiT blocks whose gates are computed inside the block).
    RESIDUAL = "residual"


@dataclass(frozen=True)
class Unit:
    name: str           # stable id inside one model, e.g. "input.4" or "blocks.3.attn"
    group: str          # display group (one row per block in the heatmap), e.g. "block 3"
    kind: str           # "block", "attn", "cross_attn", "mlp", "down", "mid", "up", "call", ...
    mode: StoreMode = StoreMode.OUTPUT


@dataclass(frozen=True)
class Region:
    """Consecutive units run by one module (a diffusers down/up block): when the plan reuses
    every member, the host skips the whole module with one lookup."""
    name: str
    members: tuple[int, ...]


@dataclass(frozen=True)
class UNetGeometry:
    """DeepCache's view of a U-Net: per unit, its (block, layer) in the official numbering,
    counted from the shallow end on both paths; the kind of each unit is "down", "mid" or "up"."""
    positions: tuple[tuple[int, int], ...]
    layers_per_block: int


@dataclass(frozen=True)
class UnitMap:
    """The ordered units of one model, as produced by a host adapter."""
    family: str
    units: tuple[Unit, ...]
    # readers[u]: the units whose computation reads unit u's output. None: unknown, so every
    # reused unit's output is kept (DiT sub-layers are all read by their always-computed block).
    readers: tuple[tuple[int, ...], ...] | None = None
    regions: tuple[Region, ...] = ()
    geometry: UNetGeometry | None = field(default=None, compare=False)

    def index(self, name: str) -> int:
        for i, unit in enumerate(self.units):
            if unit.name == name:
                return i
        raise KeyError(name)

    def __len__(self) -> int:
        return len(self.units)


def chain_readers(num_units: int, skips: dict[int, int]) -> tuple[tuple[int, ...], ...]:
    """Readers of a sequential model: each unit reads the previous one, plus skip connections
    given as {consumer: producer} (a U-Net's up units read a down unit's output)."""
    readers: list[list[int]] = [[u + 1] if u + 1 < num_units else [] for u in range(num_units)]
    for consumer, producer in skips.items():
        if producer >= 0:
            readers[producer].append(consumer)
    return tuple(tuple(r) for r in readers)


def call_unit_map(family: str) -> UnitMap:
    """The unit map of a call-level method: one unit, the whole model call."""
    return UnitMap(family, (Unit("noise prediction", "model", "call"),))
