"""Run only the active heads / MLP groups: slice the weights, cache the slices per mask.

The official DyDiT multiplies the per-head attention output (before the output projection) and
the per-group fc1 output (before GELU) by a 0/1 mask, so it computes every channel. Because the
mask acts before a linear map and GELU(0) = 0, dropping the masked channels is exact: for the
kept heads H, q/k/v use the rows of H and the output projection the columns of H; for the kept
groups G, fc1 uses the rows of G and fc2 the columns of G. Active heads are any subset, not a
prefix, so the slices are gathered (index_select) and kept per distinct mask: masks depend only
on the timestep, so a sampling run sees few of them.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Hashable, Sequence

import torch
import torch.nn.functional as F


def channels(groups: Sequence[int], width: int, device: torch.device) -> torch.Tensor:
    """Channel indices of the kept groups (each `width` channels wide), in order."""
    base = torch.as_tensor(list(groups), dtype=torch.long, device=device)
    return (base[:, None] * width + torch.arange(width, device=device)).flatten()


def signature(*tensors: torch.Tensor | None) -> tuple:
    """Identifies the source weights of a slice: a weight replaced (load, device move) or changed
    in place (LoRA fused, load_state_dict's copy_) has a new data pointer or version."""
    return tuple((t.data_ptr(), t._version, t.dtype, t.device, tuple(t.shape)) if t is not None else None
                 for t in tensors)


class SliceCache:
    """Sliced weights per slot (a block's attention or MLP) and mask, least recently used first out.

    `per_slot` bounds the masks kept per slot: a run moves through the timesteps in one
    direction, so a slot rarely returns to an older mask; 2 keeps the current and the previous
    one (e.g. two samplers interleaved). `nbytes` is what the slices hold now."""

    def __init__(self, per_slot: int = 2):
        if isinstance(per_slot, bool) or not isinstance(per_slot, int) or per_slot < 1:
            raise ValueError(f"the slice cache must keep at least 1 mask per block, got {per_slot!r}")
        self.per_slot = per_slot
        self._slots: dict[Hashable, OrderedDict] = {}
        self.nbytes = 0
        self.builds = 0

    def get(self, slot: Hashable, key: Hashable, build: Callable[[], tuple[torch.Tensor | None, ...]]):
        entries = self._slots.setdefault(slot, OrderedDict())
        value = entries.get(key)
        if value is not None:
            entries.move_to_end(key)
            return value
        value = build()
        self.builds += 1
        entries[key] = value
        self.nbytes += _bytes(value)
        while len(entries) > self.per_slot:
            _, dropped = entries.popitem(last=False)
            self.nbytes -= _bytes(dropped)
        return value

    def clear(self) -> None:
        self._slots.clear()
        self.nbytes = 0


def _bytes(value: tuple) -> int:
    return sum(t.numel() * t.element_size() for t in value if t is not None)


def rows(weight: torch.Tensor, bias: torch.Tensor | None, index: torch.Tensor):
    """A Linear restricted to some outputs: (weight rows, bias entries)."""
    return (weight.index_select(0, index).contiguous(),
            bias.index_select(0, index).contiguous() if bias is not None else None)


def columns(weight: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """A Linear restricted to some inputs (its bias is unchanged)."""
    return weight.index_select(1, index).contiguous()


def fused_qkv(linears: Sequence[tuple[torch.Tensor, torch.Tensor | None]], index: torch.Tensor | None):
    """One [3 x kept, in] weight (and bias) from the q, k, v projections, kept channels only:
    one matmul instead of three."""
    weights, biases = [], []
    for weight, bias in linears:
        w, b = (weight, bias) if index is None else rows(weight, bias, index)
        weights.append(w)
        biases.append(b)
    bias = torch.cat(biases) if all(b is not None for b in biases) else None
    if bias is None and any(b is not None for b in biases):
        raise ValueError("q, k and v projections must all have a bias or none")
    return torch.cat(weights).contiguous(), bias


def attention(x: torch.Tensor, w_qkv: torch.Tensor, b_qkv: torch.Tensor | None, w_out: torch.Tensor,
              b_out: torch.Tensor | None, head_dim: int, channel_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Self-attention over x [B, N, C] with fused q/k/v weights of h heads ([3 h d, C]) and the
    output projection's matching columns ([C_out, h d]); scale 1/sqrt(d) (DiT's).

    channel_mask [B, h d] (0/1): multiplies each row's attention output before the output
    projection, as the official DyDiT does; used when rows have different masks."""
    batch, tokens, _ = x.shape
    qkv = F.linear(x, w_qkv, b_qkv).view(batch, tokens, 3, -1, head_dim).permute(2, 0, 3, 1, 4)
    out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
    out = out.transpose(1, 2).reshape(batch, tokens, -1)
    if channel_mask is not None:
        out = out * channel_mask[:, None, :].to(out.dtype)
    return F.linear(out, w_out, b_out)
