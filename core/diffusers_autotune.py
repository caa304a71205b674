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

from .autotune import TuneResult, autotune, ladders
from .autotune import deepcache_branches as candidate_branches
from .diffusers_adapter import is_unet, unet_units
from .diffusers_api import _resolve, apply_deepcache, apply_fora
from .diffusers_step_skip import apply_adaptive_skip
from .methods.deepcache import max_branch

APPLY = {"deepcache": apply_deepcache, "fora": apply_fora, "adaptive": apply_adaptive_skip}


def deepcache_branches(model: torch.nn.Module) -> list[int]:
    units, _, layers_per_block = unet_units(model)
    return candidate_branches(max_branch(units, layers_per_block))


def autotune_diffusers(target: Any, run: Callable[[], torch.Tensor], *, method: str, target_kind: str = "psnr",
                       value: float = 30.0, scheduler: Any = None, num_inference_steps: int | None = None,
                       data_range: float | None = None, repeats: int = 1, max_trials: int = 24,
                       progress: Callable[[int, int], None] | None = None) -> TuneResult:
    """Tune `method` on a pipeline or model. `run()` samples with a fixed seed and returns the output."""
    model, scheduler = _resolve(target, scheduler)
    if method not in APPLY:
        raise ValueError(f"unknown method {method!r}; choose one of {tuple(APPLY)}")
    if method == "deepcache" and not is_unet(model):
        raise ValueError(f"DeepCache needs a U-Net; got {type(model).__name__}. Tune fora or adaptive instead.")
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
