"""Router training on diffusers DiT-style models (the loop itself is core/routers/train.py)."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Callable

import torch

from ..core.routers.format import Router
from ..core.routers.train import Sampler, TrainConfig, train_units
from .units import dit_units


def diffusers_sampler(model: torch.nn.Module, scheduler: Any, num_steps: int,
                      make_batch: Callable[[torch.Generator, int], tuple],
                      call: Callable[[torch.nn.Module, torch.Tensor, Any, Any], torch.Tensor]) -> Sampler:
    """A diffusers scheduler loop: call(model, x, t, cond) is the noise prediction (CFG included)."""
    scheduler = copy.deepcopy(scheduler)
    scheduler.set_timesteps(num_steps)
    timesteps = list(scheduler.timesteps)
    return Sampler(num_steps, make_batch, lambda x, k, cond: call(model, x, timesteps[k], cond),
                   lambda out, k, x: scheduler.step(out, timesteps[k], x).prev_sample)


def train_router(model: torch.nn.Module, scheduler: Any, make_batch: Callable[[torch.Generator, int], tuple],
                 call: Callable[[torch.nn.Module, torch.Tensor, Any, Any], torch.Tensor], config: TrainConfig, *,
                 family: str = "dit", checkpoint: Path | None = None, resume: bool = False,
                 progress: Callable[[int, int, float], None] | None = None, distributed: Any = None) -> Router:
    """Train a router for a diffusers DiT / PixArt transformer sampled with `scheduler`.

    make_batch(generator, batch) -> (x_T, conditioning); call(model, x, t, conditioning) -> the
    noise prediction used by the sampler (CFG included), as the sampling code computes it.
    `distributed`: a torch.distributed module already initialised; gradients are averaged over
    its processes (each draws its own batches).
    `config.reuse` ("hold", "forecast1", "forecast2"): the reuse strategy the router is trained
    for: during training a gate blends with what that strategy would reuse (core/routers/train.py
    says which steps refresh a unit); the router records it and apply_router runs it by default.
    """
    units, slots = dit_units(model)
    sampler = diffusers_sampler(model, scheduler, config.num_steps, make_batch, call)
    model.requires_grad_(False)
    router = train_units([slot.get() for slot in slots], [u.kind for u in units.units], sampler, config,
                         family=family, checkpoint=checkpoint, resume=resume, progress=progress,
                         distributed=distributed)
    router.sampler = type(scheduler).__name__
    return router
