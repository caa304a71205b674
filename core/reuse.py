"""Reuse strategies: how values kept from computed steps become a unit's output on a reused step.

A strategy is data (a small frozen dataclass) with two pure operations:

* `refresh(entry, value, step)`: the new stored entry after the unit computed `value` at `step`
  (`entry` is what was stored before, or None);
* `output(entry, step)`: the value to use at `step` from the stored entry.

`Hold` keeps the last value (DeepCache, FORA, routers as published). `Forecast` keeps Taylor
coefficients estimated by finite differences over the steps between refreshes (TaylorSeer) and
extrapolates; it stores order + 1 tensors per unit. Residual units (a whole block whose gates
are computed inside it) store output minus input and add the current input back; that wrapping
is `residual_of` / `add_residual`, applied by the session around any strategy. `blend` mixes a
fresh and a reused value (router training's soft decision). Every reuse in CacheKit, sampling
and training, goes through these functions.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .streams import Tree, tree_map


def residual_of(out: Tree, unit_input: Tree) -> Tree:
    return tree_map(torch.sub, out, unit_input)


def add_residual(unit_input: Tree, residual: Tree) -> Tree:
    # Mapped over the residual: an output leaf that was None (SD3's last block has no text
    # output) stays None whatever the input had there.
    return tree_map(lambda r, x: x + r, residual, unit_input)


def blend(weight: torch.Tensor | float, fresh: Tree, reused: Tree) -> Tree:
    """weight * fresh + (1 - weight) * reused (router training's soft cache decision)."""
    return tree_map(lambda f, r: weight * f + (1 - weight) * r, fresh, reused)


@dataclass(frozen=True)
class Hold:
    """Reuse the value of the last computed step as is."""
    name: str = "hold"

    def refresh(self, entry: Any, value: Tree, step: int) -> Tree:
        return value

    def output(self, entry: Tree, step: int) -> Tree:
        return entry

    def tensors_per_entry(self) -> int:
        return 1


@dataclass(frozen=True)
class Forecast:
    """Taylor extrapolation from the last refreshes (TaylorSeer, order 1 or 2).

    The entry is (step of the last refresh, (f, f', f'', ...)): derivatives in steps, estimated
    by divided differences between consecutive refreshes. A unit with fewer refreshes than the
    order uses the derivatives it has (the first refresh holds)."""
    order: int = 1
    name: str = "forecast"

    def __post_init__(self) -> None:
        if self.order not in (1, 2):
            raise ValueError(f"Forecast order must be 1 or 2, got {self.order!r}.")

    def refresh(self, entry: Any, value: Tree, step: int) -> Any:
        if entry is None:
            return (step, (value,))
        last_step, derivs = entry
        gap = step - last_step
        if gap <= 0:      # a second call in the same step (heun): replace, keep the history
            return (step, (value,) + tuple(derivs[1:]))
        new = [value]
        for i in range(min(self.order, len(derivs))):
            new.append(tree_map(lambda a, b: (a - b) / gap, new[i], derivs[i]))
        return (step, tuple(new))

    def output(self, entry: Any, step: int) -> Tree:
        last_step, derivs = entry
        dt = step - last_step
        if len(derivs) == 1 or dt == 0:
            return derivs[0]
        terms = [(d, dt ** i / _FACTORIAL[i]) for i, d in enumerate(derivs)]
        return tree_map(lambda *ts: sum(t * c for t, (_, c) in zip(ts, terms)), *(d for d, _ in terms))

    def tensors_per_entry(self) -> int:
        return self.order + 1


_FACTORIAL = (1, 1, 2, 6)

HOLD = Hold()
STRATEGIES = ("hold", "forecast1", "forecast2")


def strategy_from_name(name: str) -> Hold | Forecast:
    """'hold', 'forecast1' or 'forecast2' (the names node and API inputs use)."""
    if name == "hold":
        return HOLD
    if name in ("forecast1", "forecast2"):
        return Forecast(int(name[-1]))
    raise ValueError(f"reuse must be one of {STRATEGIES}, got {name!r}.")
