"""The sampling step of a model call, derived from the sampler, never from counting calls.

Samplers such as heun or dpm_2 call the model more than once per step, and multi-GPU setups
may split one step's calls across processes, so counting forward calls gives wrong steps.
The clock follows the sampler instead:

* the host reports each finished sampler step (ComfyUI's sampler callback gives its index);
  the calls after step i's report belong to step i + 1, so a heun corrector call (evaluated at
  the next sigma) still counts as part of the step that made it;
* a sampler that reports nothing is followed by sigma: a call at sigma s belongs to step i when
  sigmas[i] >= s > sigmas[i + 1]. The clock switches to this mode as soon as sigma has moved
  two steps past the last report, so at most one step is misattributed.
"""
from __future__ import annotations

from bisect import bisect_right
from typing import Sequence


class StepClock:
    def __init__(self, sigmas: Sequence[float], follow_sigma: bool = False):
        sigmas = [float(s) for s in sigmas]
        if len(sigmas) < 2:
            raise ValueError("a sampling schedule needs at least two sigmas (one step)")
        self.sigmas = sigmas
        self.num_steps = len(sigmas) - 1
        # Descending schedule negated for bisect (bisect needs ascending order).
        self._neg = [-s for s in sigmas]
        self._reported: int = 0       # first step not yet reported finished
        self._follow_sigma = follow_sigma   # hosts without step reports (diffusers)

    def step_finished(self, index: int) -> None:
        """The sampler finished step `index` (0-based)."""
        self._reported = max(self._reported, int(index) + 1)

    def sigma_step(self, sigma: float) -> int:
        """Step i with sigmas[i] >= sigma > sigmas[i + 1] (clamped to the schedule)."""
        # Small tolerance: the model may receive a sigma that went through a dtype cast and
        # came out a hair above sigmas[i].
        i = bisect_right(self._neg, -sigma * (1 - 1e-5)) - 1
        return min(max(i, 0), self.num_steps - 1)

    def step_of(self, sigma: float | None) -> int:
        if sigma is not None:
            by_sigma = self.sigma_step(sigma)
            if self._follow_sigma or by_sigma > self._reported + 1:
                self._follow_sigma = True
                return by_sigma
        return min(self._reported, self.num_steps - 1)


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
