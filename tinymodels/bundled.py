"""Load the bundled tiny models (fp16 safetensors shipped in tinymodels/weights/)."""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from .architectures import BUILDERS, Denoiser
from .classifier import ShapeClassifier

WEIGHTS = Path(__file__).resolve().parent / "weights"
KINDS = ("dit", "unet")


def weights_path(kind: str) -> Path:
    return WEIGHTS / f"{kind}.safetensors"


def _load_into(model: torch.nn.Module, path: Path) -> torch.nn.Module:
    if not path.is_file():
        raise FileNotFoundError(f"Bundled weights {path.name} are missing; train them with "
                                f"`python scripts/train_tiny.py {path.stem} --minutes N`.")
    state = {k: v.float() for k, v in load_file(str(path)).items()}
    model.load_state_dict(state)
    return model.eval().requires_grad_(False)


def load(kind: str) -> Denoiser:
    """A bundled model, fp32 on CPU, ready to sample."""
    if kind not in KINDS:
        raise ValueError(f"unknown bundled model {kind!r}; choose one of {KINDS}")
    return Denoiser(kind, _load_into(BUILDERS[kind](), weights_path(kind)))


def load_classifier() -> ShapeClassifier:
    return _load_into(ShapeClassifier(), WEIGHTS / "classifier.safetensors")
