"""The cache runtime: one session per sampling run.

A host adapter opens a session when a sampling run starts and closes it when the run ends
(also on error or interrupt), so nothing survives into the next run. Each model call goes
through `CacheSession.model_call`, which fixes the step and the stream layout of that call;
each unit goes through `run_unit`, the one place where a decision is executed and counted.

Units find the session of the call they are part of through a context variable keyed by the
owner (the patch that installed them), so module proxies stay stateless and shareable, and
two CacheKit patches on one model never see each other's state.
"""
from __future__ import annotations

import contextlib
import contextvars
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from .clock import StepClock
from .flops import FlopProfiler
from .methods.base import Policy
from .streams import CallLayout, StreamStore, Tree, first_tensor, input_signature, tree_map
from .telemetry import RunTelemetry
from .units import StoreMode, UnitMap

_ACTIVE: contextvars.ContextVar[dict[str, "ActiveCall"]] = contextvars.ContextVar("cachekit_active", default={})


@dataclass
class ActiveCall:
    session: "CacheSession"
    step: int
    layout: CallLayout
    reuse_row: list[bool]
    samples: int
    profiler: FlopProfiler | None = None


def active_call(owner: str) -> ActiveCall | None:
    """The call in progress for this owner in this thread, or None outside a CacheKit run."""
    return _ACTIVE.get().get(owner)


class CacheSession:
    def __init__(self, owner: str, units: UnitMap, policy: Policy, clock: StepClock,
                 window: range, *, unit_timer: Callable[[int, float], None] | None = None):
        self.owner = owner
        self.units = units
        self.policy = policy
        self.clock = clock
        self.window = window
        self.plan = policy.plan(units, clock.num_steps, window)
        n = len(units)
        # Only units that the plan may ever reuse need their outputs kept.
        self._keep = [any(row[u] for row in self.plan) for u in range(n)]
        self._stores = [StreamStore() if keep else None for keep in self._keep]
        self._modes = [unit.mode for unit in units.units]
        self._protect = [unit.protect for unit in units.units]
        self.telemetry = RunTelemetry(
            method=policy.name, family=units.family,
            unit_names=[u.name for u in units.units], unit_groups=[u.group for u in units.units],
            num_steps=clock.num_steps)
        self._unit_timer = unit_timer
        self.closed = False

    # -- one model call --
    def model_call(self, run: Callable[[], Any], *, sigma: float | None, layout: CallLayout,
                   samples: int, profile_key: Any = None) -> Any:
        """Run one model call (the host's forward) with this session active."""
        with self.call_scope(sigma=sigma, layout=layout, samples=samples, profile_key=profile_key):
            return run()

    @contextlib.contextmanager
    def call_scope(self, *, sigma: float | None, layout: CallLayout, samples: int, profile_key: Any = None):
        """Make this session active for the units of one model call."""
        if self.closed:
            yield None
            return
        step = self.clock.step_of(sigma)
        row = self.plan[step]
        profiler = None
        if profile_key is not None and self.telemetry.unit_flops is None:
            known = FlopProfiler.lookup(profile_key)
            if known is not None:
                self.telemetry.unit_flops, self.telemetry.call_flops = known
            elif not any(row):
                profiler = FlopProfiler(len(self.units), samples)
        call = ActiveCall(self, step, layout, row, samples, profiler)
        active = dict(_ACTIVE.get())
        active[self.owner] = call
        token = _ACTIVE.set(active)
        started = time.perf_counter()
        try:
            if profiler is None:
                yield call
            else:
                with profiler:
                    yield call
                result = profiler.result()
                if result is not None:
                    FlopProfiler.remember(profile_key, result)
                    self.telemetry.unit_flops, self.telemetry.call_flops = result
        finally:
            _ACTIVE.reset(token)
        if profiler is None:       # a profiled call runs several times slower: not a timing
            self.telemetry.add_time(step, time.perf_counter() - started)
        self.telemetry.model_calls += 1
        self.telemetry.model_call_samples += samples

    # -- one unit --
    def run_unit(self, call: ActiveCall, index: int, compute: Callable[[], Tree], unit_input: Tree) -> Tree:
        """Compute the unit or return its stored output, as the plan says for this step."""
        store = self._stores[index]
        x = first_tensor(unit_input)
        signature = input_signature(x, call.layout) if x is not None else None
        if call.reuse_row[index] and store is not None and signature is not None:
            stored = store.get(call.layout, signature)
            if stored is not None:
                self.telemetry.record(call.step, index, call.samples, reused=True)
                if self._modes[index] is StoreMode.RESIDUAL:
                    return tree_map(lambda residual, x: x + residual, stored, unit_input)
                return tree_map(torch.clone, stored) if self._protect[index] else stored
        if call.profiler is not None:
            out = call.profiler.measure(index, compute)
        elif self._unit_timer is not None:
            start = time.perf_counter()
            out = compute()
            self._unit_timer(index, time.perf_counter() - start)
        else:
            out = compute()
        self.telemetry.record(call.step, index, call.samples, reused=False)
        if store is not None and signature is not None:
            if self._modes[index] is StoreMode.RESIDUAL:
                store.put(call.layout, signature, tree_map(torch.sub, out, unit_input))
            else:
                store.put(call.layout, signature, tree_map(torch.clone, out) if self._protect[index] else out)
        return out

    def note_step_skipped(self, sigma: float | None) -> None:
        """A step-skip method reused the whole prediction at this sigma: no unit ran."""
        step = self.clock.step_of(sigma)
        if step not in self.telemetry.skipped_steps:
            self.telemetry.skipped_steps.append(step)

    def close(self) -> RunTelemetry:
        """Drop every stored tensor and finish the telemetry. Safe to call twice."""
        self.closed = True
        for store in self._stores:
            if store is not None:
                store.clear()
        self.telemetry.finish()
        return self.telemetry
