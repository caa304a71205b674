"""A small CNN that grades generated samples: trained on the same procedural generator."""
from __future__ import annotations

import torch
from torch import nn

from .shapes import NUM_CLASSES


class ShapeClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.SiLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.SiLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3, padding=1), nn.SiLU(), nn.AdaptiveAvgPool2d(1),
            nn.Flatten(), nn.Linear(64, NUM_CLASSES))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)


def accuracy(classifier: ShapeClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.no_grad():
        return (classifier(images.float()).argmax(dim=1) == labels).float().mean().item()
