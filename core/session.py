"""The cache runtime: one session per sampling run, for every decision level.

A host opens a session when a sampling run starts and closes it when the run ends (also on
error or interrupt; see core/lifecycle.py), so nothing survives into the next run. Each model
call runs inside `call_scope`, which fixes once per call what every unit of the call needs: the
step, the stream layout, the input signature, the decision row and whether the host edits
outputs in place. Decisions are executed in exactly two places:

* `run_unit`: a unit (block, sub-layer) computes or reuses; `run_region` skips a run of units
  with one lookup when every one of them is reused;
* `run_call`: the whole model call computes or reuses (step skipping: AdaptiveDiffusion).

Policies only decide: static ones plan every step up front (`plan`), online ones decide per step
from a probe (`decide`), and every online probe passes the agreement point (core/agreement.py).
An online call-level policy probes the latent the step starts from (in `run_call`); an online
unit-level policy probes the value of its probe unit, the first unit of the call, and a step
that reuses then reuses the policy's fixed `skip_row` for the rest of the call (`_probe_decide`).
How a stored value becomes an output is a reuse strategy (core/reuse.py).

Only what a later computed unit reads is stored: with the unit map's readers, a unit reused on a
step where no computed unit reads its output returns a placeholder of the right
shape (the host's glue, e.g. a U-Net's skip-connection `cat`, still needs one), so DeepCache at
branch 0 keeps one tensor instead of the whole deep region. Placeholders hold one element each
(stride-0 expansions), except on calls whose host edits outputs in place. Stored values are copied only on
calls where the host edits unit outputs in place (ComfyUI's ControlNet `h += ctrl`, FreeU).

Units find the session of the call they are part of through a context variable keyed by the
owner (the patch that installed them), so module proxies stay stateless and shareable, and
two CacheKit patches on one model never see each other's state.
"""
from __future__ import annotations

import contextlib
import contextvars
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Iterable

import torch

from .agreement import agree
from .clock import StepClock
from .flops import FlopProfiler
from .methods.base import Policy
from .reuse import HOLD, add_residual, residual_of
from .streams import (CallLayout, StreamStore, TensorSpec, Tree, empty_from_specs, input_signature, map_specs,
                      stand_ins_from_specs, tensor_specs, tree_bytes, tree_map)
from .telemetry import RunTelemetry
from .units import StoreMode, UnitMap

_ACTIVE: contextvars.ContextVar[dict[str, "ActiveCall"]] = contextvars.ContextVar("cachekit_active", default={})


@dataclass
class ActiveCall:
    session: "CacheSession"
    step: int
    layout: CallLayout
    signature: tuple | None
    reuse_row: list[bool]
    region_row: list[bool]
    samples: int
    needed_row: list[bool] | None = None     # reused units a computed unit reads (None: all)
    protect: bool = False
    profiler: FlopProfiler | None = None
    stored: bool = False              # the session's held memory changed (a value stored, a placeholder made)


# torch's error for a write into a stride-0 tensor: here, a placeholder (_Spec.placeholder).
_WROTE_INTO_STAND_IN = "refers to a single memory location"


class UndetectedInPlaceEdit(RuntimeError):
    """Something in the model's forward wrote into a reused unit's placeholder."""

    def __init__(self):
        super().__init__(
            "CacheKit: something in this model's forward edits cached features in place, and CacheKit did not "
            "recognise it (it recognises ControlNets and U-Net block patches such as FreeU, and copies for them). "
            "Reusing features alongside it is not safe: bypass that node or the CacheKit node for this workflow, "
            "and report the node to CacheKit so it can be recognised.")


def active_call(owner: str) -> ActiveCall | None:
    """The call in progress for this owner in this thread, or None outside a CacheKit run."""
    return _ACTIVE.get().get(owner)


@dataclass(frozen=True)
class _Spec:
    """Shapes of a value that is not stored, to hand out a placeholder of the right shape.

    Kept per stream (the batch dimension divided by the call's streams), so a value computed in
    a joint cond+uncond call serves split calls and the other way round; a value whose batch
    does not split evenly is only valid for the same layout."""
    layout: CallLayout | None
    signature: tuple
    tree: Tree
    # Placeholders already made, per number of streams: nothing computed reads them, so one set
    # of tensors serves every step of the run (no allocation, no Python walk per cache step).
    made: dict = field(default_factory=dict, compare=False)

    @staticmethod
    def of(value: Tree, call: ActiveCall) -> "_Spec":
        chunks = call.layout.chunks
        specs = tensor_specs(value)
        leaves = []
        tree_map(lambda t: leaves.append(t.shape[0] if t.dim() else -1), value)
        if leaves and all(n > 0 and n % chunks == 0 for n in leaves):
            return _Spec(None, call.signature, _scale_batch(specs, 1, chunks))
        return _Spec(call.layout, call.signature, specs)

    def placeholder(self, call: ActiveCall) -> Tree | None:
        if self.signature != call.signature or (self.layout is not None and self.layout != call.layout):
            return None
        chunks = call.layout.chunks
        key = (chunks, call.protect)
        made = self.made.get(key)
        if made is None:
            tree = self.tree if self.layout is not None else _scale_batch(self.tree, chunks, 1)
            # In-place editing hosts write into what they get: full tensors; others: stride-0 ones.
            made = self.made[key] = empty_from_specs(tree) if call.protect else stand_ins_from_specs(tree)
            call.stored = True        # held memory grew: the run record's peak is measured after the call
        return made


def _scale_batch(specs: Tree, multiply: int, divide: int) -> Tree:
    return map_specs(specs, lambda s: TensorSpec((s.shape[0] * multiply // divide,) + s.shape[1:], s.dtype, s.device))


class CacheSession:
    def __init__(self, owner: str, units: UnitMap, policy: Policy, clock: StepClock, window: range, *,
                 unit_timer: Callable[[int, float], None] | None = None, run_steps: range | None = None,
                 notes: Iterable[str] = ()):
        """unit_timer(index, seconds): called after each computed unit (scripts/benchmark.py).

        run_steps: the steps of the clock's schedule this run samples, when it samples only part
        of it (two samplers splitting one schedule, e.g. Wan 2.2's high- and low-noise experts):
        step numbers, a static plan and the telemetry then cover the whole schedule, and this
        session computes its first step (nothing before it is this run's to reuse) and every step
        outside it. Online policies see the window cut to the run. notes: for the run record."""
        self.owner = owner
        self.units = units
        self.policy = policy
        self.clock = clock
        self.run_steps = run_steps if run_steps is not None else range(clock.num_steps)
        self._split = run_steps is not None and len(run_steps) > 0
        self.online = bool(getattr(policy, "online", False))
        if self.online and run_steps is not None:
            window = _intersect(window, self.run_steps)
        self.window = window
        self.level = getattr(policy, "level", "unit")
        self.reuse = getattr(policy, "reuse", HOLD)
        n = len(units)
        # Online unit-level policies (change-driven caching) reuse one fixed set of units on the
        # steps they decide to reuse: (reuse row, region row, needed row) of such a step.
        self._skip_rows: tuple[list[bool], list[bool], list[bool]] | None = None
        self._probe_index = -1
        self._probe_refs: dict[Hashable, torch.Tensor] = {}    # per stream layout: probe at the last full step
        if self.online:
            self.plan = None
            self._state = policy.start(units, clock.num_steps, window)
            self._region_rows = self._needed_rows = None
            if self.level == "unit":
                skip = policy.skip_row(units)
                regions = _region_row(units, skip)
                needed = _needed_rows(units, [skip])[0]
                self._keep, self._placeholder, self._keep_region = _storage_needs(units, [skip], [needed], [regions])
                self._skip_rows = (skip, regions, needed)
                self._probe_index = policy.probe_unit(units)
            else:
                self._keep = [True] * n
                self._keep_region = [False] * len(units.regions)
                self._placeholder = [False] * n
        else:
            self.plan = _confine(policy.plan(units, clock.num_steps, window), run_steps)
            self._region_rows = [_region_row(units, row) for row in self.plan]
            self._needed_rows = _needed_rows(units, self.plan)
            self._keep, self._placeholder, self._keep_region = _storage_needs(
                units, self.plan, self._needed_rows, self._region_rows)
        # A unit-level plan that never reuses (interval 1, an empty window): the session stays out
        # of the units' way entirely and counts every unit as computed once per call (unless
        # each unit is to be timed).
        self._unit_timer = unit_timer
        self._inert = (self.level == "unit" and self.plan is not None and not any(map(any, self.plan))
                       and unit_timer is None)
        self._stores = [StreamStore() if keep else None for keep in self._keep]
        self._region_stores = [StreamStore() if keep else None for keep in self._keep_region]
        self._specs: list[_Spec | None] = [None] * n
        self._region_specs: list[_Spec | None] = [None] * len(units.regions)
        self._residual = [unit.mode is StoreMode.RESIDUAL for unit in units.units]
        self._compute_rows = ([False] * n, [False] * len(units.regions))
        self._decided_step: int | None = None     # online: the step decided last, and its decision
        self._call_compute = True
        self._call_store: dict[Hashable, Any] = {}
        self.telemetry = RunTelemetry(
            method=policy.name, family=units.family,
            unit_names=[u.name for u in units.units], unit_groups=[u.group for u in units.units],
            num_steps=clock.num_steps, notes=list(notes),
            run_steps=[self.run_steps.start, self.run_steps.stop])
        if self.level == "call":      # the unit is the whole call: its share of the work is 1
            self.telemetry.unit_flops, self.telemetry.call_flops = [1.0], 1.0
        self.closed = False

    # -- one model call --
    def model_call(self, run: Callable[[], Any], *, sigma: float | None, layout: CallLayout, samples: int,
                   call_input: torch.Tensor | None = None, protect: bool = False) -> Any:
        """Run one model call (the host's forward) with this session active."""
        with self.call_scope(sigma=sigma, layout=layout, samples=samples, call_input=call_input, protect=protect):
            return run()

    @contextlib.contextmanager
    def call_scope(self, *, sigma: float | None, layout: CallLayout, samples: int,
                   call_input: torch.Tensor | None = None, protect: bool = False):
        """Make this session active for the units of one model call.

        call_input: the model's input latent; its per-stream shape, dtype and device are what a
        stored value must match to be reused (anything else recomputes, never a wrong tensor).
        protect: the host edits unit outputs in place during this call (copy stored values)."""
        if self.closed:
            yield None
            return
        step = self.clock.step_of(sigma)
        if self._split:
            # A call at the sigma where this run stops (heun's corrector of its last step) is
            # this run's last step, as the clock's clamp makes it for a whole schedule.
            step = min(max(step, self.run_steps.start), self.run_steps.stop - 1)
        if self._inert:
            started = time.perf_counter()
            yield None
            if step not in self.telemetry.skipped_steps:    # a step skip in the same run ran no unit
                computed = self.telemetry.computed[step]
                for u in range(len(computed)):
                    computed[u] += samples
            self._count_call(step, samples, started)
            return
        needed = None       # None: every reused unit counts as read
        if self.plan is not None:
            row, region_row, needed = self.plan[step], self._region_rows[step], self._needed_rows[step]
        elif self._skip_rows is not None and step == self._decided_step and not self._call_compute:
            row, region_row, needed = self._skip_rows      # a later call of a step that reuses
        else:
            row, region_row = self._compute_rows
        signature = input_signature(call_input, layout) if call_input is not None else None
        call = ActiveCall(self, step, layout, signature, row, region_row, samples, needed, protect)
        token = _ACTIVE.set({**_ACTIVE.get(), self.owner: call})
        started = time.perf_counter()
        try:
            yield call
        except RuntimeError as error:
            if _WROTE_INTO_STAND_IN in str(error):
                raise UndetectedInPlaceEdit() from error
            raise
        finally:
            _ACTIVE.reset(token)
        self._count_call(step, samples, started)
        if call.stored:
            self.telemetry.note_cache_bytes(self.cache_bytes(), self.placeholder_bytes())

    def _count_call(self, step: int, samples: int, started: float) -> None:
        telemetry = self.telemetry
        telemetry.add_time(step, time.perf_counter() - started)
        telemetry.model_calls += 1
        telemetry.model_call_samples += samples

    # -- one unit --
    def run_unit(self, call: ActiveCall, index: int, compute: Callable[[], Tree], unit_input: Tree) -> Tree:
        """Compute the unit or return its stored output, as the plan says for this step."""
        if call.profiler is not None:
            return call.profiler.measure(index, compute)
        if call.reuse_row[index] and call.signature is not None:
            value = self._reused_value(call, index, unit_input)
            if value is not None:
                self.telemetry.reused[call.step][index] += call.samples
                return value
        if self._unit_timer is not None:
            start = time.perf_counter()
            out = compute()
            self._unit_timer(index, time.perf_counter() - start)
        else:
            out = compute()
        self.telemetry.computed[call.step][index] += call.samples
        if call.signature is not None:
            store = self._stores[index]
            if store is not None:
                value = residual_of(out, unit_input) if self._residual[index] else out
                if call.protect:
                    value = tree_map(torch.clone, value)
                self._put(store, call, value)
            if self._placeholder[index]:
                self._specs[index] = _Spec.of(out, call)
        if index == self._probe_index:
            self._probe_decide(call, out, unit_input)
        return out

    @torch.compiler.disable
    def _probe_decide(self, call: ActiveCall, out: Tree, unit_input: Tree) -> None:
        """Online unit-level policies: the step's first call decides from the probe unit's value
        (residual or output) against its value at the last full step; a reusing decision takes
        effect for the rest of this call and every later call of the step."""
        value = residual_of(out, unit_input) if self._residual[self._probe_index] else out
        probe = _first_tensor(value).detach()
        key = (call.layout, call.signature)
        if call.step != self._decided_step:
            self._decided_step = call.step
            measured = self.policy.measure(self._state, call.step, (probe, self._probe_refs.get(key)))
            agreed = agree(measured) if measured is not None else None
            self._call_compute = self.policy.decide(self._state, call.step, agreed)
            self._note_probe(call.step, agreed)
            if not self._call_compute:
                call.reuse_row, call.region_row, call.needed_row = self._skip_rows
        if self._call_compute:
            self._probe_refs[key] = probe.clone() if call.protect else probe

    def _note_probe(self, step: int, agreed: Any) -> None:
        score = getattr(self.policy, "score", None)
        value = score(self._state, step) if score is not None else (float(agreed) if agreed is not None else None)
        self.telemetry.note_probe(step, value, getattr(self.policy, "probe_label", ""))

    def _reused_value(self, call: ActiveCall, index: int, unit_input: Tree) -> Tree | None:
        store = self._stores[index]
        if call.needed_row is not None and not call.needed_row[index]:
            spec = self._specs[index]
            value = spec.placeholder(call) if spec is not None else None
            if value is not None:
                return value
        if store is None:
            return None
        entry = store.get(call.layout, call.signature)
        if entry is None:
            return None
        value = self.reuse.output(entry, call.step)
        if self._residual[index]:
            return add_residual(unit_input, value)
        return tree_map(torch.clone, value) if call.protect else value

    def _put(self, store: StreamStore, call: ActiveCall, value: Tree) -> None:
        previous = store.get(call.layout, call.signature) if self.reuse is not HOLD else None
        store.put(call.layout, call.signature, self.reuse.refresh(previous, value, call.step))
        call.stored = True

    # -- a region: consecutive units run by one module --
    def run_region(self, call: ActiveCall, index: int, compute: Callable[[], Tree]) -> Tree:
        """Skip the whole region with one lookup when every member is reused at this step."""
        if call.profiler is None and call.region_row[index] and call.signature is not None:
            value = self._region_value(call, index)
            if value is not None:
                reused = self.telemetry.reused[call.step]
                for member in self.units.regions[index].members:
                    reused[member] += call.samples
                return value
        out = compute()
        if call.profiler is None and call.signature is not None:
            store = self._region_stores[index]
            if store is not None:
                store.put(call.layout, call.signature, tree_map(torch.clone, out) if call.protect else out)
                call.stored = True
            else:
                self._region_specs[index] = _Spec.of(out, call)
        return out

    def _region_value(self, call: ActiveCall, index: int) -> Tree | None:
        store = self._region_stores[index]
        if store is not None:
            value = store.get(call.layout, call.signature)
            if value is not None and call.protect:
                value = tree_map(torch.clone, value)
            return value
        spec = self._region_specs[index]
        return spec.placeholder(call) if spec is not None else None

    # -- the whole model call as one unit (step skipping) --
    def run_call(self, call: ActiveCall, compute: Callable[[], Any], *, probe: torch.Tensor, key: Hashable = None,
                 encode: Callable[[Any], Any] = lambda out: out, decode: Callable[[Any], Any] = lambda stored: stored,
                 peers: Iterable["CacheSession"] = ()) -> Any:
        """Compute the model call or reuse a stored result, as the policy decides for this step.

        The first call of a step takes the step's decision from `probe` (the latent the step
        starts from); later calls of the step (heun's corrector, split cond/uncond calls) follow
        it. `encode` turns the output into what is stored, `decode` a stored value back into an
        output for this call (ComfyUI stores the noise and re-applies it at the call's sigma).
        On a reused call, `peers` (other sessions of the run) note that none of their units ran."""
        step = call.step
        if step != self._decided_step:
            self._decided_step = step
            self._call_compute = self._decide(step, probe)
        if not self._call_compute:
            entry = self._call_store.get(key)
            if entry is not None:
                # A learned forecast also reads the step's latent (core/learned_forecast.py).
                latent = {"latent": probe} if getattr(self.reuse, "needs_latent", False) else {}
                out = decode(self.reuse.output(entry, step, **latent))
                if out is not None:
                    self.telemetry.reused[step][0] += call.samples
                    self.telemetry.note_skipped(step)
                    for peer in peers:
                        if peer is not self:
                            peer.telemetry.note_skipped(step)
                    return out
        out = compute()
        encoded = encode(out)
        if encoded is not None:
            previous = self._call_store.get(key) if self.reuse is not HOLD else None
            self._call_store[key] = self.reuse.refresh(previous, encoded, step)
        self.telemetry.computed[step][0] += call.samples
        return out

    @torch.compiler.disable
    def _decide(self, step: int, probe: torch.Tensor) -> bool:
        """True = compute. Static plans are read; online policies measure, agree, decide."""
        if not self.online:
            return not self.plan[step][0]
        measured = self.policy.measure(self._state, step, probe)
        agreed = agree(measured) if measured is not None else None
        compute = self.policy.decide(self._state, step, agreed)
        self._note_probe(step, agreed)
        # Outside the window (a guard emptied it, or cut it to a run) every step computes; the
        # policy still saw the step, so its history stays whole.
        return compute or step not in self.window

    # -- FLOP profile (never inside a timed sampling: hosts call this after the run) --
    @contextlib.contextmanager
    def profile_scope(self, samples: int):
        """Every unit computes and is measured; nothing is stored or counted."""
        profiler = FlopProfiler(len(self.units), samples)
        call = ActiveCall(self, 0, CallLayout(("profile",)), None, [False] * len(self.units),
                          [False] * len(self.units.regions), samples, None, profiler=profiler)
        token = _ACTIVE.set({**_ACTIVE.get(), self.owner: call})
        try:
            with profiler:
                yield profiler
        finally:
            _ACTIVE.reset(token)

    # -- state --
    def cache_bytes(self) -> int:
        seen: set = set()
        total = sum(s.nbytes(seen) for s in self._stores if s is not None)
        total += sum(s.nbytes(seen) for s in self._region_stores if s is not None)
        total += sum(tree_bytes(v, seen) for v in self._call_store.values())
        total += sum(tree_bytes(v, seen) for v in self._probe_refs.values())
        return total

    def placeholder_bytes(self) -> int:
        """Bytes of the placeholders held (uninitialised tensors handed out for reused units that
        nothing computed reads; no values, but memory all the same)."""
        seen: set = set()
        return sum(tree_bytes(made, seen) for spec in self._specs + self._region_specs if spec is not None
                   for made in spec.made.values())

    def close(self) -> RunTelemetry:
        """Drop every stored tensor and finish the telemetry. Safe to call twice."""
        if not self.closed:
            # What the cache held when the run ended (the run record's "at the end"), then freed.
            self.telemetry.note_cache_bytes_end(self.cache_bytes())
        self.closed = True
        for store in self._stores + self._region_stores:
            if store is not None:
                store.clear()
        self._call_store.clear()
        self._probe_refs.clear()
        self._specs = [None] * len(self._specs)
        self._region_specs = [None] * len(self._region_specs)
        self.telemetry.finish()
        return self.telemetry


def _intersect(a: range, b: range) -> range:
    start, stop = max(a.start, b.start), min(a.stop, b.stop)
    return range(start, max(start, stop))


def _confine(plan: list[list[bool]], run_steps: range | None) -> list[list[bool]]:
    """A static plan over the whole schedule, for a run of part of it: the steps outside the run
    and the run's first step (when the run starts later: nothing of this run is stored yet, and
    another run's values are never its to reuse) compute every unit."""
    if run_steps is None:
        return plan
    first_computed = run_steps.start if run_steps.start > 0 else None
    return [[False] * len(row) if step not in run_steps or step == first_computed else row
            for step, row in enumerate(plan)]


def _first_tensor(value: Tree) -> torch.Tensor:
    """The main tensor of a unit's value (hidden states first in every block output we map)."""
    while not isinstance(value, torch.Tensor):
        value = value[0] if isinstance(value, (tuple, list)) else next(iter(value.values()))
    return value


def _region_row(units: UnitMap, row: list[bool]) -> list[bool]:
    """[region]: every member of the region is reused in this row (skip it with one lookup)."""
    return [all(row[m] for m in region.members) for region in units.regions]


def _needed_rows(units: UnitMap, plan: list[list[bool]]) -> list[list[bool]]:
    """[step][unit]: reused there and read by a unit computed there. Without readers every
    reused unit counts as read."""
    readers = units.readers
    if readers is None:
        return plan
    return [[row[u] and any(not row[r] for r in readers[u]) for u in range(len(row))] for row in plan]


def _storage_needs(units: UnitMap, plan: list[list[bool]], needed_rows: list[list[bool]],
                   region_rows: list[list[bool]]) -> tuple[list[bool], list[bool], list[bool]]:
    """(store unit?, placeholder unit?, store region?) from the plan and who reads what.

    A unit is stored when on some step it is reused (outside a skipped region) and a computed
    unit reads it; it gets a placeholder when on some step it is reused and nothing computed
    reads it. A skipped region is stored when a computed unit outside it reads one of its
    members. Without readers every reused unit is stored."""
    n = len(units)
    keep, placeholder = [False] * n, [False] * n
    keep_region = [False] * len(units.regions)
    readers = units.readers
    region_of = {m: r for r, region in enumerate(units.regions) for m in region.members}
    for row, needed, skipped in zip(plan, needed_rows, region_rows):
        for u in range(n):
            if not row[u]:
                continue
            r = region_of.get(u)
            if r is not None and skipped[r]:
                members = units.regions[r].members
                if readers is None or any(not row[v] and v not in members for v in readers[u]):
                    keep_region[r] = True
            elif needed[u]:
                keep[u] = True
            else:
                placeholder[u] = True
    return keep, placeholder, keep_region
