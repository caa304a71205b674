"""What the preview panel runs, without any gradio: sample a bundled model uncached and cached.

Kept separate from the UI so tests (and scripts) can call it directly and compare with what
the panel's API returns.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from ..core import apply_adaptive_skip, apply_deepcache, apply_fora, apply_router
from ..tinymodels.bundled import WEIGHTS, load
from ..tinymodels.evaluate import to_uint8
from ..core.quality import psnr
from ..tinymodels.sampling import make_scheduler, sample
from ..tinymodels.shapes import CLASSES

MODELS = {"dit": "Tiny DiT (FORA)", "unet": "Tiny U-Net (DeepCache)"}
METHODS = {"dit": ("FORA", "AdaptiveDiffusion", "Router"), "unet": ("DeepCache", "AdaptiveDiffusion")}
# A HarmoniCa router trained on the bundled DiT (scripts/train_router.py) for the panel's 25 steps.
BUNDLED_ROUTER = WEIGHTS / "dit_router_harmonica_25.safetensors"


@dataclass(frozen=True)
class Request:
    model: str = "unet"
    method: str = "DeepCache"
    interval: int = 3
    branch: int = 0
    class_name: str = CLASSES[0]
    seed: int = 0
    steps: int = 25
    cfg: float = 3.0
    images: int = 4
    delta: float = 0.05             # AdaptiveDiffusion only
    # FORA only: the share of steps computed in full before reuse starts. The bundled DiT's
    # features move fast early on (bench: 13 dB from step 0 vs 27 dB from 20 % at N=2).
    start_percent: float = 0.2

    def check(self) -> None:
        if self.model not in MODELS:
            raise ValueError(f"Unknown model {self.model!r}; choose one of {list(MODELS)}.")
        if self.method not in METHODS[self.model]:
            raise ValueError(f"{self.method} does not apply to the {self.model} model; use {METHODS[self.model]}.")
        if self.class_name not in CLASSES:
            raise ValueError(f"Unknown class {self.class_name!r}; choose one of {list(CLASSES)}.")
        if not 1 <= self.images <= 16:
            raise ValueError("images must be between 1 and 16.")
        if not 2 <= self.steps <= 200:
            raise ValueError("steps must be between 2 and 200.")
        if not 0.0 <= self.start_percent < 1.0:
            raise ValueError("start_percent must be at least 0 and below 1 "
                             "(the share of steps computed in full before FORA reuses anything).")


@dataclass
class Result:
    uncached: np.ndarray            # [N, 32, 32, 3] uint8
    cached: np.ndarray
    uncached_s: float
    cached_s: float
    psnr_db: float
    telemetry: dict = field(default_factory=dict)

    @property
    def speedup(self) -> float:
        return self.uncached_s / self.cached_s if self.cached_s else float("nan")


_MODELS: dict = {}


def model(kind: str):
    if kind not in _MODELS:
        denoiser = load(kind)
        # One short warm-up sampling: the first calls pay one-time costs that would otherwise
        # be charged to whichever run comes first and skew the measured speedup.
        sample(denoiser, torch.zeros(1, dtype=torch.long), steps=2)
        _MODELS[kind] = denoiser
    return _MODELS[kind]


def run(request: Request, progress: bool = True) -> Result:
    request.check()
    denoiser = model(request.model)
    labels = torch.full((request.images,), CLASSES.index(request.class_name))
    scheduler = make_scheduler(request.steps)
    start = time.perf_counter()
    reference = sample(denoiser, labels, steps=request.steps, cfg=request.cfg, seed=request.seed,
                       scheduler=scheduler, progress=progress)
    uncached_s = time.perf_counter() - start
    if request.method == "DeepCache":
        handle = apply_deepcache(denoiser.network, cache_interval=request.interval, cache_branch=request.branch,
                                 scheduler=scheduler)
    elif request.method == "Router":
        if not BUNDLED_ROUTER.exists():
            raise FileNotFoundError(f"The bundled router {BUNDLED_ROUTER.name} is missing; train it with "
                                    "scripts/train_router.py --steps 25.")
        handle = apply_router(denoiser.network, BUNDLED_ROUTER, scheduler=scheduler)
    elif request.method == "AdaptiveDiffusion":
        handle = apply_adaptive_skip(denoiser.network, delta=request.delta, scheduler=scheduler)
    else:
        handle = apply_fora(denoiser.network, interval=request.interval, start_percent=request.start_percent,
                            scheduler=scheduler)
    try:
        start = time.perf_counter()
        cached = sample(denoiser, labels, steps=request.steps, cfg=request.cfg, seed=request.seed,
                        scheduler=scheduler, progress=progress)
        cached_s = time.perf_counter() - start
        telemetry = handle.finish_run()
    finally:
        handle.remove()
    return Result(to_uint8(reference), to_uint8(cached), uncached_s, cached_s, psnr(reference, cached),
                  telemetry.as_dict())
