"""FLOP profile of a model: per-unit and whole-call FLOPs per batch sample.

Measured after a run, when a report first asks for it (never inside the sampling a user
times): the host records the shapes of one model call's inputs, and the profile replays that
call once on fake tensors (no memory, no compute) with torch's FlopCounterMode, every unit
computing. The result is remembered per model and input signature (weakly keyed by the model),
so later runs pay nothing. It turns reuse counts into a FLOP-weighted estimate of work skipped.
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
        """None unless the call did work and every unit ran (a unit that never ran means the
        replay did not go through the patched model: no estimate beats a wrong one)."""
        if not self._total or any(f is None for f in self._unit):
            return None
        per = self._samples
        return [f / per for f in self._unit], self._total / per

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


def lazy_profile(session: Any, key: tuple[Any, Any], samples: int,
                 replay: Callable[[], Any]) -> Callable[[], tuple[list[float], float] | None]:
    """A telemetry flop_source: replay() calls the model once with inputs it builds from
    recorded specs; it runs under FakeTensorMode inside the session's profile scope."""
    def measure():
        known = FlopProfiler.lookup(key)
        if known is not None:
            return known
        from torch._subclasses.fake_tensor import FakeTensorMode
        with FakeTensorMode(allow_non_fake_inputs=True):
            with session.profile_scope(samples) as profiler:
                replay()
        result = profiler.result()
        if result is not None:
            FlopProfiler.remember(key, result)
        return result
    return measure
