"""DeepCache (Ma et al., 2023; horseee/DeepCache): reuse the deep part of a U-Net.

Reference semantics, as the official code decides them:

* full steps: `uniform` refreshes when (step - start) % interval == 0 (DeepCacheSDHelper);
  `non-uniform` refreshes at `sample_from_quad_center(T, ceil(T / interval), center, power)`
  (the official SD pipeline), which packs refreshes around `center`;
* on the other steps a U-Net layer at (block, layer) - counted from the shallow end on both
  paths, the official numbering - reuses its output when it lies below the cache branch:
  `cache_block_id, cache_layer_id = divmod(branch, layers_per_block)`; down layers with
  block > cache_block or (block == cache_block and layer >= cache_layer), the middle block,
  and up layers with block > cache_block or (block == cache_block and layer > cache_layer).
  The official code hard-codes 3 layers per block (SD's 2 res blocks + a downsampler); here it
  is the model's `num_res_blocks + 1`, which is 3 for SD1.x, SD2.x and SDXL.

Steps outside the [start_percent, end_percent) window compute everything; the window's first
step is the schedule's step 0. Samplers with several model calls per step (heun, dpm_2) follow
the step's decision on every call: on full steps each call computes and refreshes the cache,
on cache steps each call reuses it.

`reuse` (not in the paper): "hold" reuses the last full step's features as published;
"forecast1" / "forecast2" extrapolate them from the last refreshes (TaylorSeer), keeping 2 or 3
tensors per cached unit.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..reuse import STRATEGIES, strategy_from_name
from ..units import UnitMap
from .base import Plan, check_int, check_percent_range, full_plan

SCHEDULES = ("uniform", "non-uniform")


@dataclass(frozen=True)
class DeepCacheConfig:
    cache_interval: int = 3
    cache_branch: int = 0
    schedule: str = "uniform"
    center: int = 15
    power: float = 1.4
    start_percent: float = 0.0
    end_percent: float = 1.0
    reuse: str = "hold"

    def __post_init__(self) -> None:
        check_int("cache_interval", self.cache_interval, 1, "Use 1 to disable caching, 3 is the default.")
        check_int("cache_branch", self.cache_branch, 0, "0 keeps only the shallowest branch live.")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}.")
        check_int("center", self.center, 0, "It is the step around which non-uniform refreshes gather.")
        if not isinstance(self.power, (int, float)) or self.power <= 1.0:
            raise ValueError(f"power must be a number > 1.0, got {self.power!r} (the official default range is 1.2-1.6).")
        check_percent_range(self.start_percent, self.end_percent)
        check_reuse(self.reuse)


def check_reuse(reuse) -> None:
    """How reused features are produced: 'hold' (the published methods) or 'forecast1'/'forecast2'
    (TaylorSeer extrapolation from the last refreshes; core/reuse.py)."""
    if reuse not in STRATEGIES:
        raise ValueError(f"reuse must be one of {STRATEGIES}, got {reuse!r}: hold reuses the last computed value, "
                         "forecast1 / forecast2 extrapolate it from the last refreshes (Taylor order 1 or 2).")


def quad_center_steps(total: int, n_samples: int, center: int, power: float) -> list[int]:
    """Full steps of the official non-uniform schedule (`sample_from_quad_center`).

    The power is lowered in 0.02 steps until exactly n_samples distinct steps come out, as in
    the official code. For center > 0 the lower end is a complex root whose real part is
    taken, again as the official numpy arithmetic does.
    """
    pw = float(power)
    while pw > 1:
        low = (-center) ** (1 / pw)          # complex for center > 0, as in the original
        high = (total - center) ** (1 / pw)
        values = np.linspace(low, high, n_samples + 1) ** pw
        ints = np.unique(np.real(values).astype(np.int32))
        steps = [0] + [int(v) + center for v in ints[1:-1]]
        if len(steps) == n_samples:
            return steps
        pw -= 0.02
    raise ValueError(
        f"The non-uniform DeepCache schedule cannot place {n_samples} full steps in {total} steps "
        f"around center {center}. Lower center (below the number of steps), change power, "
        "or use the uniform schedule.")


def full_steps(config: DeepCacheConfig, window_len: int) -> set[int]:
    """Window-relative steps that compute the whole U-Net."""
    interval = config.cache_interval
    if interval == 1:
        return set(range(window_len))
    if config.schedule == "uniform":
        return set(range(0, window_len, interval))
    return set(quad_center_steps(window_len, math.ceil(window_len / interval), config.center, config.power))


def branch_position(branch: int, layers_per_block: int) -> tuple[int, int]:
    return divmod(branch, layers_per_block)


def is_deep(kind: str, position: tuple[int, int], cache_block: int, cache_layer: int) -> bool:
    """True where the official helper returns the cached output on a cache step."""
    if kind == "mid":
        return True
    block, layer = position
    if block != cache_block:
        return block > cache_block
    return layer >= cache_layer if kind == "down" else layer > cache_layer


def deep_row(units: UnitMap, branch: int) -> list[bool]:
    """[unit]: True where a cache step at this branch reuses the unit (the deep part of the U-Net)."""
    geometry = geometry_of(units)
    cache_block, cache_layer = branch_position(branch, geometry.layers_per_block)
    return [is_deep(u.kind, p, cache_block, cache_layer) for u, p in zip(units.units, geometry.positions)]


def geometry_of(units: UnitMap):
    if units.geometry is None:
        raise ValueError(f"DeepCache needs a U-Net; this model ({units.family}) has no U-Net geometry. "
                         "For transformers use FORA.")
    return units.geometry


def max_branch(units: UnitMap) -> int:
    """The deepest branch that still leaves something to reuse besides the middle block."""
    geometry = geometry_of(units)
    downs = [p for u, p in zip(units.units, geometry.positions) if u.kind == "down"]
    return max(b * geometry.layers_per_block + l for b, l in downs)


def check_branch(units: UnitMap, branch: int) -> None:
    top = max_branch(units)
    if branch > top:
        raise ValueError(f"cache_branch {branch} is deeper than this U-Net allows "
                         f"(0-{top} for its {geometry_of(units).layers_per_block} layers per level). Lower cache_branch.")


@dataclass(frozen=True)
class DeepCachePolicy:
    config: DeepCacheConfig
    name: str = "DeepCache"

    @property
    def reuse(self):
        """The reuse strategy the session runs every unit with (core/reuse.py)."""
        return strategy_from_name(self.config.reuse)

    def validate(self, units: UnitMap) -> None:
        check_branch(units, self.config.cache_branch)

    def plan(self, units: UnitMap, num_steps: int, window: range) -> Plan:
        plan = full_plan(units, num_steps)
        if self.config.cache_interval == 1 or len(window) == 0:
            return plan
        deep = deep_row(units, self.config.cache_branch)
        full = full_steps(self.config, len(window))
        for rel, step in enumerate(window):
            if rel not in full:
                plan[step] = list(deep)
        return plan
