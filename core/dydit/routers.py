"""DyDiT's routers: per block, which attention heads and MLP channel groups run, and which tokens.

Semantics of the official code (alibaba-damo-academy/DyDiT, DyDiT/models.py, dynamic_model.py),
in eval mode:

* width: `attn_rate.router` and `mlp_rate.router` are each one Linear(hidden -> n - 1) fed with
  the timestep embedding `t_embedder(t)` alone (not t + class). A gate is on when
  sigmoid(logit) > 0.5; head 0 and group 0 are always on (prepended). So the masks depend only on
  t: every row of a batch with one timestep (cond and uncond, every class) gets the same mask.
  The official model has as many MLP groups as heads (DiT-XL/2: 16 heads of 72, MLP 4608 = 16 x 288).
* tokens: `token_selection.mlp_head` = Linear(hidden -> hidden // 16), ReLU, Linear(-> 1), per token
  on the block's residual stream after the attention residual (the input of norm2, officially).
  A token's MLP output counts when sigmoid(logit) > 0.5; otherwise the token passes unchanged.

The module layout reproduces the official key names, so `state_dict()` is the side-car file's
content: `blocks.{i}.attn_rate.router.*`, `blocks.{i}.mlp_rate.router.*`,
`blocks.{i}.token_selection.mlp_head.{0,2}.*`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

THRESHOLD = 0.5                       # the official gates' eval threshold (Router and TokenSelect)
TOKEN_REDUCTION = 16                  # the token router's hidden width is hidden // 16


@dataclass(frozen=True)
class RouterShape:
    """What a router set is for: it must match the DiT it is applied to."""
    depth: int
    heads: int
    mlp_groups: int
    hidden: int
    token_hidden: int

    def describe(self) -> str:
        return (f"depth {self.depth}, {self.heads} heads, {self.mlp_groups} MLP groups, hidden {self.hidden}, "
                f"token router width {self.token_hidden}")


class WidthRouter(nn.Module):
    """Gates n - 1 of n channel groups (heads or MLP groups) from the timestep embedding."""

    def __init__(self, hidden: int, groups: int):
        super().__init__()
        self.router = nn.Linear(hidden, groups - 1)

    def gates(self, t_emb: torch.Tensor, threshold: float = THRESHOLD) -> torch.Tensor:
        """[B, groups] bool; group 0 always on."""
        on = torch.sigmoid(self.router(t_emb)) > threshold
        return torch.cat([on.new_ones(on.shape[0], 1), on], dim=1)


class TokenRouter(nn.Module):
    """Decides per token whether the block's MLP output is added to it."""

    def __init__(self, hidden: int, width: int):
        super().__init__()
        self.mlp_head = nn.Sequential(nn.Linear(hidden, width), nn.ReLU(), nn.Linear(width, 1))

    def keep(self, x: torch.Tensor, threshold: float = THRESHOLD) -> torch.Tensor:
        """x [B, N, hidden] -> [B, N] bool."""
        return torch.sigmoid(self.mlp_head(x)).squeeze(-1) > threshold


class BlockRouters(nn.Module):
    def __init__(self, shape: RouterShape):
        super().__init__()
        self.attn_rate = WidthRouter(shape.hidden, shape.heads)
        self.mlp_rate = WidthRouter(shape.hidden, shape.mlp_groups)
        self.token_selection = TokenRouter(shape.hidden, shape.token_hidden)


class DyDiTRouters(nn.Module):
    """Every block's routers. `embedding` says which timestep embedding they were trained on:
    "official" (DiT's sinusoid over 128 frequencies, as the official DyDiT) or "diffusers"
    (diffusers' DiT embedding, downscale_freq_shift=1). Routers fed the other one flip decisions."""

    def __init__(self, shape: RouterShape, embedding: str = "official", threshold: float = THRESHOLD,
                 token_threshold: float = THRESHOLD):
        super().__init__()
        check_shape(shape)
        if embedding not in EMBEDDINGS:
            raise ValueError(f"embedding must be one of {EMBEDDINGS}, got {embedding!r}")
        self.shape = shape
        self.embedding = embedding
        self.threshold = float(threshold)
        self.token_threshold = float(token_threshold)
        self.blocks = nn.ModuleList(BlockRouters(shape) for _ in range(shape.depth))

    def width_gates(self, t_emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per block: heads [depth, B, heads] and MLP groups [depth, B, groups], bool."""
        heads = torch.stack([b.attn_rate.gates(t_emb, self.threshold) for b in self.blocks])
        groups = torch.stack([b.mlp_rate.gates(t_emb, self.threshold) for b in self.blocks])
        return heads, groups

    def token_keep(self, block: int, x: torch.Tensor) -> torch.Tensor:
        return self.blocks[block].token_selection.keep(x, self.token_threshold)

    def open_all(self) -> "DyDiTRouters":
        """Every gate on (a router that changes nothing): weights 0, large positive biases."""
        with torch.no_grad():
            for p in self.parameters():
                p.zero_()
            for b in self.blocks:
                b.attn_rate.router.bias.fill_(30.0)
                b.mlp_rate.router.bias.fill_(30.0)
                b.token_selection.mlp_head[2].bias.fill_(30.0)
        return self


EMBEDDINGS = ("official", "diffusers")


def check_shape(shape: RouterShape) -> None:
    for name in ("depth", "heads", "mlp_groups", "hidden", "token_hidden"):
        value = getattr(shape, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"router {name} must be a positive integer, got {value!r}")
    if shape.heads < 2 or shape.mlp_groups < 2:
        raise ValueError(f"DyDiT routers need at least 2 heads and 2 MLP groups (group 0 is always on), "
                         f"got {shape.heads} heads and {shape.mlp_groups} groups")


def shape_from_state(state: dict[str, torch.Tensor]) -> RouterShape:
    """The shape a state dict in the official key layout describes (checked by load_state_dict)."""
    depth = 0
    while f"blocks.{depth}.attn_rate.router.weight" in state:
        depth += 1
    if depth == 0:
        raise KeyError("blocks.0.attn_rate.router.weight")
    attn = state["blocks.0.attn_rate.router.weight"]
    mlp = state["blocks.0.mlp_rate.router.weight"]
    token = state["blocks.0.token_selection.mlp_head.0.weight"]
    return RouterShape(depth=depth, heads=attn.shape[0] + 1, mlp_groups=mlp.shape[0] + 1, hidden=attn.shape[1],
                       token_hidden=token.shape[0])
