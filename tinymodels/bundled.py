"""Load the bundled tiny models (fp16 safetensors shipped in tinymodels/weights/)."""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from .architectures import BUILDERS, Denoiser
from .classifier import ShapeClassifier

WEIGHTS = Path(__file__).resolve().parent / "weights"
KINDS = ("dit", "unet")
# Corrections to the skipped-step forecast trained for the bundled DiT (core/learned_forecast.py):
# 25 DDIM steps, every other step skipped after 4 (scripts/scan_learned_forecast.py --save-dir).
DIT_FORECAST = WEIGHTS / "dit_forecast_n2_25.safetensors"


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


# The bundled DyDiT: the DiT fine-tuned with DyDiT routers (tinymodels/train_dydit.py, lambda 0.5),
# fp16 weights plus a router side-car (core/dydit/sidecar.py).
DYDIT = "dit_dydit_50"


def dydit_paths(name: str = DYDIT) -> tuple[Path, Path]:
    """(the fine-tuned DiT's weights, its router side-car)."""
    return WEIGHTS / f"{name}.safetensors", WEIGHTS / f"{name}.routers.safetensors"


def load_dydit(name: str = DYDIT):
    """The bundled tiny DyDiT: (Denoiser of the fine-tuned DiT, fp32 on CPU; its DyDiTRouters).
    Run it with `cachekit.apply_dydit(denoiser.network, routers)`; without it, the DiT runs dense."""
    from ..core.dydit.sidecar import load_routers
    weights, routers = dydit_paths(name)
    missing = [p.name for p in (weights, routers) if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"The bundled DyDiT file(s) {', '.join(missing)} are missing; train them with "
                                "`python scripts/train_dydit.py --lam LAMBDA --minutes N` (files dit_dydit_<100 x "
                                "LAMBDA>.*).")
    return Denoiser("dit", _load_into(BUILDERS["dit"](), weights)), load_routers(routers)


def load_classifier() -> ShapeClassifier:
    return _load_into(ShapeClassifier(), WEIGHTS / "classifier.safetensors")
