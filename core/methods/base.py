"""A method is a policy: it only decides, per step and unit, whether a stored output may be used.

Static methods (DeepCache, FORA, learned routers) decide everything up front from the number
of steps, so the hot path is a list lookup and every process of a multi-GPU run takes the
same decisions.
"""
from __future__ import annotations

from typing import Protocol

from ..units import UnitMap

# plan[step][unit] is True where the unit may reuse its stored output at that step.
Plan = list[list[bool]]


class Policy(Protocol):
    name: str

    def plan(self, units: UnitMap, num_steps: int, window: range) -> Plan:
        ...


def full_plan(units: UnitMap, num_steps: int) -> Plan:
    """Compute every unit at every step."""
    return [[False] * len(units) for _ in range(num_steps)]


def check_int(name: str, value, minimum: int, fix: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}. {fix}")
    return value


def check_percent_range(start: float, end: float) -> None:
    for name, value in (("start_percent", start), ("end_percent", end)):
        if not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be between 0.0 and 1.0, got {value!r}.")
    if start >= end:
        raise ValueError(f"start_percent ({start}) must be below end_percent ({end}): "
                         "caching is active between the two.")
