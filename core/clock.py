"""The sampling step of a model call, derived from its sigma, never from counting calls.

Samplers such as heun or dpm_2 call the model more than once per step, and multi-GPU setups
may split one step's calls across processes, so counting forward calls gives wrong steps.
A call's step depends only on its sigma and the run's schedule, which every process shares:

    a call at sigma s belongs to step i when sigmas[i] >= s > sigmas[i + 1].

So each sampler step is one step of the plan whatever the sampler does inside it: dpm_2's
midpoint call belongs to the step it refines; heun's corrector is evaluated at sigmas[i + 1]
and belongs to step i + 1, the noise level it actually sees, and shares that step's decision
(on a full step both calls at that sigma compute, on a cache step both reuse).
"""
from __future__ import annotations

from bisect import bisect_right
from typing import Iterable, Sequence


class StepClock:
    def __init__(self, sigmas: Sequence[float]):
        sigmas = [float(s) for s in sigmas]
        if len(sigmas) < 2:
            raise ValueError("a sampling schedule needs at least two sigmas (one step)")
        self.sigmas = sigmas
        self.num_steps = len(sigmas) - 1
        # Descending schedule negated for bisect (bisect needs ascending order).
        self._neg = [-s for s in sigmas]

    def step_of(self, sigma: float | None) -> int:
        """Step i with sigmas[i] >= sigma > sigmas[i + 1] (clamped to the schedule)."""
        if sigma is None:
            return 0
        # Small tolerance: the model may receive a sigma that went through a dtype cast and
        # came out a hair above sigmas[i].
        i = bisect_right(self._neg, -sigma * (1 - 1e-5)) - 1
        return min(max(i, 0), self.num_steps - 1)


def window_steps(sigmas: Sequence[float], start_sigma: float, end_sigma: float) -> range:
    """Steps whose sigma lies in (end_sigma, start_sigma]: where a method may reuse.

    Outside the window every unit is computed. An empty window gives an empty range.
    """
    sigmas = [float(s) for s in sigmas[:-1]]
    inside = [i for i, s in enumerate(sigmas) if end_sigma < s <= start_sigma]
    if not inside:
        return range(0)
    return range(inside[0], inside[-1] + 1)


def window_from_percent(num_steps: int, start_percent: float, end_percent: float) -> range:
    """Steps i with start <= i / num_steps < end, for hosts without a sigma schedule."""
    first = next((i for i in range(num_steps) if i / num_steps >= start_percent), num_steps)
    last = max((i for i in range(num_steps) if i / num_steps < end_percent), default=-1)
    return range(first, last + 1) if last >= first else range(0)


def _close(a: float, b: float, rtol: float = 1e-4, atol: float = 1e-6) -> bool:
    return abs(a - b) <= atol + rtol * abs(b)


def locate_run(run: Sequence[float], schedules: Iterable[Sequence[float]], *, allow_offset: bool = True,
               unique: bool = False) -> tuple[list[float], int] | None:
    """The first schedule that holds a run's sigmas as a contiguous slice, and where it starts.

    Two samplers can split one schedule (ComfyUI's KSamplerAdvanced start/end steps, SplitSigmas):
    each then sees only its part, so its step numbers, its window and its method's countdown
    would start from 0. Finding the schedule its sigmas are a slice of gives the step numbers of
    the whole schedule. allow_offset False: only a slice at the schedule's start (a run that
    starts from fresh noise is never the continuation of another one). unique: every schedule
    that holds the run must agree on its length and the run's place in it, else None (the first
    part of ComfyUI's "normal" N-step schedule is also the first part of "sgm_uniform" at N - 1
    steps: nothing in the sigmas tells them apart). None when no schedule holds the run."""
    run = [float(s) for s in run]
    m = len(run)
    found = None
    for full in schedules:
        full = [float(s) for s in full]
        starts = range(len(full) - m + 1) if allow_offset else range(min(1, len(full) - m + 1))
        for j in starts:
            if all(_close(full[j + i], run[i]) for i in range(m)):
                if not unique:
                    return full, j
                if found is not None and (len(found[0]), found[1]) != (len(full), j):
                    return None
                found = found or (full, j)
    return found
