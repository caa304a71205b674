"""Autotune on a diffusers model: the calibration samplings run the user's own call.

    result = cachekit.autotune_diffusers(pipe, lambda: pipe(prompt, generator=torch.Generator().manual_seed(0),
                                                            output_type="pt").images,
                                         method="deepcache", target="psnr", value=30)
    handle = cachekit.apply_deepcache(pipe, **result.settings)
"""
from __future__ import annotations

import time
from functools import partial
from typing import Any, Callable

import torch

from ..core.autotune import METHODS, TuneResult, autotune, check_method, check_target, ladders
from ..core.methods import registry
from . import registry as host
from .api import _resolve

# key -> apply function (keyword settings, scheduler=, num_inference_steps=), for every tunable
# method of the registry.
APPLY = registry.LiveMapping(lambda: {key: partial(host.apply, method=key) for key in METHODS})


def _alternatives(kind: str) -> str:
    others = [s.key for s in registry.methods() if s.tunable and s.fits_model(kind)]
    return f"{', '.join(others[:-1])} or {others[-1]}" if len(others) > 1 else "".join(others)


def check_fits(model: torch.nn.Module, method: str, scheduler: Any, num_inference_steps: int | None) -> None:
    """Fail now, before any calibration sampling, if `method` cannot be applied to `model`: it is
    applied with caching off and removed again, which runs every check the real trials would."""
    check_method(method)
    spec = registry.get(method)
    if spec.fits == "unet":
        host.check_kind(spec, model, f" Tune {_alternatives('dit')} instead.")
    elif spec.fits == "dit":
        host.check_kind(spec, model, f" Tune {_alternatives('unet')} instead.")
    host.apply_off(model, method, scheduler=scheduler, num_inference_steps=num_inference_steps).remove()


def autotune_diffusers(target: Any, run: Callable[[], torch.Tensor], *, method: str, target_kind: str = "psnr",
                       value: float = 30.0, scheduler: Any = None, num_inference_steps: int | None = None,
                       data_range: float | None = None, repeats: int = 1, max_trials: int = 24,
                       progress: Callable[[int, int], None] | None = None) -> TuneResult:
    """Tune `method` on a pipeline or model. `run()` samples with a fixed seed and returns the output."""
    model, scheduler = _resolve(target, scheduler)
    check_fits(model, method, scheduler, num_inference_steps)
    check_target(target_kind, value)
    candidate_ladders = ladders(method, host.model_units(model, registry.get(method).fits))
    last = {"ideal": None}

    def sample(settings: dict | None):
        handle = None if settings is None else host.apply(model, method, **settings, scheduler=scheduler,
                                                          num_inference_steps=num_inference_steps)
        try:
            start = time.perf_counter()
            with torch.no_grad():
                out = run()
            seconds = time.perf_counter() - start
        finally:
            if handle is not None:
                telemetry = handle.finish_run()
                last["ideal"] = telemetry.ideal_speedup() if telemetry else None
                handle.remove()
        return out, seconds

    return autotune(sample, method, target_kind, value, data_range=data_range, repeats=repeats, max_trials=max_trials,
                    candidate_ladders=candidate_ladders, ideal_speedup=lambda: last["ideal"], progress=progress)
