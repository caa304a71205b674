"""AdaptiveDiffusion (Ye et al., 2024; UniModal4Reasoning/AdaptiveDiffusion): skip whole steps.

Reference semantics, as the official `sparse_pipeline.py` decides them. Let L_k be the latent
after step k (the initial noise is not part of the trajectory) and d_k = mean|L_k - L_(k-1)|.

* Steps 0-3 always run the model (`warmup_steps`, 4 by default, runs more: not in the paper).
* After step k >= 3 the next step is decided from the third-order difference of the latents,
  measured relative to the first-order one: step k+1 reuses the last noise prediction when
  |(d_k + d_(k-2)) / 2 - d_(k-1)| <= delta * d_(k-1), and runs the model otherwise.
* Cap: a step runs when the last `max_skip_steps` decisions all skipped. The official check is
  `len(mask) > 4 and not any(mask[-max_skip_steps:])`: it only starts once more than 4
  decisions exist, so with max_skip_steps 1-3 the first run of skips after the warm-up may be 5
  long (and with 5 or more it is cut at 5). CacheKit by default also applies the cap as soon as
  max_skip_steps decisions exist, so no more than max_skip_steps steps are ever skipped in a row;
  this differs from the official decisions only for max_skip_steps 1-3, only in that first run
  of skips. `official_cap=True` reproduces the official decisions exactly (tests compare both).
* One decision per step for the whole batch (the mean runs over every sample and channel).

`reuse` (not in the paper): "hold" reuses the last noise prediction as published; "forecast1" /
"forecast2" extrapolate it from the last computed steps (Taylor order 1 or 2 over the step gaps,
core/reuse.py), which the skip decisions do not depend on. With max_skip_steps 1 a skipped step
always follows a computed one, so its forecast reaches one step ahead; at delta 1.0 (nearly
every candidate step passes the rule) every other step then skips, a fixed, batch-independent
schedule that on the bundled tiny models is the most accurate step skipping at up to 1.8x.

The rule is fed, step by step, the latent each step starts from: that is L_(k-1) for step k,
so its decision for step k uses exactly the latents the official code has at that point.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..reuse import strategy_from_name
from .deepcache import check_reuse

WARMUP_STEPS = 4     # the official code computes while it holds <= 3 latents: the rule needs d_1..d_3


@dataclass(frozen=True)
class AdaptiveConfig:
    delta: float = 0.01
    max_skip_steps: int = 4
    official_cap: bool = False     # True: the official `len(mask) > 4` cap (see the module docstring)
    reuse: str = "hold"            # hold: the previous prediction (official); forecast1/2: extrapolated
    # Steps computed before the rule may skip: 4 is the official (the fewest the rule can decide
    # from). A longer warm-up pays off with forecast reuse: the noisiest steps extrapolate worst.
    warmup_steps: int = WARMUP_STEPS

    def __post_init__(self) -> None:
        if isinstance(self.delta, bool) or not isinstance(self.delta, (int, float)) or not self.delta >= 0:
            raise ValueError(f"delta must be a number >= 0, got {self.delta!r}. 0.01 is the official default; "
                             "0 never skips, larger values skip more.")
        if isinstance(self.max_skip_steps, bool) or not isinstance(self.max_skip_steps, int) or self.max_skip_steps < 1:
            raise ValueError(f"max_skip_steps must be an integer >= 1, got {self.max_skip_steps!r}. "
                             "4 is the official default.")
        if not isinstance(self.official_cap, bool):
            raise ValueError(f"official_cap must be True or False, got {self.official_cap!r}.")
        check_reuse(self.reuse)
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or \
                self.warmup_steps < WARMUP_STEPS:
            raise ValueError(f"warmup_steps must be an integer >= {WARMUP_STEPS}, got {self.warmup_steps!r}. "
                             f"{WARMUP_STEPS} is the official warm-up: the rule needs three latent differences.")


class AdaptiveSkipRule:
    """Online state of one sampling run. `decide(latent)` once per step: True = run the model."""

    name = "AdaptiveDiffusion"

    def __init__(self, config: AdaptiveConfig):
        self.config = config
        self.steps_seen = 0
        self._previous: torch.Tensor | None = None
        self._diffs: list[torch.Tensor] = []    # d_1, d_2, ... (0-d tensors, as the official)
        self.mask: list[bool] = []              # decisions after the warm-up: True = computed
        self.scores: dict[int, float] = {}      # step -> |third-order diff| / d_(k-1), what delta bounds

    def decide(self, latent: torch.Tensor) -> bool:
        return self.decide_from(self.measure(latent))

    def measure(self, latent: torch.Tensor) -> torch.Tensor | None:
        """d_k = mean|L_k - L_(k-1)| for the latent this step starts from (None before there is one)."""
        if self.steps_seen == 0:     # the initial noise: not part of the official trajectory
            return None
        latent = latent.detach()
        diff = (latent - self._previous).abs().mean() if self._previous is not None else None
        self._previous = latent
        return diff

    def decide_from(self, diff: torch.Tensor | None) -> bool:
        """The step's decision from its (rank-agreed) d_k. True = run the model."""
        n = self.steps_seen
        self.steps_seen += 1
        if n < self.config.warmup_steps:
            if diff is not None:
                self._diffs.append(diff)
            return True
        prev_diff, prev_prev_diff = self._diffs[-1], self._diffs[-2]
        self._diffs.append(diff)
        if float(prev_diff) > 0:     # for the telemetry only; the decision below is the official arithmetic
            self.scores[n] = float(abs((diff + prev_prev_diff) / 2 - prev_diff) / prev_diff)
        compute = self._estimate(diff, prev_diff, prev_prev_diff)
        self.mask.append(compute)
        return compute

    def _estimate(self, cur: torch.Tensor, prev: torch.Tensor, prev_prev: torch.Tensor) -> bool:
        k = self.config.max_skip_steps
        # The official cap starts at 5 decisions; ours also as soon as k decisions exist.
        enough = len(self.mask) > 4 or (not self.config.official_cap and len(self.mask) >= k)
        if enough and not any(self.mask[-k:]):
            return True
        # Tensor arithmetic in the latent's dtype, as the official, so ties round the same way.
        return not bool(abs((cur + prev_prev) / 2 - prev) <= prev * self.config.delta)


@dataclass(frozen=True)
class AdaptivePolicy:
    """AdaptiveDiffusion as an online, call-level policy of a CacheSession: one decision per step
    for the whole model call, from the latent the step starts from (agreed across ranks)."""
    config: AdaptiveConfig
    name: str = "AdaptiveDiffusion"
    level: str = "call"
    online: bool = True
    probe_label: str = "third-order latent change / first-order (skips below delta)"
    # The rule reads how smoothly the latents change; a sampler that injects noise every step
    # (ancestral, SDE) defeats it, so with one it skips nothing (core/guards.py).
    needs_deterministic_sampler: ClassVar[bool] = True

    # Corrections trained for this model on top of forecast2 (core/learned_forecast.py), or None.
    learned: Any = None

    def __post_init__(self) -> None:
        if self.learned is not None and self.config.reuse != "forecast2":
            raise ValueError(f"a learned forecast corrects reuse='forecast2'; got reuse={self.config.reuse!r}. "
                             "Set reuse='forecast2' or leave the learned forecast out.")

    @property
    def reuse(self):
        """How a skipped step's prediction is made from the computed ones (core/reuse.py)."""
        return self.learned if self.learned is not None else strategy_from_name(self.config.reuse)

    def start(self, units, num_steps: int, window: range) -> AdaptiveSkipRule:
        if self.learned is not None:
            self.learned.check_steps(num_steps)
        return AdaptiveSkipRule(self.config)

    def measure(self, rule: AdaptiveSkipRule, step: int, latent: torch.Tensor) -> torch.Tensor | None:
        return rule.measure(latent)

    def decide(self, rule: AdaptiveSkipRule, step: int, diff: torch.Tensor | None) -> bool:
        return rule.decide_from(diff)

    def score(self, rule: AdaptiveSkipRule, step: int) -> float | None:
        """What delta was compared with at this step (None in the warm-up)."""
        return rule.scores.get(rule.steps_seen - 1)
