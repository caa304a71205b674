"""What one sampling run did: a step x unit record of computed and reused samples.

Counts are in batch samples (a joint cond+uncond call of batch 2 counts 2), so a run's numbers
do not depend on whether ComfyUI batched the streams or sent them separately.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Any


@dataclass
class RunTelemetry:
    method: str
    family: str
    unit_names: list[str]
    unit_groups: list[str]
    num_steps: int
    computed: list[list[int]] = field(default_factory=list)   # [step][unit] samples
    reused: list[list[int]] = field(default_factory=list)     # [step][unit] samples
    skipped_steps: list[int] = field(default_factory=list)     # whole prediction reused
    unit_flops: list[float] | None = None    # per sample, per unit (FLOP profile)
    call_flops: float | None = None          # per sample, whole model call
    model_calls: int = 0
    model_call_samples: int = 0
    step_seconds: list[float] = field(default_factory=list)   # [step] wall time inside model calls
    cache_bytes: int = 0                     # peak bytes held in the run's stores
    cache_bytes_end: int = 0                 # bytes the stores held when the run ended (then freed)
    placeholder_bytes: int = 0               # peak bytes of placeholders (shape-only stand-ins, no values)
    # Online policies: [step] the value each decision compared with its threshold (None: no
    # decision or nothing to compare), and what that value is.
    probe_values: list[float | None] = field(default_factory=list)
    probe_label: str = ""
    # The run's steps [first, end) in the schedule its step numbers count in: a sampler that
    # samples part of a schedule (Wan 2.2's two experts) runs e.g. [10, 20) of 20. None: all.
    run_steps: list[int] | None = None
    # Plain-English notes on the run (core/guards.py: few steps, a noise-injecting sampler).
    notes: list[str] = field(default_factory=list)
    # Measures (unit_flops, call_flops) when first asked for, after the run: FLOP profiling
    # never runs inside the sampling a user times. Set by the host; None when unknown.
    flop_source: Any = field(default=None, repr=False, compare=False)
    started: float = field(default_factory=time.perf_counter)
    wall_time_s: float | None = None

    def __post_init__(self) -> None:
        n = len(self.unit_names)
        if not self.computed:
            self.computed = [[0] * n for _ in range(self.num_steps)]
            self.reused = [[0] * n for _ in range(self.num_steps)]
        if not self.step_seconds:
            self.step_seconds = [0.0] * self.num_steps
        if not self.probe_values:
            self.probe_values = [None] * self.num_steps
        if self.run_steps is None:
            self.run_steps = [0, self.num_steps]

    # -- recording (hot path: keep it to list indexing) --
    def add_time(self, step: int, seconds: float) -> None:
        self.step_seconds[step] += seconds

    def note_skipped(self, step: int) -> None:
        """The whole model call was reused at this step (no unit ran)."""
        if step not in self.skipped_steps:
            self.skipped_steps.append(step)

    def note_probe(self, step: int, value: float | None, label: str = "") -> None:
        self.probe_values[step] = value
        if label:
            self.probe_label = label

    def note_cache_bytes(self, nbytes: int, placeholders: int = 0) -> None:
        if nbytes > self.cache_bytes:
            self.cache_bytes = nbytes
        if placeholders > self.placeholder_bytes:
            self.placeholder_bytes = placeholders

    def note_cache_bytes_end(self, nbytes: int) -> None:
        self.cache_bytes_end = nbytes
        self.note_cache_bytes(nbytes)

    def resolve_flops(self) -> bool:
        """Measure the FLOP profile now if it is unknown and the run has finished."""
        if self.unit_flops is None and self.flop_source is not None and self.wall_time_s is not None:
            source, self.flop_source = self.flop_source, None
            try:
                profile = source()
            except Exception:      # a profile is a convenience: never let it break a report
                profile = None
            if profile is not None:
                self.unit_flops, self.call_flops = profile
        return self.unit_flops is not None

    def finish(self) -> None:
        if self.wall_time_s is None:
            self.wall_time_s = time.perf_counter() - self.started

    # -- summaries --
    @property
    def hit_rate(self) -> float:
        """Reused unit samples / all unit samples."""
        reused = sum(map(sum, self.reused))
        total = reused + sum(map(sum, self.computed))
        return reused / total if total else 0.0

    def step_hit_rates(self) -> list[float | None]:
        return [_ratio(r, c) for r, c in zip(self.reused, self.computed)]

    def unit_hit_rates(self) -> list[float | None]:
        return [_ratio([row[u] for row in self.reused], [row[u] for row in self.computed])
                for u in range(len(self.unit_names))]

    def executed_fraction(self, resolve: bool = True) -> float | None:
        """FLOP-weighted share of the model's work that ran (1.0 = nothing skipped).

        Counts the parts outside units (embedders, input/output layers) as always executed.
        None when no FLOP profile can be had.
        """
        if resolve:
            self.resolve_flops()
        if self.unit_flops is None or not self.call_flops or not self.model_call_samples:
            return None
        full = self.call_flops * self.model_call_samples
        saved = sum(f * sum(row[u] for row in self.reused) for u, f in enumerate(self.unit_flops))
        return max(0.0, (full - saved) / full)

    def ideal_speedup(self, resolve: bool = True) -> float | None:
        frac = self.executed_fraction(resolve)
        return 1.0 / frac if frac else None

    def measured_speedup(self) -> float | None:
        """Speedup measured inside this run: its full steps (nothing reused) time an uncached step,
        so steps x median full-step time over the model time actually spent. None until the run
        has at least one full step and one step that reused something."""
        ran = [s for s in range(self.num_steps) if self.step_seconds[s] > 0 or sum(self.reused[s])]
        full = sorted(self.step_seconds[s] for s in ran if not sum(self.reused[s]) and sum(self.computed[s]))
        spent = sum(self.step_seconds[s] for s in ran)
        if not full or len(full) == len(ran) or spent <= 0:
            return None
        return len(ran) * statistics.median(full) / spent

    def heatmap(self) -> list[list[float | None]]:
        """[step][unit] reuse share (None where the unit did not run at that step)."""
        return [[_ratio([r], [c]) for r, c in zip(rr, cc)] for rr, cc in zip(self.reused, self.computed)]

    def as_dict(self, resolve: bool = True) -> dict:
        """resolve=False while a run is live or just ending: only a FLOP profile already known is used."""
        return {
            "method": self.method,
            "family": self.family,
            "num_steps": self.num_steps,
            "units": self.unit_names,
            "groups": self.unit_groups,
            "hit_rate": self.hit_rate,
            "step_hit_rates": self.step_hit_rates(),
            "unit_hit_rates": self.unit_hit_rates(),
            "heatmap": self.heatmap(),
            "executed_fraction": self.executed_fraction(resolve),
            "ideal_speedup": self.ideal_speedup(resolve),
            "measured_speedup": self.measured_speedup(),
            "step_seconds": list(self.step_seconds),
            "skipped_steps": list(self.skipped_steps),
            "model_calls": self.model_calls,
            "cache_bytes": self.cache_bytes,
            "cache_bytes_end": self.cache_bytes_end,
            "placeholder_bytes": self.placeholder_bytes,
            "probe_values": list(self.probe_values),
            "probe_label": self.probe_label,
            "wall_time_s": self.wall_time_s,
            "run_steps": list(self.run_steps),
            "notes": list(self.notes),
        }

    def summary(self) -> str:
        frac = self.executed_fraction(resolve=False)
        work = f", work executed {frac:.0%}" if frac is not None else ""
        wall = f", {self.wall_time_s:.2f} s" if self.wall_time_s is not None else ""
        cache = f", cache {format_bytes(self.cache_bytes)} peak" if self.cache_bytes else ""
        first, end = self.run_steps
        steps = (f"{self.num_steps} steps" if (first, end) == (0, self.num_steps)
                 else f"steps {first}-{end - 1} of {self.num_steps}")
        return (f"{self.method} on {self.family}: hit rate {self.hit_rate:.0%} over "
                f"{steps} and {len(self.unit_names)} units{work}{cache}{wall}")


def format_bytes(nbytes: int) -> str:
    """1.5 KiB, 12.3 MiB, 2.0 GiB (the sidebar card formats the same way)."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20)):
        if nbytes >= size:
            return f"{nbytes / size:.1f} {unit}"
    return f"{nbytes / 2**10:.1f} KiB"


def _ratio(reused, computed) -> float | None:
    r, c = sum(reused), sum(computed)
    return r / (r + c) if r + c else None
