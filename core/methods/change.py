"""Change-driven caching: the First Block Cache / TeaCache / EasyCache family as one online policy.

Each model call first computes the probe unit (the model's first unit: a DiT's first attention
or block, a U-Net's first down layer). Its value (the residual for residual units, the output
otherwise) is compared with the probe's value at the last step that computed everything:

    change = mean|probe - probe_at_last_full_step| / mean|probe_at_last_full_step|

which is diffusers' FirstBlockCache measure (hooks/first_block_cache.py), i.e. the probe's
change accumulated since the last full step. The step reuses when change < threshold, and
then the remaining units (a DiT's other blocks; a U-Net's deep part below `cache_branch`, as
DeepCache) return their stored values through the step's reuse strategy (hold, or forecast from
their last refreshes); the probe is never reused, so every step measures. Otherwise everything
computes and the probe becomes the new reference.

Guards that the published methods leave to the user: no reuse outside the [start_percent,
end_percent) window nor in its first `warmup_steps` steps, and at most `max_reuse` reused steps
in a row (0: no cap). Threshold 0 never reuses: the output equals the unpatched model's.

One decision per step, taken by the step's first call (later calls of the step, e.g. split
cond/uncond or a second-order sampler's corrector, follow it); the measure passes the agreement
point first, so every rank of a multi-GPU run decides alike.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..reuse import strategy_from_name
from ..units import UnitMap
from .base import check_int, check_percent_range
from .deepcache import check_branch, check_reuse, deep_row

PROBE = 0     # the probe unit: the first unit the model runs


@dataclass(frozen=True)
class ChangeConfig:
    threshold: float = 0.1
    warmup_steps: int = 2
    max_reuse: int = 3
    cache_branch: int = 0
    start_percent: float = 0.0
    end_percent: float = 1.0
    reuse: str = "hold"

    def __post_init__(self) -> None:
        t = self.threshold
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0.0 <= t < float("inf"):
            raise ValueError(f"threshold must be a number >= 0, got {t!r}. 0 never reuses; 0.05-0.2 is typical "
                             "(larger reuses more).")
        check_int("warmup_steps", self.warmup_steps, 0, "The first steps of the window always compute; 2 is typical.")
        check_int("max_reuse", self.max_reuse, 0, "At most this many reused steps in a row; 0 removes the cap.")
        check_int("cache_branch", self.cache_branch, 0, "0 keeps the shallowest U-Net branch live (fastest).")
        check_percent_range(self.start_percent, self.end_percent)
        check_reuse(self.reuse)


@dataclass
class ChangeState:
    """One run's decision state."""
    window: range
    streak: int = 0                                        # reused steps in a row
    scores: dict[int, float] = field(default_factory=dict)  # step -> agreed change


def probe_change(probe: torch.Tensor, reference: torch.Tensor | None) -> torch.Tensor | None:
    """FirstBlockCache's relative change; None without a comparable reference."""
    if reference is None or reference.shape != probe.shape:
        return None
    return (probe - reference).abs().mean() / reference.abs().mean()


@dataclass(frozen=True)
class ChangePolicy:
    config: ChangeConfig
    name: str = "ChangeCache"
    level: str = "unit"
    online: bool = True
    probe_label: str = "change since last full step"

    @property
    def reuse(self):
        return strategy_from_name(self.config.reuse)

    def validate(self, units: UnitMap) -> None:
        if units.geometry is not None:
            check_branch(units, self.config.cache_branch)

    def probe_unit(self, units: UnitMap) -> int:
        return PROBE

    def skip_row(self, units: UnitMap) -> list[bool]:
        """[unit]: reused on a step that reuses. A U-Net: DeepCache's deep part at cache_branch;
        otherwise every unit outside the probe's group (a DiT's other blocks). Never the probe."""
        if units.geometry is not None:
            row = deep_row(units, self.config.cache_branch)
        else:
            group = units.units[PROBE].group
            row = [u.group != group for u in units.units]
        row[PROBE] = False
        return row

    def start(self, units: UnitMap, num_steps: int, window: range) -> ChangeState:
        return ChangeState(window)

    def measure(self, state: ChangeState, step: int, probe: tuple) -> torch.Tensor | None:
        """probe: (this call's probe value, the value at the last full step or None)."""
        return probe_change(*probe)

    def decide(self, state: ChangeState, step: int, change) -> bool:
        """True = compute everything at this step."""
        config = self.config
        if change is not None:
            state.scores[step] = float(change)
        window = state.window
        allowed = (step in window and step - window.start >= config.warmup_steps
                   and (config.max_reuse == 0 or state.streak < config.max_reuse))
        if allowed and change is not None and float(change) < config.threshold:
            state.streak += 1
            return False
        state.streak = 0
        return True

    def score(self, state: ChangeState, step: int) -> float | None:
        """What the step's decision compared with the threshold (the sidebar shows it)."""
        return state.scores.get(step)
