"""Units: the modules whose output the runtime may cache.

A unit is described as data (a name, how its output is stored, which group it belongs to for
the telemetry's block view). Host adapters (ComfyUI, diffusers) produce the list of units of a
model; methods decide per step and unit; the session executes the decision.
"""
from __future__ import annotations

from dataclasses import dataclass
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
    kind: str           # "block", "attn", "cross_attn", "mlp", ...
    mode: StoreMode = StoreMode.OUTPUT
    # U-Net units only: (block, layer) in the official DeepCache numbering, counted from the
    # shallow end on both the down and the up path; kind is then "down", "mid" or "up".
    position: tuple[int, int] | None = None
    # Copy outputs into and out of the store. Needed where the host edits a unit's output in
    # place (ComfyUI's ControlNet `h += ctrl`, FreeU's channel scaling on U-Net features):
    # without copies such an edit would leak into the stored value.
    protect: bool = False


@dataclass(frozen=True)
class UnitMap:
    """The ordered units of one model, as produced by a host adapter."""
    family: str
    units: tuple[Unit, ...]

    def index(self, name: str) -> int:
        for i, unit in enumerate(self.units):
            if unit.name == name:
                return i
        raise KeyError(name)

    def __len__(self) -> int:
        return len(self.units)
