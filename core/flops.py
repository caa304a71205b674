"""FLOP profile of a model: per-unit and whole-call FLOPs per batch sample.

Measured once per model and input signature with torch's FlopCounterMode on a call where
every unit computes, then remembered (weakly keyed by the model module), so later runs pay
nothing. The profile turns reuse counts into a FLOP-weighted estimate of the work skipped.
"""
from __future__ import annotations

import weakref
from typing import Any, Callable

from torch.utils.flop_counter import FlopCounterMode

_MEMO: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()


class FlopProfiler:
    def __init__(self, num_units: int, samples: int):
        self._unit = [None] * num_units
        self._samples = max(1, samples)
        self._mode = FlopCounterMode(display=False)
        self._total: float | None = None

    def __enter__(self) -> "FlopProfiler":
        self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._total = float(self._mode.get_total_flops())
        self._mode.__exit__(*exc)

    def measure(self, index: int, compute: Callable[[], Any]) -> Any:
        before = self._mode.get_total_flops()
        out = compute()
        flops = float(self._mode.get_total_flops() - before)
        self._unit[index] = (self._unit[index] or 0.0) + flops
        return out

    def result(self) -> tuple[list[float], float] | None:
        if not self._total:
            return None
        per = self._samples
        return [(f or 0.0) / per for f in self._unit], self._total / per

    # -- memo: (module, signature) -> profile --
    @staticmethod
    def lookup(key: tuple[Any, Any]) -> tuple[list[float], float] | None:
        module, signature = key
        try:
            return _MEMO.get(module, {}).get(signature)
        except TypeError:  # not weak-referenceable
            return None

    @staticmethod
    def remember(key: tuple[Any, Any], profile: tuple[list[float], float]) -> None:
        module, signature = key
        try:
            _MEMO.setdefault(module, {})[signature] = profile
        except TypeError:
            pass
