"""The DyDiT router side-car: one safetensors file next to a converted DiT, no pickle.

    tensors   the official key names: blocks.{i}.attn_rate.router.{weight,bias},
              blocks.{i}.mlp_rate.router.{weight,bias}, blocks.{i}.token_selection.mlp_head.{0,2}.{weight,bias}
    metadata  format=cachekit-dydit, version=1, depth, heads, mlp_groups, hidden, token_hidden,
              embedding (official | diffusers: the timestep embedding the routers were trained on),
              threshold, token_threshold, source (free text)

Read with safetensors only (no code can run); every problem is reported with what was found
and how to fix it.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..routers.sniff import read_sidecar
from .routers import EMBEDDINGS, DyDiTRouters, RouterShape, check_shape

FORMAT = "cachekit-dydit"
VERSION = "1"
_SHAPE_FIELDS = ("depth", "heads", "mlp_groups", "hidden", "token_hidden")
_CONVERT = "convert an official DyDiT checkpoint with `python scripts/convert_dydit.py CHECKPOINT.pt OUT_DIR`"


class DyDiTFileError(ValueError):
    """A DyDiT file (router side-car or official checkpoint) that cannot be used, and why."""


def save_routers(routers: DyDiTRouters, path: str | Path, source: str = "") -> Path:
    from safetensors.torch import save_file
    path = Path(path)
    state = {k: v.detach().float().contiguous().cpu() for k, v in routers.state_dict().items()}
    shape = routers.shape
    metadata = {"format": FORMAT, "version": VERSION, **{f: str(getattr(shape, f)) for f in _SHAPE_FIELDS},
                "embedding": routers.embedding, "threshold": repr(routers.threshold),
                "token_threshold": repr(routers.token_threshold), "source": source}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata=metadata)
    return path


def load_routers(path: str | Path) -> DyDiTRouters:
    """A router side-car as DyDiTRouters (fp32, CPU, eval)."""
    path = Path(path)
    metadata, state = read_sidecar(path, DyDiTFileError, "CacheKit DyDiT router side-car", _CONVERT)
    return routers_from(state, metadata, path.name)


def routers_from(state: dict[str, torch.Tensor], metadata: dict[str, str], name: str) -> DyDiTRouters:
    if metadata.get("format") != FORMAT:
        raise DyDiTFileError(f"{name} is a safetensors file but not a DyDiT router side-car (metadata format="
                             f"{metadata.get('format')!r}, expected {FORMAT!r}); {_CONVERT}.")
    if metadata.get("version") != VERSION:
        raise DyDiTFileError(f"{name}: side-car version {metadata.get('version')!r} is not supported (this CacheKit "
                             f"reads version {VERSION}); update CacheKit or convert the checkpoint again.")
    try:
        shape = RouterShape(**{f: int(metadata[f]) for f in _SHAPE_FIELDS})
        check_shape(shape)
        threshold = float(metadata.get("threshold", "0.5"))
        token_threshold = float(metadata.get("token_threshold", "0.5"))
    except (KeyError, ValueError) as error:
        raise DyDiTFileError(f"{name}: metadata is incomplete or malformed ({error}); it needs "
                             f"{', '.join(_SHAPE_FIELDS)}. {_CONVERT[0].upper() + _CONVERT[1:]} again.") from error
    embedding = metadata.get("embedding", "official")
    if embedding not in EMBEDDINGS:
        raise DyDiTFileError(f"{name}: metadata embedding={embedding!r}, expected one of {EMBEDDINGS}")
    routers = DyDiTRouters(shape, embedding, threshold, token_threshold)
    check_state(routers, state, name)
    routers.load_state_dict({k: v.float() for k, v in state.items()})
    return routers.eval().requires_grad_(False)


def check_state(routers: DyDiTRouters, state: dict[str, torch.Tensor], name: str) -> None:
    """Missing, unexpected or wrongly shaped router tensors, all named in one error."""
    expected = {k: tuple(v.shape) for k, v in routers.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [f"{k}: expected {expected[k]}, found {tuple(state[k].shape)}"
             for k in sorted(set(expected) & set(state)) if tuple(state[k].shape) != expected[k]]
    problems = []
    if missing:
        problems.append(f"missing {_few(missing)}")
    if unexpected:
        problems.append(f"unexpected {_few(unexpected)}")
    if wrong:
        problems.append(f"wrong shapes: {_few(wrong)}")
    if problems:
        raise DyDiTFileError(f"{name}: the router tensors do not match its metadata ({routers.shape.describe()}): "
                             f"{'; '.join(problems)}. The file is damaged or was edited; {_CONVERT}.")


def _few(items: list[str], limit: int = 4) -> str:
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more
