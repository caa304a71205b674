"""One model call's widths: per block, which heads (or MLP groups) run, from the routers' gates.

The gates depend only on the timestep, so a batch whose rows share a timestep has one mask per
block and runs sliced. Rows with different timesteps (rare in sampling: pipelines use one
timestep per step) may disagree in a block; that block then runs masked, as the official code
does (every channel computed, each row's outputs multiplied by its own mask): slicing per row
would split the batch into per-row matmuls and multiply the slices held. Blocks whose rows agree
are still sliced.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Width:
    """One block's heads (or MLP groups) in one call.

    kept: the kept groups when every row has the same mask (None: all on, or rows differ);
    row_mask [B, groups] (0/1) when rows differ, which runs masked; counts: active groups per row."""
    kept: tuple[int, ...] | None
    row_mask: torch.Tensor | None
    counts: list[int]

    @property
    def full(self) -> bool:
        return self.kept is None and self.row_mask is None

    @staticmethod
    def all_on(groups: int, samples: int) -> "Width":
        return Width(None, None, [groups] * samples)


def widths_from_gates(gates: torch.Tensor) -> list[Width]:
    """[depth, B, n] bool gates -> a Width per block. One device sync for all blocks."""
    host = gates.cpu()
    n = host.shape[-1]
    widths = []
    for block, gate_rows in enumerate(host):
        counts = gate_rows.sum(dim=1).tolist()
        if bool((gate_rows == gate_rows[0]).all()):
            kept = tuple(int(i) for i in gate_rows[0].nonzero().flatten())
            widths.append(Width(None if len(kept) == n else kept, None, counts))
        else:
            widths.append(Width(None, gates[block].float(), counts))
    return widths
