"""Block parts that run on selected tokens only and are not token-wise as a whole.

`tokens.run_tokenwise` covers what acts on each token alone (an MLP, a Linear). Two parts of a
FLUX single block need more:

* attention where only some tokens' outputs are used: every token still gives keys and values,
  but only the kept tokens need queries. Rows of a batch keep different tokens, so the gather is
  done per row (a CFG pair, different prompts).
* a fused Linear whose first outputs every token needs (FLUX's qkv) and whose other outputs only
  the kept tokens need (the MLP input projection): the output rows are split, nothing is copied
  from the weight.

Both return zeros where a token was not computed; the caller makes sure nothing reads them.
When every token is kept they run the plain call on the unchanged input (bit-identical).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from .tokens import check_keep, run_tokenwise


def attend_kept_queries(attend: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
                        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """attend(q, k, v) -> [b, L, heads * dim] with q, k, v [b, heads, L, dim], for the kept queries only.

    keep: bool [B, L] over the query positions. Each row attends with its kept queries against all
    of its keys and values; the output is [B, L, heads * dim] with zeros at dropped queries.
    """
    if keep.dtype != torch.bool or keep.shape != (q.shape[0], q.shape[2]):
        raise ValueError(f"the query mask must be bool of shape {(q.shape[0], q.shape[2])} (batch, tokens), "
                         f"got {keep.dtype} {tuple(keep.shape)}")
    if bool(keep.all()):
        return attend(q, k, v)
    out = None
    for b in range(q.shape[0]):
        index = keep[b].nonzero().squeeze(1)
        if index.numel() == 0:
            continue
        row = attend(q[b:b + 1, :, index], k[b:b + 1], v[b:b + 1])          # [1, K, heads * dim]
        if out is None:
            out = row.new_zeros(q.shape[0], q.shape[2], row.shape[-1])
        out[b, index] = row[0]
    if out is None:
        raise ValueError("no query is kept in any row: the output width is unknown")
    return out


def linear_kept_tail(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, shared: int,
                     keep: torch.Tensor) -> torch.Tensor:
    """F.linear(x, weight, bias) where outputs [:shared] are computed for every token and outputs
    [shared:] only for the kept tokens (zeros elsewhere). x [B, N, C_in], keep bool [B, N]."""
    check_keep(x, keep)
    if bool(keep.all()):
        return F.linear(x, weight, bias)
    head_bias = bias[:shared] if bias is not None else None
    tail_bias = bias[shared:] if bias is not None else None
    head = F.linear(x, weight[:shared], head_bias)
    tail_width = weight.shape[0] - shared
    if not bool(keep.any()):
        return torch.cat([head, head.new_zeros(*head.shape[:-1], tail_width)], dim=-1)
    tail = run_tokenwise(lambda t: F.linear(t, weight[shared:], tail_bias), x, keep)
    return torch.cat([head, tail.to(head.dtype)], dim=-1)
