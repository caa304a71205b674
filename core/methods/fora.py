"""FORA (Selvaraju et al., 2024; prathebaselva/FORA): Fast-Forward Caching for DiTs.

Reference semantics, as the official `boost_infer_static` decides them: sampling runs a
countdown index i = T-1 ... 0; every block's attention and MLP outputs (before their adaLN
gates) are recomputed and stored when i == T-1 (the first step) or i % interval == 0, and reused
on all other steps, with the gates of the current step still applied. In forward step numbers
s = T-1-i: refresh iff s == 0 or (T-1-s) % interval == 0. So with 20 steps and interval 3 the
refreshes are s = 0, 1, 4, 7, 10, 13, 16, 19 - the last step is always fresh.

T is the number of steps in the [start_percent, end_percent) window; steps outside it compute
everything. Samplers with several model calls per step follow the step's decision on each call.

`reuse` (not in the paper): "hold" reuses the last refresh's outputs as published; "forecast1" /
"forecast2" extrapolate them from the last refreshes (TaylorSeer), keeping 2 or 3 tensors per unit.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..reuse import strategy_from_name
from ..units import UnitMap
from .base import Plan, check_int, check_percent_range, full_plan
from .deepcache import check_reuse


@dataclass(frozen=True)
class ForaConfig:
    interval: int = 3
    start_percent: float = 0.0
    end_percent: float = 1.0
    reuse: str = "hold"

    def __post_init__(self) -> None:
        check_int("interval", self.interval, 1, "Use 1 to disable caching, 3 is the default.")
        check_percent_range(self.start_percent, self.end_percent)
        check_reuse(self.reuse)


def refresh_steps(window_len: int, interval: int) -> set[int]:
    """Window-relative steps on which FORA recomputes every unit."""
    last = window_len - 1
    return {s for s in range(window_len) if s == 0 or (last - s) % interval == 0}


@dataclass(frozen=True)
class ForaPolicy:
    config: ForaConfig
    name: str = "FORA"

    @property
    def reuse(self):
        """The reuse strategy the session runs every unit with (core/reuse.py)."""
        return strategy_from_name(self.config.reuse)

    def plan(self, units: UnitMap, num_steps: int, window: range) -> Plan:
        plan = full_plan(units, num_steps)
        if self.config.interval == 1:
            return plan
        refresh = refresh_steps(len(window), self.config.interval)
        for rel, step in enumerate(window):
            if rel not in refresh:
                plan[step] = [True] * len(units)
        return plan
