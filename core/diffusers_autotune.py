"""Autotune on a diffusers model: the calibration samplings run the user's own call.

    result = cachekit.autotune_diffusers(pipe, lambda: pipe(prompt, generator=torch.Generator().manual_seed(0),
                                                            output_type="pt").images,
                                         method="deepcache", target="psnr", value=30)
    handle = cachekit.apply_deepcache(pipe, **result.settings)
"""
from __future__ import annotations

import time
from typing import Any, Callable

import torch

from .autotune import NO_CACHING, TuneResult, autotune, check_target, ladders
from .autotune import deepcache_branches as candidate_branches
from .diffusers_adapter import is_unet, unet_units
from .diffusers_api import _resolve, apply_deepcache, apply_fora
from .diffusers_step_skip import apply_adaptive_skip
from .methods.deepcache import max_branch

APPLY = {"deepcache": apply_deepcache, "fora": apply_fora, "adaptive": apply_adaptive_skip}


def deepcache_branches(model: torch.nn.Module) -> list[int]:
    units, _, layers_per_block = unet_units(model)
    return candidate_branches(max_branch(units, layers_per_block))


def check_fits(model: torch.nn.Module, method: str, scheduler: Any, num_inference_steps: int | None) -> None:
    """Fail now, before any calibration sampling, if `method` cannot be applied to `model`: it is
    applied with caching off and removed again, which runs every check the real trials would."""
    if method not in APPLY:
        raise ValueError(f"unknown method {method!r}; choose one of {tuple(APPLY)}")
    name = type(model).__name__
    if method == "deepcache" and not is_unet(model):
        raise ValueError(f"DeepCache needs a U-Net; got {name}. Tune fora or adaptive instead.")
    if method == "fora" and is_unet(model):
        raise ValueError(f"FORA works on DiT transformers; this model is a U-Net ({name}): tune deepcache or "
                         "adaptive instead.")
    APPLY[method](model, **NO_CACHING[method], scheduler=scheduler, num_inference_steps=num_inference_steps).remove()


def autotune_diffusers(target: Any, run: Callable[[], torch.Tensor], *, method: str, target_kind: str = "psnr",
                       value: float = 30.0, scheduler: Any = None, num_inference_steps: int | None = None,
                       data_range: float | None = None, repeats: int = 1, max_trials: int = 24,
                       progress: Callable[[int, int], None] | None = None) -> TuneResult:
    """Tune `method` on a pipeline or model. `run()` samples with a fixed seed and returns the output."""
    model, scheduler = _resolve(target, scheduler)
    check_fits(model, method, scheduler, num_inference_steps)
    check_target(target_kind, value)
    candidate_ladders = ladders(method, deepcache_branches(model)) if method == "deepcache" else None
    last = {"ideal": None}

    def sample(settings: dict | None):
        handle = None if settings is None else APPLY[method](model, **settings, scheduler=scheduler,
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
