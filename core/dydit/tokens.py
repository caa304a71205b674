"""Token routing: run a token-wise function on the selected tokens only, scatter the result back.

DyDiT's token router and DyFLUX's token selection decide per token whether a block part runs.
The official code multiplies by a 0/1 mask and so computes every token; a real saving needs
the selected tokens gathered, run, and scattered back. Rows of a batch may keep different
numbers of tokens (a CFG pair, different prompts): the kept tokens of all rows are flattened
into one sequence, which is exact for token-wise functions (an MLP, a LayerNorm, a Linear).
"""
from __future__ import annotations

from typing import Callable

import torch


def check_keep(x: torch.Tensor, keep: torch.Tensor) -> None:
    if keep.dtype != torch.bool or keep.shape != x.shape[:2]:
        raise ValueError(f"the token mask must be bool of shape {tuple(x.shape[:2])} (batch, tokens), "
                         f"got {keep.dtype} {tuple(keep.shape)}")


def run_tokenwise(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, keep: torch.Tensor,
                  fill: torch.Tensor | None = None) -> torch.Tensor:
    """fn over the kept tokens of x [B, N, C]; `fill` (or zeros) where keep [B, N] is False.

    fn must act on each token alone and accept [1, K, C]. When every token is kept, fn runs on x
    as is (no copy, bit-identical to the unrouted call); when none is, fn does not run.
    """
    check_keep(x, keep)
    if bool(keep.all()):
        return fn(x)
    kept = gather_kept(x, keep)
    if kept.shape[1] == 0:
        if fill is None:
            raise ValueError("no token is kept and no fill is given: the output width is unknown")
        return fill
    return scatter_kept(fn(kept), keep, fill)


def gather_kept(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The kept tokens of x [B, N, C] as one sequence [1, K, C], row-major over (batch, token).
    For a token-wise computation split over several modules (DyDiT's fc1 ... fc2)."""
    return x[keep].unsqueeze(0)


def scatter_kept(y: torch.Tensor, keep: torch.Tensor, fill: torch.Tensor | None = None) -> torch.Tensor:
    """Undo gather_kept: y [1, K, C'] back to [B, N, C'], `fill` (or zeros) where keep is False."""
    y = y.squeeze(0)
    out = fill.clone() if fill is not None else y.new_zeros(*keep.shape, y.shape[-1])
    out[keep] = y.to(out.dtype)
    return out
