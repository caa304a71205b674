"""A method is a policy: it only decides; the session (core/session.py) executes and counts.

* Static policies (DeepCache, FORA, learned routers) decide every step up front from the number
  of steps: `plan(units, num_steps, window)`. The hot path is a list lookup, and every process of
  a multi-GPU run takes the same decisions without talking to the others.
* Online policies (AdaptiveDiffusion, change-driven caching) decide during the run from a
  measurement: `start(...)` makes the run's state, `measure(state, step, probe)` reduces the
  probe to a few numbers, the session agrees them across ranks (core/agreement.py), and
  `decide(state, step, agreed)` returns the step's decision.

`level` says what a unit is: "unit" (blocks, sub-layers) or "call" (the whole model call, one
unit). `reuse` (optional) is the reuse strategy of core/reuse.py; Hold when absent.
"""
from __future__ import annotations

from typing import Any, Protocol

from ..units import UnitMap

# plan[step][unit] is True where the unit may reuse its stored output at that step.
Plan = list[list[bool]]


class Policy(Protocol):
    name: str

    def plan(self, units: UnitMap, num_steps: int, window: range) -> Plan:
        ...


class OnlinePolicy(Protocol):
    name: str
    level: str
    online: bool

    def start(self, units: UnitMap, num_steps: int, window: range) -> Any:
        ...

    def measure(self, state: Any, step: int, probe: Any) -> Any:
        ...

    def decide(self, state: Any, step: int, agreed: Any) -> bool:
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
