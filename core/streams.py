"""Call streams and the per-stream store of unit outputs.

A model call may carry several streams in one batch (ComfyUI batches cond and uncond chunks
together when memory allows, and sends them in separate calls otherwise). Cached outputs are
kept per stream, so a value computed in a joint call can be reused in a split call and the
other way round. An entry is only reused when the stream's input signature (per-chunk shape,
dtype, device) is the same; anything else means recompute, never a wrong tensor.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Hashable

import torch

Tree = Any  # a tensor, None, or a tuple / list / dict of trees


def tree_map(fn: Callable[..., Any], tree: Tree, *others: Tree) -> Tree:
    """Apply fn to the tensor leaves of tree (and the matching leaves of others)."""
    if isinstance(tree, torch.Tensor):
        return fn(tree, *others)
    if tree is None:
        return None
    if isinstance(tree, (tuple, list)):
        mapped = [tree_map(fn, t, *(o[i] for o in others)) for i, t in enumerate(tree)]
        return type(tree)(mapped) if isinstance(tree, list) else tuple(mapped)
    if isinstance(tree, dict):
        return {k: tree_map(fn, v, *(o[k] for o in others)) for k, v in tree.items()}
    return tree  # non-tensor leaves (ints, strings) pass through unchanged


def first_tensor(tree: Tree) -> torch.Tensor | None:
    if isinstance(tree, torch.Tensor):
        return tree
    if isinstance(tree, (tuple, list)):
        values = tree
    elif isinstance(tree, dict):
        values = tree.values()
    else:
        return None
    for value in values:
        found = first_tensor(value)
        if found is not None:
            return found
    return None


@dataclass(frozen=True)
class CallLayout:
    """How the batch of one model call splits into streams (equal chunks along dim 0)."""
    streams: tuple[Hashable, ...]

    @property
    def chunks(self) -> int:
        return len(self.streams)


SINGLE_STREAM = CallLayout(streams=("all",))


def input_signature(x: torch.Tensor, layout: CallLayout) -> tuple:
    """What must match for a stored per-stream value to be valid for a new input."""
    per_chunk = x.shape[0] // layout.chunks if x.shape[0] % layout.chunks == 0 else -1
    return (per_chunk, tuple(x.shape[1:]), x.dtype, x.device)


@dataclass
class _Joint:
    layout: CallLayout
    signature: tuple
    value: Tree


class StreamStore:
    """Stored values of one unit, per stream, plus the last joint value for a fast path."""

    __slots__ = ("per_stream", "joint")

    def __init__(self) -> None:
        self.per_stream: dict[Hashable, tuple[tuple, Tree]] = {}
        self.joint: _Joint | None = None

    def put(self, layout: CallLayout, signature: tuple, value: Tree) -> None:
        self.joint = _Joint(layout, signature, value)
        if layout.chunks == 1:
            self.per_stream[layout.streams[0]] = (signature, value)
            return
        if signature[0] < 0 or not _splits_evenly(value, signature[0] * layout.chunks):
            # The batch does not split into equal chunks: keep only the joint value.
            for stream in layout.streams:
                self.per_stream.pop(stream, None)
            return
        parts = [tree_map(lambda t, i=i: _chunk(t, layout.chunks, i), value) for i in range(layout.chunks)]
        for stream, part in zip(layout.streams, parts):
            self.per_stream[stream] = (signature, part)

    def get(self, layout: CallLayout, signature: tuple) -> Tree | None:
        """The stored value for these streams, or None when any stream is missing or differs."""
        joint = self.joint
        if joint is not None and joint.layout == layout and joint.signature == signature:
            return joint.value
        if signature[0] < 0:
            return None
        parts = []
        for stream in layout.streams:
            stored = self.per_stream.get(stream)
            if stored is None or stored[0] != signature:
                return None
            parts.append(stored[1])
        if len(parts) == 1:
            return parts[0]
        return tree_map(lambda *ts: torch.cat(ts, dim=0), parts[0], *parts[1:])

    def clear(self) -> None:
        self.per_stream.clear()
        self.joint = None


def _splits_evenly(value: Tree, batch: int) -> bool:
    ok = True

    def check(t: torch.Tensor) -> None:
        nonlocal ok
        ok = ok and t.dim() > 0 and t.shape[0] == batch

    tree_map(check, value)
    return ok


def _chunk(t: torch.Tensor, chunks: int, i: int) -> torch.Tensor:
    size = t.shape[0] // chunks
    return t[i * size:(i + 1) * size]
