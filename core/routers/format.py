"""CacheKit's router format: one safetensors file, tensors and text metadata only (no pickle).

    logits    float32 [num_steps, units]   row k = sampling step k (k = 0 is the noisiest step);
                                            sigmoid(logit) > threshold means "recompute"
    metadata  format=cachekit-router, version=1, method=l2c|harmonica, family (e.g. dit),
              depth, layout (sub-layers per block, e.g. attn,mlp), sampler, num_steps,
              timesteps (JSON list in sampling order), threshold, source,
              reuse (optional: the reuse strategy the router was trained for, core/reuse.py:
              hold | forecast1 | forecast2; absent in files from before it = hold)

Column 2i + j is block i's j-th sub-layer in `layout` (for DiT: 2i attention, 2i+1 MLP, the
official L2C order).

`reuse` is an optional field of version 1: older CacheKit versions ignore it (and run hold),
files without it load as hold. A router's decisions were learned against its reuse, so
applying it runs that reuse unless the caller overrides it (core/methods/router.py).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..reuse import STRATEGIES
from .sniff import wrong_content

FORMAT, VERSION = "cachekit-router", "1"
METHODS = ("l2c", "harmonica")


class RouterError(ValueError):
    """A router file or router that cannot be used; the message says what is wrong."""


@dataclass
class Router:
    logits: torch.Tensor                 # [num_steps, depth * len(layout)]
    method: str
    family: str
    depth: int
    layout: tuple[str, ...] = ("attn", "mlp")
    sampler: str = "ddim"
    timesteps: list[float] = field(default_factory=list)
    threshold: float = 0.1
    source: str = ""
    reuse: str = "hold"                  # the reuse strategy it was trained for (core/reuse.py)

    def __post_init__(self) -> None:
        self.validate()

    @property
    def num_steps(self) -> int:
        return int(self.logits.shape[0])

    @property
    def num_units(self) -> int:
        return int(self.logits.shape[1])

    def validate(self) -> None:
        if self.method not in METHODS:
            raise RouterError(f"router method must be one of {METHODS}, got {self.method!r}")
        if not isinstance(self.logits, torch.Tensor) or self.logits.ndim != 2 or not self.logits.is_floating_point():
            raise RouterError("router logits must be a 2-D float tensor [steps, units]")
        if self.depth < 1 or not self.layout:
            raise RouterError(f"router depth ({self.depth}) and layout ({self.layout}) must be non-empty")
        if self.num_units != self.depth * len(self.layout):
            raise RouterError(f"router has {self.num_units} logits per step, but depth {self.depth} x layout "
                              f"{','.join(self.layout)} needs {self.depth * len(self.layout)}")
        if self.num_steps < 1:
            raise RouterError("router has no steps")
        if not torch.isfinite(self.logits).all():
            raise RouterError("router logits contain NaN or infinite values")
        if self.timesteps and len(self.timesteps) != self.num_steps:
            raise RouterError(f"router lists {len(self.timesteps)} timesteps for {self.num_steps} steps")
        if not (0.0 < float(self.threshold) < 1.0):
            raise RouterError(f"router threshold must be between 0 and 1, got {self.threshold}")
        if self.reuse not in STRATEGIES:
            raise RouterError(f"router reuse must be one of {STRATEGIES}, got {self.reuse!r}")

    def recompute(self, threshold: float | None = None) -> torch.Tensor:
        """[steps, units] bool: where the router says recompute (sigmoid(logit) > threshold)."""
        t = self.threshold if threshold is None else threshold
        return torch.sigmoid(self.logits.float()) > t

    def metadata(self) -> dict[str, str]:
        return {"format": FORMAT, "version": VERSION, "method": self.method, "family": self.family,
                "depth": str(self.depth), "layout": ",".join(self.layout), "sampler": self.sampler,
                "num_steps": str(self.num_steps), "timesteps": json.dumps(self.timesteps),
                "threshold": repr(float(self.threshold)), "source": self.source,
                "reuse": self.reuse}


def save_router(router: Router, path: str | Path) -> Path:
    from safetensors.torch import save_file
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"logits": router.logits.detach().float().contiguous().cpu()}, str(path), metadata=router.metadata())
    return path


def load_router(path: str | Path) -> Router:
    """Load a router in our format. Anything else is refused with a RouterError (never executed)."""
    from safetensors import safe_open
    path = Path(path)
    if not path.is_file():
        raise RouterError(f"router file not found: {path}")
    wrong = wrong_content(path, "safetensors")
    if wrong:
        raise RouterError(wrong)
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            keys = set(f.keys())
            if keys != {"logits"}:
                raise RouterError(f"{path.name}: expected one tensor 'logits', found {sorted(keys)}")
            logits = f.get_tensor("logits")
    except RouterError:
        raise
    except Exception as error:      # safetensors reads without running code: any failure means a damaged file
        reason = " ".join(str(error).split())[:200]
        raise RouterError(f"{path.name} is not a readable safetensors router file ({reason}): it is damaged "
                          "(truncated?) or not a router.") from error
    if meta.get("format") != FORMAT:
        raise RouterError(f"{path.name} is a safetensors file but not a CacheKit router (metadata format="
                          f"{meta.get('format')!r})")
    if meta.get("version") != VERSION:
        raise RouterError(f"{path.name}: router format version {meta.get('version')!r} is not supported (need {VERSION})")
    try:
        depth = int(meta["depth"])
        num_steps = int(meta["num_steps"])
        timesteps = json.loads(meta.get("timesteps") or "[]")
        threshold = float(meta.get("threshold", "0.1"))
        layout = tuple(s for s in meta["layout"].split(",") if s)
        reuse = meta.get("reuse", "hold")
    except (KeyError, ValueError, TypeError) as error:
        raise RouterError(f"{path.name}: router metadata is incomplete or malformed ({error})") from error
    if logits.ndim != 2 or num_steps != logits.shape[0]:
        raise RouterError(f"{path.name}: metadata says {num_steps} steps, logits have shape {tuple(logits.shape)}")
    if not isinstance(timesteps, list) or not all(isinstance(t, (int, float)) and math.isfinite(t) for t in timesteps):
        raise RouterError(f"{path.name}: router timesteps must be a list of numbers")
    return Router(logits.float(), meta.get("method", ""), meta.get("family", ""), depth, layout,
                  meta.get("sampler", ""), [float(t) for t in timesteps], threshold, meta.get("source", ""), reuse)
