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
    """Stored values of one unit, per stream. A value stored from a call with several streams is
    kept once (the joint value); its per-stream parts are sliced only when a later call asks for
    a different set of streams."""

    __slots__ = ("per_stream", "joint")

    def __init__(self) -> None:
        # stream -> (signature, value, (chunk index, chunks) of a joint value or None)
        self.per_stream: dict[Hashable, tuple[tuple, Tree, tuple[int, int] | None]] = {}
        self.joint: _Joint | None = None

    def put(self, layout: CallLayout, signature: tuple, value: Tree) -> None:
        self.joint = _Joint(layout, signature, value)
        if layout.chunks == 1:
            self.per_stream[layout.streams[0]] = (signature, value, None)
            return
        if signature[0] < 0 or not _splits_evenly(value, signature[0] * layout.chunks):
            # The batch does not split into equal chunks: keep only the joint value.
            for stream in layout.streams:
                self.per_stream.pop(stream, None)
            return
        for i, stream in enumerate(layout.streams):
            self.per_stream[stream] = (signature, value, (i, layout.chunks))

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
            _, value, part = stored
            if part is not None:
                value = tree_map(lambda t: _chunk(t, part[1], part[0]), value)
            parts.append(value)
        if len(parts) == 1:
            return parts[0]
        return tree_map(lambda *ts: torch.cat(ts, dim=0), parts[0], *parts[1:])

    def nbytes(self, seen: set) -> int:
        """Bytes of the tensors held, each storage counted once across `seen`."""
        total = tree_bytes(self.joint.value, seen) if self.joint is not None else 0
        for _, value, _ in self.per_stream.values():
            total += tree_bytes(value, seen)
        return total

    def clear(self) -> None:
        self.per_stream.clear()
        self.joint = None


def tree_bytes(tree: Tree, seen: set) -> int:
    total = 0

    def count(t: torch.Tensor) -> None:
        nonlocal total
        storage = t.untyped_storage()
        key = (storage.data_ptr(), t.device)
        if key not in seen:
            seen.add(key)
            total += storage.nbytes()

    tree_map(count, tree)
    return total


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple
    dtype: torch.dtype
    device: torch.device


def tensor_specs(value: Tree) -> Tree:
    """The tree with each tensor replaced by its shape, dtype and device."""
    return tree_map(lambda t: TensorSpec(tuple(t.shape), t.dtype, t.device), value)


def map_specs(spec: Tree, leaf: Callable[[TensorSpec], Any]) -> Tree:
    """The tree with each TensorSpec replaced by leaf(spec) (lists, tuples, dicts kept)."""
    if isinstance(spec, TensorSpec):
        return leaf(spec)
    if isinstance(spec, (tuple, list)):
        values = [map_specs(s, leaf) for s in spec]
        return values if isinstance(spec, list) else tuple(values)
    if isinstance(spec, dict):
        return {k: map_specs(v, leaf) for k, v in spec.items()}
    return spec


def empty_from_specs(spec: Tree) -> Tree:
    """Uninitialised tensors of the recorded shapes (placeholders, or fake inputs in a FakeTensorMode)."""
    return map_specs(spec, lambda s: torch.empty(s.shape, dtype=s.dtype, device=s.device))


def stand_ins_from_specs(spec: Tree) -> Tree:
    """Read-only zero tensors of the recorded shapes that hold one element each (stride 0).

    A placeholder's values are never used: the host's glue only passes it on (a U-Net's
    skip-connection list, a `cat` whose result goes to a reused unit). A stride-0 expansion
    gives that glue the right shapes for almost no memory (video U-Nets' deep regions are GiBs);
    writing into it raises, so hosts that edit outputs in place get full-size tensors instead."""
    return map_specs(spec, lambda s: torch.zeros((1,) * len(s.shape), dtype=s.dtype, device=s.device).expand(s.shape))


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
