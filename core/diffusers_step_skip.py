"""Adaptive step skipping (AdaptiveDiffusion) for diffusers models: one call, like the cache methods.

    import cachekit
    handle = cachekit.apply_adaptive_skip(pipe, delta=0.01, max_skip_steps=4)
    image = pipe(prompt, num_inference_steps=50).images[0]
    handle.remove()

The model's forward is wrapped (an instance attribute, removed again by `remove()`): on a
skipped step the model does not run and its previous output is returned, as the official
pipeline reuses `noise_pred`. The rule watches the model's input latent; with classifier-free
guidance pipelines batch [latents, latents], whose mean change equals that of the latents.
Calls within one step are told apart by their order and input shape, so pipelines that call
the model once per CFG branch reuse each branch's own output. It stacks with apply_deepcache or
apply_fora on the same model: a skipped step then runs no unit either.
"""
from __future__ import annotations

import functools
import itertools
import time
from typing import Any

import torch

from .diffusers_api import STEP_SKIP_ATTR, RunRecorder, StepTracker, _resolve, call_timestep
from .methods.adaptive import AdaptiveConfig
from .step_skip import StepSkipSession
from .streams import first_tensor
from .telemetry import RunTelemetry

_OWNER_IDS = itertools.count()
_INPUT_NAMES = ("sample", "hidden_states", "x")


class StepSkipHandle(RunRecorder):
    def __init__(self, model: torch.nn.Module, config: AdaptiveConfig, scheduler: Any = None,
                 num_inference_steps: int | None = None):
        self.model = model
        self.config = config
        self.owner = f"cachekit-step-skip-{next(_OWNER_IDS)}"
        self.session: StepSkipSession | None = None
        self.runs: list[RunTelemetry] = []
        self._tracker = StepTracker(scheduler, num_inference_steps)
        self._step: int | None = None
        self._ordinal = 0
        self._had_instance_forward = "forward" in model.__dict__
        self._previous_forward = model.forward
        # A plain function (not a bound method) so that it can carry the forward's signature.
        model.forward = functools.wraps(self._previous_forward)(lambda *a, **k: self._forward(*a, **k))
        setattr(model, STEP_SKIP_ATTR, self)

    def remove(self) -> None:
        self.finish_run()
        if self._had_instance_forward:
            self.model.forward = self._previous_forward
        else:
            self.model.__dict__.pop("forward", None)
        if getattr(self.model, STEP_SKIP_ATTR, None) is self:
            delattr(self.model, STEP_SKIP_ATTR)

    def _forward(self, *args, **kwargs):
        t = call_timestep(args, kwargs)
        x = args[0] if args and isinstance(args[0], torch.Tensor) else next(
            (kwargs[name] for name in _INPUT_NAMES if isinstance(kwargs.get(name), torch.Tensor)), first_tensor(kwargs))
        new_run, _, sigma = self._tracker.locate(t, self.session is not None)
        if new_run:
            self.finish_run()
            self.session = StepSkipSession(self.owner, self.config, self._tracker.clock, type(self.model).__name__)
        step, compute = self.session.begin_call(sigma, x)
        self._ordinal = 0 if step != self._step else self._ordinal + 1
        self._step = step
        key = (self._ordinal, tuple(x.shape), x.dtype)
        if not compute:
            stored = self.session.stored(key)
            if stored is not None:
                self.session.record(step, x.shape[0], reused=True)
                return stored
        started = time.perf_counter()
        out = self._previous_forward(*args, **kwargs)
        self.session.store(key, out)
        self.session.record(step, x.shape[0], reused=False, seconds=time.perf_counter() - started)
        return out


def apply_adaptive_skip(target: Any, *, delta: float = 0.01, max_skip_steps: int = 4, scheduler: Any = None,
                        num_inference_steps: int | None = None, official_cap: bool = False) -> StepSkipHandle:
    """AdaptiveDiffusion step skipping on any diffusers denoiser (U-Net or transformer).

    At most `max_skip_steps` steps are skipped in a row; `official_cap=True` applies the official
    code's cap instead, whose first run of skips after the warm-up may be 5 long."""
    model, scheduler = _resolve(target, scheduler)
    if getattr(model, STEP_SKIP_ATTR, None) is not None:
        raise ValueError("This model already has adaptive step skipping; call remove() on its handle first.")
    return StepSkipHandle(model, AdaptiveConfig(delta, max_skip_steps, official_cap), scheduler, num_inference_steps)
