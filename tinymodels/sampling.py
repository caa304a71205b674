"""DDIM sampling with classifier-free guidance for the bundled tiny models."""
from __future__ import annotations

import torch
from diffusers import DDIMScheduler
from tqdm import tqdm

from .architectures import NULL_CLASS, Denoiser
from .shapes import SIZE

TRAIN_TIMESTEPS = 1000


def make_scheduler(steps: int) -> DDIMScheduler:
    scheduler = DDIMScheduler(num_train_timesteps=TRAIN_TIMESTEPS, clip_sample=True)
    scheduler.set_timesteps(steps)
    return scheduler


def sample(denoiser: Denoiser, labels: torch.Tensor, *, steps: int = 50, cfg: float = 3.0, seed: int = 0,
           scheduler: DDIMScheduler | None = None, progress: bool = False, on_step=None,
           grad: bool = False) -> torch.Tensor:
    """Images [B, 3, 32, 32] in [-1, 1]. One model call per step (uncond and cond batched).

    on_step(i, t) runs before step i's model call (peers that need the current timestep).
    grad=True keeps the graph (training something that acts during sampling end to end).
    """
    scheduler = scheduler or make_scheduler(steps)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(labels.shape[0], 3, SIZE, SIZE, generator=g)
    both = torch.cat([torch.full_like(labels, NULL_CLASS), labels])
    with torch.set_grad_enabled(grad):
        for i, t in enumerate(tqdm(scheduler.timesteps, desc="sampling", disable=not progress, leave=False)):
            if on_step is not None:
                on_step(i, t)
            eps_uncond, eps_cond = denoiser(torch.cat([x, x]), t.expand(2 * x.shape[0]), both).chunk(2)
            eps = eps_uncond + cfg * (eps_cond - eps_uncond)
            x = scheduler.step(eps, t, x).prev_sample
    return x.clamp(-1, 1)
