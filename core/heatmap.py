"""Step x block pictures of a run's telemetry (numpy only: used by the panel and the stats node)."""
from __future__ import annotations

import numpy as np

# One palette for every picture of a run, so the ComfyUI stats node and the panel read alike.
COMPUTED = (40, 44, 60)
REUSED = (80, 220, 140)
IDLE = (128, 128, 128)


def block_heatmap(telemetry: dict) -> tuple[list[str], np.ndarray]:
    """[steps, blocks] share of reuse, averaging the units of each block (NaN where none ran)."""
    groups: list[str] = []
    for g in telemetry["groups"]:
        if g not in groups:
            groups.append(g)
    heat = np.full((telemetry["num_steps"], len(groups)), np.nan)
    for s, row in enumerate(telemetry["heatmap"]):
        for j, g in enumerate(groups):
            values = [v for v, name in zip(row, telemetry["groups"]) if name == g and v is not None]
            if values:
                heat[s, j] = float(np.mean(values))
    return groups, heat


def block_means(heat: np.ndarray) -> np.ndarray:
    """Per-block share of reuse over the steps where the block ran (0 for a block that never ran)."""
    if not heat.size:
        return np.zeros(heat.shape[1] if heat.ndim == 2 else 0)
    ran = ~np.isnan(heat)
    totals = np.where(ran, heat, 0.0).sum(axis=0)
    counts = ran.sum(axis=0)
    return np.divide(totals, counts, out=np.zeros_like(totals), where=counts > 0)


def heatmap_colors(heat: np.ndarray) -> np.ndarray:
    """[blocks, steps, 3] float RGB of a [steps, blocks] reuse map: dark = computed, bright = reused,
    grey = idle. Rows are blocks so pictures read like a timeline (columns = steps)."""
    share = np.nan_to_num(heat, nan=0.0)[..., None]
    rgb = np.array(COMPUTED) * (1 - share) + np.array(REUSED) * share
    rgb[np.isnan(heat)] = IDLE
    return rgb.transpose(1, 0, 2)


def heatmap_image(heat: np.ndarray, cell: int = 14) -> np.ndarray:
    """RGB uint8 picture of a [steps, blocks] reuse map, `cell` pixels per step and block."""
    return np.kron(heatmap_colors(heat), np.ones((cell, cell, 1))).astype(np.uint8)
