"""An independent reference for DyDiT: the official DyDiT forward, masked, written from the
behaviour of alibaba-damo-academy/DyDiT (DyDiT/models.py, dynamic_model.py) in eval mode.

It works on an official-layout state dict and computes everything, as the official code does:
per-head attention outputs times the head mask before the output projection, fc1 outputs times
the group mask before GELU, and the block's gated MLP output times the token mask. Explicit
softmax attention (the official Attention), the official timestep embedding (128 frequencies
over 128), LayerNorm eps 1e-6. Shares no code with CacheKit.

`random_official_state` makes a tiny random DyDiT in the official key layout, with non-zero
adaLN and router weights (the official init zeroes adaLN, which would make every block a no-op).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def random_official_state(depth=2, hidden=64, heads=4, patch=2, in_channels=4, input_size=8, num_classes=10,
                          learn_sigma=True, seed=0, router_bias=0.0, token_bias=0.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=None):
        fan_in = shape[-1] if len(shape) > 1 else 1
        return torch.randn(*shape, generator=g) * (scale if scale is not None else fan_in ** -0.5)

    out_channels = in_channels * 2 if learn_sigma else in_channels
    mlp = 4 * hidden
    side = input_size // patch
    s = {"x_embedder.proj.weight": rnd(hidden, in_channels, patch, patch, scale=0.3),
         "x_embedder.proj.bias": rnd(hidden, scale=0.1),
         "pos_embed": sincos_2d(hidden, side).unsqueeze(0),
         "t_embedder.mlp.0.weight": rnd(hidden, 256, scale=0.2), "t_embedder.mlp.0.bias": rnd(hidden, scale=0.1),
         "t_embedder.mlp.2.weight": rnd(hidden, hidden, scale=0.3), "t_embedder.mlp.2.bias": rnd(hidden, scale=0.1),
         "y_embedder.embedding_table.weight": rnd(num_classes + 1, hidden, scale=0.5),
         "final_layer.linear.weight": rnd(patch * patch * out_channels, hidden),
         "final_layer.linear.bias": rnd(patch * patch * out_channels, scale=0.1),
         "final_layer.adaLN_modulation.1.weight": rnd(2 * hidden, hidden, scale=0.1),
         "final_layer.adaLN_modulation.1.bias": rnd(2 * hidden, scale=0.1)}
    for i in range(depth):
        b = f"blocks.{i}."
        s.update({b + "attn.qkv.weight": rnd(3 * hidden, hidden), b + "attn.qkv.bias": rnd(3 * hidden, scale=0.1),
                  b + "attn.proj.weight": rnd(hidden, hidden), b + "attn.proj.bias": rnd(hidden, scale=0.1),
                  b + "mlp.fc1.weight": rnd(mlp, hidden), b + "mlp.fc1.bias": rnd(mlp, scale=0.1),
                  b + "mlp.fc2.weight": rnd(hidden, mlp), b + "mlp.fc2.bias": rnd(hidden, scale=0.1),
                  b + "adaLN_modulation.1.weight": rnd(6 * hidden, hidden, scale=0.1),
                  b + "adaLN_modulation.1.bias": rnd(6 * hidden, scale=0.2),
                  b + "attn_rate.router.weight": rnd(heads - 1, hidden, scale=1.0),
                  b + "attn_rate.router.bias": torch.full((heads - 1,), float(router_bias)),
                  b + "mlp_rate.router.weight": rnd(heads - 1, hidden, scale=1.0),
                  b + "mlp_rate.router.bias": torch.full((heads - 1,), float(router_bias)),
                  b + "token_selection.mlp_head.0.weight": rnd(hidden // 16, hidden, scale=0.5),
                  b + "token_selection.mlp_head.0.bias": rnd(hidden // 16, scale=0.1),
                  b + "token_selection.mlp_head.2.weight": rnd(1, hidden // 16, scale=1.0),
                  b + "token_selection.mlp_head.2.bias": torch.full((1,), float(token_bias))})
    return s


def sincos_2d(dim: int, side: int) -> torch.Tensor:
    """DiT's fixed 2-D sin-cos position table (MAE's), in float64 then float32."""
    coords = torch.arange(side, dtype=torch.float64)
    grid_w, grid_h = torch.meshgrid(coords, coords, indexing="xy")     # w varies fastest, as np.meshgrid

    def one(d, pos):
        omega = 1.0 / 10000 ** (torch.arange(d // 2, dtype=torch.float64) / (d / 2.0))
        out = pos.reshape(-1)[:, None] * omega[None]
        return torch.cat([out.sin(), out.cos()], dim=1)

    return torch.cat([one(dim // 2, grid_w), one(dim // 2, grid_h)], dim=1).float()


def timestep_embedding(t: torch.Tensor, dim: int = 256) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def _gate(logits: torch.Tensor) -> torch.Tensor:
    """The official hard gate in eval: 1 where sigmoid(logit) > 0.5 (exactly 0 / 1)."""
    return (logits.sigmoid() > 0.5).float()


def forward(state: dict[str, torch.Tensor], x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, heads: int,
            complete: bool = False, eps: float = 1e-6):
    """The official DyDiT forward. Returns (output [B, C_out, H, W], masks) where masks holds per
    block the head gates [B, heads], group gates [B, groups] and token gates [B, N] (None when
    complete=True, the official `complete_model` path that runs every channel and token)."""
    patch = state["x_embedder.proj.weight"].shape[-1]
    hidden = state["x_embedder.proj.weight"].shape[0]
    head_dim = hidden // heads
    h = F.conv2d(x, state["x_embedder.proj.weight"], state["x_embedder.proj.bias"], stride=patch)
    h = h.flatten(2).transpose(1, 2) + state["pos_embed"]
    batch, tokens, _ = h.shape
    temb = timestep_embedding(t).to(h.dtype)
    temb = F.linear(F.silu(F.linear(temb, state["t_embedder.mlp.0.weight"], state["t_embedder.mlp.0.bias"])),
                    state["t_embedder.mlp.2.weight"], state["t_embedder.mlp.2.bias"])
    c = temb + state["y_embedder.embedding_table.weight"][y]
    ln = lambda v: F.layer_norm(v, (hidden,), eps=eps)
    masks = []
    depth = 0
    while f"blocks.{depth}.attn.qkv.weight" in state:
        depth += 1
    for i in range(depth):
        b = f"blocks.{i}."
        mod = F.linear(F.silu(c), state[b + "adaLN_modulation.1.weight"], state[b + "adaLN_modulation.1.bias"])
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=1)
        head_gate = group_gate = token_gate = None
        if not complete:
            ones = torch.ones(batch, 1, dtype=h.dtype)
            head_gate = torch.cat([ones, _gate(F.linear(temb, state[b + "attn_rate.router.weight"],
                                                        state[b + "attn_rate.router.bias"]))], dim=1)
        a_in = ln(h) * (1 + scale_msa[:, None]) + shift_msa[:, None]
        qkv = F.linear(a_in, state[b + "attn.qkv.weight"], state[b + "attn.qkv.bias"])
        q, k, v = qkv.reshape(batch, tokens, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
        scores = (q * head_dim ** -0.5) @ k.transpose(-2, -1)
        a = (scores.softmax(dim=-1) @ v).transpose(1, 2).reshape(batch, tokens, hidden)
        if head_gate is not None:
            a = a * head_gate.repeat_interleave(head_dim, dim=1)[:, None, :]
        a = F.linear(a, state[b + "attn.proj.weight"], state[b + "attn.proj.bias"])
        h = h + gate_msa[:, None] * a
        m_in = ln(h) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        f1 = F.linear(m_in, state[b + "mlp.fc1.weight"], state[b + "mlp.fc1.bias"])
        if not complete:
            token_logits = F.linear(F.relu(F.linear(h, state[b + "token_selection.mlp_head.0.weight"],
                                                    state[b + "token_selection.mlp_head.0.bias"])),
                                    state[b + "token_selection.mlp_head.2.weight"],
                                    state[b + "token_selection.mlp_head.2.bias"])
            token_gate = _gate(token_logits)                                  # [B, N, 1]
            group_gate = torch.cat([torch.ones(batch, 1, dtype=h.dtype), _gate(F.linear(temb, state[b + "mlp_rate.router.weight"],
                                                                         state[b + "mlp_rate.router.bias"]))], dim=1)
            width = f1.shape[-1] // group_gate.shape[1]
            f1 = f1 * group_gate.repeat_interleave(width, dim=1)[:, None, :]
        mlp = F.linear(F.gelu(f1, approximate="tanh"), state[b + "mlp.fc2.weight"], state[b + "mlp.fc2.bias"])
        mlp = gate_mlp[:, None] * mlp
        h = h + (token_gate * mlp if token_gate is not None else mlp)
        masks.append(None if complete else {"heads": head_gate.bool(), "groups": group_gate.bool(),
                                            "tokens": token_gate.squeeze(-1).bool()})
    shift, scale = F.linear(F.silu(c), state["final_layer.adaLN_modulation.1.weight"],
                            state["final_layer.adaLN_modulation.1.bias"]).chunk(2, dim=1)
    h = F.linear(ln(h) * (1 + scale[:, None]) + shift[:, None], state["final_layer.linear.weight"],
                 state["final_layer.linear.bias"])
    out_channels = h.shape[-1] // (patch * patch)
    side = int(tokens ** 0.5)
    h = h.reshape(batch, side, side, patch, patch, out_channels)
    out = torch.einsum("nhwpqc->nchpwq", h).reshape(batch, out_channels, side * patch, side * patch)
    return out, masks
