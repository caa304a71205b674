"""Procedural training data: coloured shapes on textured backgrounds, 32x32, six classes.

Nothing is downloaded: every image comes from a seeded generator, so the data, the trained
models and the classifier that grades them are reproducible on any machine.
"""
from __future__ import annotations

import math

import torch

CLASSES = ("circle", "square", "triangle", "cross", "ring", "diamond")
NUM_CLASSES = len(CLASSES)
SIZE = 32


def _grid(size: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    coords = (torch.arange(size, device=device, dtype=torch.float32) + 0.5) / size
    return coords.view(1, 1, size), coords.view(1, size, 1)   # x [1,1,S], y [1,S,1]


def _shape_masks(labels: torch.Tensor, cx, cy, r, angle, size: int) -> torch.Tensor:
    """Soft masks [B, S, S] of each sample's shape (anti-aliased over about one pixel)."""
    x, y = _grid(size, labels.device)
    dx, dy = x - cx, y - cy
    cos, sin = torch.cos(angle), torch.sin(angle)
    u, v = cos * dx + sin * dy, -sin * dx + cos * dy          # rotated frame
    dist = torch.sqrt(dx ** 2 + dy ** 2)
    # Signed distance-like fields (negative inside), one per class.
    fields = torch.stack([
        dist - r,                                                          # circle
        torch.maximum(u.abs(), v.abs()) - r * 0.85,                        # square
        torch.maximum(v - r * 0.6, (u.abs() * 1.7 - v) - r * 0.9),         # triangle (up in its frame)
        torch.minimum(torch.maximum(u.abs() - r * 0.3, v.abs() - r),
                      torch.maximum(v.abs() - r * 0.3, u.abs() - r)),     # cross
        (dist - r * 0.7).abs() - r * 0.28,                                 # ring
        (u.abs() + v.abs()) - r * 1.1,                                     # diamond
    ], dim=1)                                                              # [B, C, S, S]
    field = fields.gather(1, labels.view(-1, 1, 1, 1).expand(-1, 1, size, size)).squeeze(1)
    return torch.sigmoid(-field * size * 1.5)


def _backgrounds(batch: int, size: int, g: torch.Generator, device) -> torch.Tensor:
    """Low-contrast textures: a colour gradient plus stripes or blotches. [B, 3, S, S] in [0, 1]."""
    x, y = _grid(size, device)
    base = torch.rand(batch, 3, 1, 1, generator=g, device=device) * 0.6 + 0.2
    tilt = (torch.rand(batch, 3, 1, 1, generator=g, device=device) - 0.5) * 0.4
    direction = torch.rand(batch, 1, 1, 1, generator=g, device=device) * 2 * math.pi
    ramp = torch.cos(direction) * x + torch.sin(direction) * y
    freq = torch.randint(2, 7, (batch, 1, 1, 1), generator=g, device=device).float()
    phase = torch.rand(batch, 1, 1, 1, generator=g, device=device) * 2 * math.pi
    stripes = torch.sin(2 * math.pi * freq * ramp + phase) * 0.06
    blotch = torch.nn.functional.interpolate(torch.rand(batch, 1, 4, 4, generator=g, device=device),
                                             size=(size, size), mode="bilinear", align_corners=False) - 0.5
    return (base + tilt * ramp.unsqueeze(1).squeeze(2) + stripes + blotch * 0.12).clamp(0, 1)


def sample_batch(batch: int, g: torch.Generator, size: int = SIZE, device="cpu",
                 labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Images [B, 3, S, S] in [-1, 1] and their class labels [B]."""
    if labels is None:
        labels = torch.randint(0, NUM_CLASSES, (batch,), generator=g, device=device)
    rand = lambda *s: torch.rand(*s, generator=g, device=device)
    r = (rand(batch) * 0.12 + 0.2).view(-1, 1, 1)
    cx = (rand(batch) * 0.4 + 0.3).view(-1, 1, 1)
    cy = (rand(batch) * 0.4 + 0.3).view(-1, 1, 1)
    angle = (rand(batch) - 0.5).view(-1, 1, 1) * 0.5   # +-14 deg: squares never look like diamonds
    mask = _shape_masks(labels, cx, cy, r, angle, size).unsqueeze(1)
    background = _backgrounds(batch, size, g, device)
    # Shape colour: a saturated colour pushed away from the background's mean for contrast.
    hue = rand(batch, 3, 1, 1)
    colour = torch.where(background.mean(dim=(2, 3), keepdim=True) > 0.5, hue * 0.35, 0.65 + hue * 0.35)
    image = background * (1 - mask) + colour * mask
    return image * 2 - 1, labels
