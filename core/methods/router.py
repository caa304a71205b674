"""Learned routers as a policy: Learning-to-Cache (Ma et al. 2024) and HarmoniCa (Huang et al. 2025).

A router holds one logit per sampling step and sub-layer; sigmoid(logit) > threshold means
"recompute", otherwise the sub-layer's cached (ungated) output is reused with the current
step's gates, as in FORA.

* L2C, as the official DiT code decides (DiT/models/dynamic_models.py): sampling step k uses
  router T-1-k; steps whose router index is odd are full (every sub-layer computed), steps with
  an even index are routed. The very first step always computes (nothing is cached yet).
* HarmoniCa: every step after the first is routed, so a cached output may be several steps old.

How a reused output is produced is a reuse strategy (core/reuse.py): "hold" as published, or
"forecast1"/"forecast2" (TaylorSeer), where each unit extrapolates from its own last refreshes.
A router trained for a strategy (core/routers/train.py, `TrainConfig.reuse`) records it
(`Router.reuse`); unless the caller names one, the policy runs the router's own: its decisions
were learned against that reuse, and official and older routers (no record) are hold.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..reuse import strategy_from_name
from ..routers.format import Router, RouterError
from ..units import UnitMap
from .base import Plan, full_plan

NAMES = {"l2c": "L2C", "harmonica": "HarmoniCa"}


def check_threshold(threshold: float | None) -> None:
    """Refuse a threshold override outside [0, 1] (NaN included: it would silently never recompute)."""
    if threshold is not None and not 0.0 <= float(threshold) <= 1.0:
        raise RouterError(f"Router threshold must be between 0 and 1, got {threshold}: a sub-layer is recomputed "
                          "where sigmoid(logit) > threshold. Leave it unset to use the router's own.")


def not_a_dit(model_name: str, families: str, is_unet: bool, deepcache: str) -> RouterError:
    """The error for a model routers cannot work on: they decide per DiT sub-layer."""
    if is_unet:
        return RouterError(f"Learned routers work on DiTs ({families}); this model is a U-Net ({model_name}): "
                           f"use {deepcache}.")
    return RouterError(f"Learned routers work on DiTs ({families}); CacheKit cannot route {model_name}.")


def routed_steps(method: str, num_steps: int) -> list[bool]:
    if method == "l2c":
        return [k > 0 and (num_steps - 1 - k) % 2 == 0 for k in range(num_steps)]
    return [k > 0 for k in range(num_steps)]


@dataclass(frozen=True)
class RouterPolicy:
    router: Router
    threshold: float | None = None
    # core/reuse.py: "hold" (published) or "forecast1"/"forecast2"; None: the router's own
    # (`Router.reuse`, what it was trained for; "hold" for official files and older routers).
    reuse_name: str | None = None

    def __post_init__(self) -> None:
        check_threshold(self.threshold)
        strategy_from_name(self.reuse_resolved)

    @property
    def reuse_resolved(self) -> str:
        """The reuse name this policy runs: the override, else the router's own."""
        return self.router.reuse if self.reuse_name is None else self.reuse_name

    @property
    def reuse(self):
        """The reuse strategy the session runs every unit with. With forecasting, each unit
        extrapolates over the gaps between its own refreshes (units refresh at different steps)."""
        return strategy_from_name(self.reuse_resolved)

    @property
    def name(self) -> str:
        return NAMES[self.router.method]

    def check_units(self, units: UnitMap) -> None:
        """Refuse a router whose depth or sub-layer layout does not fit the model."""
        r = self.router
        if r.family == "uvit":
            raise RouterError("This is a U-ViT router; CacheKit applies routers to DiT-style models only "
                              "(diffusers DiT / PixArt, ComfyUI DiTs).")
        kinds = [u.kind for u in units.units]
        per_block = len(r.layout)
        blocks = len(kinds) // per_block if per_block else 0
        if len(kinds) != r.num_units or kinds != list(r.layout) * r.depth:
            model_layout = ",".join(dict.fromkeys(kinds))
            raise RouterError(f"This router was trained for {r.depth} blocks x ({','.join(r.layout)}) = {r.num_units} "
                              f"sub-layers; this model has {len(kinds)} sub-layers ({model_layout} per block"
                              f"{f', {blocks} blocks' if blocks else ''}). Use a router trained for this model.")

    def check_steps(self, num_steps: int) -> None:
        if num_steps != self.router.num_steps:
            raise RouterError(f"This router was trained for {self.router.num_steps} sampling steps, but the sampler runs "
                              f"{num_steps}. Set steps to {self.router.num_steps}, or use a router for {num_steps} steps.")

    def plan(self, units: UnitMap, num_steps: int, window: range) -> Plan:
        """Routers decide every step themselves; the window does not apply."""
        self.check_units(units)
        self.check_steps(num_steps)
        recompute = self.router.recompute(self.threshold).tolist()
        plan = full_plan(units, num_steps)
        for k, routed in enumerate(routed_steps(self.router.method, num_steps)):
            if routed:
                plan[k] = [not flag for flag in recompute[k]]
        return plan
