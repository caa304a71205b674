"""Adaptive step skipping (AdaptiveDiffusion) for diffusers models: one call, like the cache methods.

    import cachekit
    handle = cachekit.apply_adaptive_skip(pipe, delta=0.01, max_skip_steps=4)
    image = pipe(prompt, num_inference_steps=50).images[0]
    handle.remove()

The model's forward is wrapped (an instance attribute, removed again by `remove()`): each call
runs through the run's CacheSession as one call-level unit, and on a skipped step the session
returns the previous output, as the official pipeline reuses `noise_pred`. The policy watches
the model's input latent; with classifier-free guidance pipelines batch [latents, latents],
whose mean change equals that of the latents. Calls within one step are told apart by their
order and input shape, so pipelines that call the model once per CFG branch reuse each branch's
own output. It stacks with apply_deepcache or apply_fora on the same model: a skipped step then
runs no unit either, and that run's telemetry says so.
"""
from __future__ import annotations

import functools
import itertools
from typing import Any

import torch

from ..core.learned_forecast import LearnedForecast, LearnedSchedule, load_learned_forecast
from ..core.lifecycle import RunLifecycle
from ..core.methods.adaptive import AdaptiveConfig, AdaptivePolicy
from ..core.session import CacheSession
from ..core.streams import SINGLE_STREAM, first_tensor
from ..core.units import call_unit_map
from . import attach
from .api import _HANDLE_ATTR, STEP_SKIP_ATTR, RunRecorder, StepTracker, _resolve, call_timestep

_OWNER_IDS = itertools.count()
_INPUT_NAMES = ("sample", "hidden_states", "x")


class StepSkipHandle(RunRecorder):
    def __init__(self, model: torch.nn.Module, config: AdaptiveConfig | None, scheduler: Any = None,
                 num_inference_steps: int | None = None, policy: Any = None):
        """`policy`: any call-level policy; AdaptiveDiffusion with `config` by default."""
        self.model = model
        self.config = config
        self.policy = policy if policy is not None else AdaptivePolicy(config)
        self.owner = f"cachekit-step-skip-{next(_OWNER_IDS)}"
        self.lifecycle = RunLifecycle(self.owner, self._new_session)
        self._units = call_unit_map(type(model).__name__)
        self._tracker = StepTracker(scheduler, num_inference_steps)
        self._step: int | None = None
        self._ordinal = 0
        self._had_instance_forward = "forward" in model.__dict__
        self._previous_forward = model.forward
        # A plain function (not a bound method) so that it can carry the forward's signature.
        model.forward = functools.wraps(self._previous_forward)(lambda *a, **k: self._forward(*a, **k))
        setattr(model, STEP_SKIP_ATTR, self)
        # A copy (deepcopy, pickle, torch.save) of the model is plain: the forward it had before.
        self._copy_token = attach.exclude_from_copies(
            model, attrs=(STEP_SKIP_ATTR,), forward=model.__dict__["forward"],
            previous_forward=self._previous_forward if self._had_instance_forward else None)

    def remove(self) -> None:
        self.finish_run()
        if self._had_instance_forward:
            self.model.forward = self._previous_forward
        else:
            self.model.__dict__.pop("forward", None)
        if getattr(self.model, STEP_SKIP_ATTR, None) is self:
            delattr(self.model, STEP_SKIP_ATTR)
        attach.include_again(self.model, self._copy_token)

    def _new_session(self) -> CacheSession:
        return self._tracker.open_session(self.owner, self._units, self.policy, range(self._tracker.num_steps))

    def _forward(self, *args, **kwargs):
        t = call_timestep(args, kwargs)
        x = args[0] if args and isinstance(args[0], torch.Tensor) else next(
            (kwargs[name] for name in _INPUT_NAMES if isinstance(kwargs.get(name), torch.Tensor)), first_tensor(kwargs))
        new_run, step, sigma = self._tracker.locate(t, self.session is not None)
        if new_run:
            self.lifecycle.open()
        session = self.session
        self._ordinal = 0 if step != self._step else self._ordinal + 1
        self._step = step
        key = (self._ordinal, tuple(x.shape), x.dtype)
        cache = getattr(self.model, _HANDLE_ATTR, None)
        peers = (cache.session,) if cache is not None and cache.session is not None else ()
        with session.call_scope(sigma=sigma, layout=SINGLE_STREAM, samples=x.shape[0]) as call:
            return session.run_call(call, lambda: self._previous_forward(*args, **kwargs), probe=x, key=key,
                                    peers=peers)


def apply_adaptive_skip(target: Any, *, delta: float = 0.01, max_skip_steps: int = 4, scheduler: Any = None,
                        num_inference_steps: int | None = None, official_cap: bool = False,
                        reuse: str = "hold", warmup_steps: int = 4,
                        learned_forecast: Any = None) -> StepSkipHandle:
    """AdaptiveDiffusion step skipping on any diffusers denoiser (U-Net or transformer).

    At most `max_skip_steps` steps are skipped in a row; `official_cap=True` applies the official
    code's cap instead, whose first run of skips after the warm-up may be 5 long. `reuse`: what a
    skipped step returns, "hold" (the previous output, as published) or "forecast1"/"forecast2"
    (extrapolated from the last computed steps). `warmup_steps`: steps that always run first (4, the
    official, or more). `learned_forecast`: a file (or LearnedForecast) of corrections trained for this
    model on top of reuse="forecast2" (core/learned_forecast.py); with delta 1.0 and max_skip_steps 1
    the skips follow the every-other-step schedule such files are trained on."""
    model, scheduler = _resolve(target, scheduler)
    if getattr(model, STEP_SKIP_ATTR, None) is not None:
        raise ValueError("This model already has adaptive step skipping; call remove() on its handle first.")
    config = AdaptiveConfig(delta, max_skip_steps, official_cap, reuse, warmup_steps)
    if learned_forecast is not None:
        learned_forecast = _learned_forecast(learned_forecast, num_inference_steps)
    policy = AdaptivePolicy(config, learned=learned_forecast)
    return StepSkipHandle(model, config, scheduler, num_inference_steps, policy=policy)


def apply_learned_forecast(target: Any, learned_forecast: Any, *, scheduler: Any = None,
                           num_inference_steps: int | None = None) -> StepSkipHandle:
    """Skip the steps a learned forecast file was trained to skip, and forecast them with its
    corrections (core/learned_forecast.py): a fixed schedule (e.g. TaylorSeer's one step in N after
    a warm-up), trained for one model, sampler and step count by scripts/scan_learned_forecast.py."""
    model, scheduler = _resolve(target, scheduler)
    if getattr(model, STEP_SKIP_ATTR, None) is not None:
        raise ValueError("This model already has step skipping; call remove() on its handle first.")
    policy = LearnedSchedule(_learned_forecast(learned_forecast, num_inference_steps))
    return StepSkipHandle(model, None, scheduler, num_inference_steps, policy=policy)


def _learned_forecast(value: Any, num_inference_steps: int | None) -> LearnedForecast:
    """A LearnedForecast, or one loaded from a file; a step count known now is checked now, not at
    the first model call."""
    forecast = value if isinstance(value, LearnedForecast) else load_learned_forecast(value)
    if num_inference_steps is not None:
        forecast.check_steps(num_inference_steps)
    return forecast
