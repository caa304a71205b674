"""Step x block pictures of a run's telemetry (numpy only: used by the panel and the stats node)."""
from __future__ import annotations

import numpy as np


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


def heatmap_image(heat: np.ndarray, cell: int = 14) -> np.ndarray:
    """RGB uint8 picture of a [steps, blocks] reuse map: dark = computed, bright = reused, grey = idle."""
    computed, reused, idle = np.array([40, 44, 60]), np.array([80, 220, 140]), np.array([128, 128, 128])
    share = np.nan_to_num(heat, nan=0.0)[..., None]
    rgb = computed * (1 - share) + reused * share
    rgb[np.isnan(heat)] = idle
    rgb = rgb.transpose(1, 0, 2)               # rows = blocks, columns = steps
    return np.kron(rgb, np.ones((cell, cell, 1))).astype(np.uint8)
