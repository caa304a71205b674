"""The official Learning-to-Cache router files (horseee/learning-to-cache), read without pickle risk.

They are `torch.save` pickles. They are opened only with `torch.load(weights_only=True)`, whose
unpickler builds tensors and plain containers and nothing else; the one extra class allowed is
`argparse.Namespace` (the DiT files keep their training arguments in it). Anything else, such as a
pickle that would call a function, is refused before any object is built, and no code runs.

* DiT (`DDIM20_router.pt`, `DDIM50_router.pt`): {"routers": {"{r}.prob": float[2 * depth]}, "opt",
  "args"}. Router r belongs to the respaced timestep index r (0 = the least noisy), so sampling
  step k uses router T-1-k; logit 2i is block i's attention, 2i+1 its MLP.
* U-ViT (`dpm20_router.pth`, ...): {"{r}.prob": float[2 * depth]} saved on a GPU. Converted
  as stored (official router order); CacheKit has no U-ViT host to apply them to.
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path

import torch

from .format import Router, RouterError
from .safe_load import RefusedGlobal, UnreadableCheckpoint, load_weights_only
from .sniff import wrong_content

ALLOWED_GLOBALS = [argparse.Namespace]
DIT_THRESHOLD = 0.1            # the official README's inference threshold for DiT-XL/2 (DDIM 20 and 50)


def space_timesteps(num_timesteps: int, count: int) -> list[int]:
    """The official DiT respacing for `create_diffusion(str(count))`: `count` evenly spread
    timesteps of `num_timesteps`, rounded as the official accumulating loop rounds them."""
    stride = (num_timesteps - 1) / (count - 1) if count > 1 else 1
    steps, position = [], 0.0
    for _ in range(count):
        steps.append(round(position))
        position += stride
    return sorted(set(steps))


def _torch_load(path: Path):
    wrong = wrong_content(path, "torch")
    if wrong:
        raise RouterError(wrong)
    try:
        return load_weights_only(path, ALLOWED_GLOBALS)
    except RefusedGlobal as refused:
        raise RouterError(f"{path.name} was refused: it asks to build {refused.name}, and only tensors, plain "
                          f"containers and {', '.join(c.__name__ for c in ALLOWED_GLOBALS)} are allowed. It is not "
                          "an official L2C router; CacheKit never runs code from a file.") from refused
    except UnreadableCheckpoint as error:
        raise RouterError(f"{path.name} is not a readable PyTorch router file: it is damaged (truncated?) or not an "
                          "official L2C router.") from error


def _prob_rows(table, path: Path) -> torch.Tensor:
    if not isinstance(table, dict) or not table:
        raise RouterError(f"{path.name}: expected a table of '<index>.prob' tensors")
    rows = {}
    for key, value in table.items():
        match = re.fullmatch(r"(\d+)\.prob", str(key))
        if match is None or not isinstance(value, torch.Tensor) or value.ndim != 1:
            raise RouterError(f"{path.name}: unexpected router entry {key!r}")
        rows[int(match.group(1))] = value.float()
    if sorted(rows) != list(range(len(rows))):
        raise RouterError(f"{path.name}: router indices are not 0..{len(rows) - 1}")
    widths = {v.numel() for v in rows.values()}
    if len(widths) != 1 or next(iter(widths)) % 2:
        raise RouterError(f"{path.name}: routers have inconsistent or odd lengths {sorted(widths)}")
    return torch.stack([rows[i] for i in range(len(rows))])


def load_official(path: str | Path, threshold: float | None = None) -> Router:
    """An official L2C router file as a Router (DiT: rows put in sampling order)."""
    path = Path(path)
    if not path.is_file():
        raise RouterError(f"router file not found: {path}")
    data = _torch_load(path)
    if isinstance(data, dict) and "routers" in data:            # DiT
        by_index = _prob_rows(data["routers"], path)
        steps = by_index.shape[0]
        args = data.get("args")
        if isinstance(args, argparse.Namespace) and getattr(args, "num_sampling_steps", steps) != steps:
            raise RouterError(f"{path.name}: trained for {args.num_sampling_steps} steps but holds {steps} routers")
        timesteps = [float(t) for t in reversed(space_timesteps(1000, steps))]
        return Router(by_index.flip(0).contiguous(), "l2c", "dit", by_index.shape[1] // 2, ("attn", "mlp"), "ddim",
                      timesteps, DIT_THRESHOLD if threshold is None else threshold,
                      f"official L2C DiT router {path.name}")
    if isinstance(data, dict):                                   # U-ViT
        by_index = _prob_rows(data, path)
        return Router(by_index.contiguous(), "l2c", "uvit", by_index.shape[1] // 2, ("attn", "mlp"), "dpm_solver",
                      [], 0.5 if threshold is None else threshold,
                      f"official L2C U-ViT router {path.name} (rows in official router order)")
    raise RouterError(f"{path.name}: not an official L2C router (found {type(data).__name__})")
