"""Output quality vs. a reference: PSNR and SSIM (one definition for autotune, the panel and benchmarks)."""
from __future__ import annotations

import math

import torch


def psnr(reference: torch.Tensor, test: torch.Tensor, data_range: float = 2.0) -> float:
    """PSNR in dB; data_range 2 for images in [-1, 1]. Arrays are taken too: some diffusers
    pipelines (DiTPipeline before 0.42) return numpy images even for output_type="pt"."""
    mse = torch.mean((torch.as_tensor(reference).double() - torch.as_tensor(test).double()) ** 2).item()
    return float("inf") if mse == 0 else 10 * math.log10(data_range ** 2 / mse)


def ssim(reference: torch.Tensor, test: torch.Tensor, window: int = 7, sigma: float = 1.5) -> float:
    """Mean SSIM (Wang et al. 2004) of images in [-1, 1], over images and channels, Gaussian window."""
    x, y = (reference.double() + 1) / 2, (test.double() + 1) / 2
    coords = torch.arange(window, dtype=torch.float64) - window // 2
    g = torch.exp(-coords ** 2 / (2 * sigma ** 2))
    kernel = (g[:, None] * g[None, :] / g.sum() ** 2).expand(x.shape[1], 1, window, window)
    blur = lambda z: torch.nn.functional.conv2d(z, kernel, groups=x.shape[1])
    mx, my = blur(x), blur(y)
    sxx, syy, sxy = blur(x * x) - mx ** 2, blur(y * y) - my ** 2, blur(x * y) - mx * my
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    value = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (sxx + syy + c2))
    return value.mean().item()
