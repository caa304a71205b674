"""Whole-step skipping at the noise-prediction level: one session per sampling run.

A step-skip method decides once per step whether the model runs at all; on a skipped step the
host returns the last prediction instead. The session owns the rule's state, the stored
predictions and the telemetry (one unit, "noise prediction"); the host adapter decides what is
stored (ComfyUI stores the noise, eps = (x - denoised) / sigma, so a reused step is denoised
again at its own sigma; diffusers stores the model output, as the official code does).

The first call of a step sees the latent the step starts from and takes the step's decision;
further calls in the same step (heun's corrector, dpm_2's midpoint, split cond/uncond calls)
follow it. A skip with nothing stored for the call (a new shape, say) computes instead.
"""
from __future__ import annotations

from typing import Any, Hashable

import torch

from .clock import StepClock
from .methods.adaptive import AdaptiveConfig, AdaptiveSkipRule
from .telemetry import RunTelemetry

UNIT_NAME = "noise prediction"


class StepSkipSession:
    def __init__(self, owner: str, config: AdaptiveConfig, clock: StepClock, family: str):
        self.owner = owner
        self.clock = clock
        self.rule = AdaptiveSkipRule(config)
        # One unit that is the whole model call: FLOP-weighted work is then the computed share.
        self.telemetry = RunTelemetry(method=self.rule.name, family=family, unit_names=[UNIT_NAME],
                                      unit_groups=["model"], num_steps=clock.num_steps,
                                      unit_flops=[1.0], call_flops=1.0)
        self._step: int | None = None
        self._compute = True
        self._stored: dict[Hashable, Any] = {}
        self.closed = False

    def begin_call(self, sigma: float | None, latent: torch.Tensor) -> tuple[int, bool]:
        """(step, run the model?) for a model call at this sigma starting from this latent."""
        step = self.clock.step_of(sigma)
        if step != self._step:
            self._step = step
            self._compute = self.rule.decide(latent)
        return step, self._compute

    def stored(self, key: Hashable) -> Any:
        return self._stored.get(key)

    def store(self, key: Hashable, value: Any) -> None:
        self._stored[key] = value

    def record(self, step: int, samples: int, reused: bool, seconds: float = 0.0) -> None:
        self.telemetry.record(step, 0, samples, reused)
        self.telemetry.add_time(step, seconds)
        self.telemetry.model_calls += 1
        self.telemetry.model_call_samples += samples
        if reused and step not in self.telemetry.skipped_steps:
            self.telemetry.skipped_steps.append(step)

    def close(self) -> RunTelemetry:
        self.closed = True
        self._stored.clear()
        self.telemetry.finish()
        return self.telemetry
