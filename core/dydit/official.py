"""Official DyDiT checkpoints (alibaba-damo-academy/DyDiT): read safely, check, convert.

A checkpoint is a `torch.save` pickle: train.py writes {"model", "ema", "opt", "args"} (args is an
argparse.Namespace), released files may hold the state dict alone. It is opened only with
`torch.load(weights_only=True)`, whose unpickler builds tensors and plain containers and nothing
else; the one extra class allowed is argparse.Namespace. Anything else is refused before any
object is built (never a fallback to full unpickling). The EMA weights are taken when present
(what the official sampling loads), else the model's.

Key layout (DiT's, plus the routers): x_embedder.proj, pos_embed, t_embedder.mlp.{0,2},
y_embedder.embedding_table, blocks.{i}.{attn.qkv, attn.proj, mlp.fc1, mlp.fc2, adaLN_modulation.1,
attn_rate.router, mlp_rate.router, token_selection.mlp_head.{0,2}}, final_layer.{linear,
adaLN_modulation.1}.

Conversion to diffusers' DiTTransformer2DModel (the mapping diffusers' convert_dit_to_diffusers.py
uses): the patch embedding to pos_embed.proj; the timestep and class embedders into every
block's norm1.emb (diffusers embeds per block); qkv split into to_q / to_k / to_v; proj to
to_out.0; fc1 / fc2 to ff.net.0.proj / ff.net.2; each block's adaLN to norm1.linear; the final
layer to proj_out_1 / proj_out_2. The config sets norm_eps=1e-6 (the official FF norm); the
official timestep embedding is set after building (diffusers_host/dydit.py). No diffusers import
here: the result is a config dict and state dicts.
"""
from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..routers.safe_load import RefusedGlobal, UnreadableCheckpoint, load_weights_only
from ..routers.sniff import content_kind
from .routers import RouterShape
from .sidecar import DyDiTFileError

ALLOWED_GLOBALS = [argparse.Namespace]
OFFICIAL_EPS = 1e-6
_ROUTER_KEY = re.compile(r"blocks\.\d+\.(attn_rate|mlp_rate|token_selection)\.")


@dataclass
class OfficialDyDiT:
    """A checked official checkpoint: the diffusers config and state dict, and the routers."""
    config: dict
    transformer: dict[str, torch.Tensor]
    routers: dict[str, torch.Tensor]
    shape: RouterShape
    pos_embed: torch.Tensor | None
    source: str


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The official model weights of a .pt file (EMA when present), refused with a reason otherwise."""
    path = Path(path)
    if not path.is_file():
        raise DyDiTFileError(f"DyDiT checkpoint not found: {path}")
    kind = content_kind(path)
    if kind == "safetensors":
        raise DyDiTFileError(f"{path.name} is a safetensors file, not an official DyDiT .pt checkpoint (a converted "
                             "router side-car loads with load_routers / apply_dydit).")
    if kind in ("empty", "text"):
        raise DyDiTFileError(f"{path.name} is {'empty' if kind == 'empty' else 'a text file'}, not a DyDiT checkpoint.")
    try:
        data = load_weights_only(path, ALLOWED_GLOBALS)
    except RefusedGlobal as refused:
        raise DyDiTFileError(
            f"{path.name} was refused: it asks to build {refused.name}, and only tensors, plain containers "
            f"and {', '.join(c.__name__ for c in ALLOWED_GLOBALS)} are allowed. CacheKit never runs code from a "
            "checkpoint; if the file is yours, save its state dict alone (torch.save(model.state_dict(), ...)).") \
            from refused
    except UnreadableCheckpoint as error:
        raise DyDiTFileError(f"{path.name} is not a readable PyTorch checkpoint: it is damaged (truncated?) or not a "
                             "DyDiT checkpoint.") from error
    return unwrap(data, path.name)


def unwrap(data, name: str) -> dict[str, torch.Tensor]:
    if isinstance(data, dict) and isinstance(data.get("ema"), dict):
        data = data["ema"]
    elif isinstance(data, dict) and isinstance(data.get("model"), dict):
        data = data["model"]
    if not isinstance(data, dict) or not data or not all(isinstance(v, torch.Tensor) for v in data.values()):
        found = type(data).__name__ if not isinstance(data, dict) else f"a dict with keys {sorted(map(str, data))[:6]}"
        raise DyDiTFileError(f"{name}: expected a DyDiT state dict (or a train.py checkpoint with 'ema'), "
                             f"found {found}.")
    if all(k.startswith("module.") for k in data):       # saved from a DistributedDataParallel wrapper
        data = {k[len("module."):]: v for k, v in data.items()}
    return data


def _need(state: dict, key: str, shape: tuple, name: str) -> torch.Tensor:
    if key not in state:
        raise DyDiTFileError(f"{name}: missing {key}; this is not a complete DyDiT checkpoint.")
    value = state[key]
    if tuple(value.shape) != shape:
        raise DyDiTFileError(f"{name}: {key} has shape {tuple(value.shape)}, expected {shape} for this DiT's "
                             "geometry; the checkpoint is damaged or not a DyDiT.")
    return value


def convert(state: dict[str, torch.Tensor], name: str = "checkpoint") -> OfficialDyDiT:
    """Check an official DyDiT state dict and convert it (see the module doc)."""
    if "blocks.0.attn.qkv.weight" not in state or "x_embedder.proj.weight" not in state:
        raise DyDiTFileError(f"{name} is not a DiT checkpoint (no x_embedder / blocks.0.attn.qkv weights).")
    if "blocks.0.attn_rate.router.weight" not in state:
        raise DyDiTFileError(f"{name} is a DiT checkpoint without DyDiT routers (no blocks.0.attn_rate.router): a "
                             "plain DiT runs without DyDiT; use an official DyDiT checkpoint.")
    state = {k: v.float() for k, v in state.items()}
    depth = 0
    while f"blocks.{depth}.attn.qkv.weight" in state:
        depth += 1
    patch_w = state["x_embedder.proj.weight"]
    if patch_w.ndim != 4 or patch_w.shape[2] != patch_w.shape[3]:
        raise DyDiTFileError(f"{name}: x_embedder.proj.weight has shape {tuple(patch_w.shape)}, expected a square "
                             "patch convolution [hidden, in_channels, p, p].")
    hidden, in_channels, patch = patch_w.shape[0], patch_w.shape[1], patch_w.shape[2]
    heads = state["blocks.0.attn_rate.router.weight"].shape[0] + 1
    groups = state["blocks.0.mlp_rate.router.weight"].shape[0] + 1 if "blocks.0.mlp_rate.router.weight" in state else 0
    mlp = state["blocks.0.mlp.fc1.weight"].shape[0] if "blocks.0.mlp.fc1.weight" in state else 0
    token = state["blocks.0.token_selection.mlp_head.0.weight"].shape[0] \
        if "blocks.0.token_selection.mlp_head.0.weight" in state else 0
    if hidden % heads or groups < 2 or not mlp or mlp % groups or not token:
        raise DyDiTFileError(f"{name}: inconsistent geometry (hidden {hidden}, {heads} heads, MLP {mlp}, {groups} MLP "
                             f"groups, token router width {token}); the checkpoint is damaged or not a DyDiT.")
    if mlp != 4 * hidden:
        raise DyDiTFileError(f"{name}: MLP width {mlp} is not 4 x hidden ({4 * hidden}); diffusers' DiT only has "
                             "mlp_ratio 4.")
    final_w = state.get("final_layer.linear.weight")
    if final_w is None or final_w.shape[0] % (patch * patch):
        raise DyDiTFileError(f"{name}: final_layer.linear.weight is missing or does not fit patch size {patch}.")
    out_channels = final_w.shape[0] // (patch * patch)
    table = state.get("y_embedder.embedding_table.weight")
    if table is None or table.ndim != 2 or table.shape[1] != hidden:
        raise DyDiTFileError(f"{name}: y_embedder.embedding_table.weight is missing or malformed; DyDiT is "
                             "class-conditional.")
    num_classes = table.shape[0] - 1           # the last row is the classifier-free-guidance null class
    pos_embed = state.get("pos_embed")
    tokens = pos_embed.shape[1] if pos_embed is not None else None
    side = int(round(tokens ** 0.5)) if tokens else 0
    if pos_embed is None or side * side != tokens:
        raise DyDiTFileError(f"{name}: pos_embed is missing or not a square grid.")

    t1w = _need(state, "t_embedder.mlp.0.weight", (hidden, 256), name)
    shared = {
        "norm1.emb.timestep_embedder.linear_1.weight": t1w,
        "norm1.emb.timestep_embedder.linear_1.bias": _need(state, "t_embedder.mlp.0.bias", (hidden,), name),
        "norm1.emb.timestep_embedder.linear_2.weight": _need(state, "t_embedder.mlp.2.weight", (hidden, hidden), name),
        "norm1.emb.timestep_embedder.linear_2.bias": _need(state, "t_embedder.mlp.2.bias", (hidden,), name),
        "norm1.emb.class_embedder.embedding_table.weight": table,
    }
    out = {"pos_embed.proj.weight": patch_w,
           "pos_embed.proj.bias": _need(state, "x_embedder.proj.bias", (hidden,), name),
           "proj_out_1.weight": _need(state, "final_layer.adaLN_modulation.1.weight", (2 * hidden, hidden), name),
           "proj_out_1.bias": _need(state, "final_layer.adaLN_modulation.1.bias", (2 * hidden,), name),
           "proj_out_2.weight": final_w,
           "proj_out_2.bias": _need(state, "final_layer.linear.bias", (final_w.shape[0],), name)}
    routers = {}
    used = set(out) | {"pos_embed", "t_embedder.mlp.0.weight", "t_embedder.mlp.0.bias", "t_embedder.mlp.2.weight",
                       "t_embedder.mlp.2.bias", "y_embedder.embedding_table.weight", "x_embedder.proj.weight",
                       "x_embedder.proj.bias", "final_layer.adaLN_modulation.1.weight",
                       "final_layer.adaLN_modulation.1.bias", "final_layer.linear.weight", "final_layer.linear.bias"}
    for i in range(depth):
        b, d = f"blocks.{i}.", f"transformer_blocks.{i}."
        need = lambda key, shape: _need(state, b + key, shape, name)
        q, k, v = need("attn.qkv.weight", (3 * hidden, hidden)).chunk(3)
        qb, kb, vb = need("attn.qkv.bias", (3 * hidden,)).chunk(3)
        out.update({d + key: value for key, value in shared.items()})
        out.update({
            d + "norm1.linear.weight": need("adaLN_modulation.1.weight", (6 * hidden, hidden)),
            d + "norm1.linear.bias": need("adaLN_modulation.1.bias", (6 * hidden,)),
            d + "attn1.to_q.weight": q, d + "attn1.to_k.weight": k, d + "attn1.to_v.weight": v,
            d + "attn1.to_q.bias": qb, d + "attn1.to_k.bias": kb, d + "attn1.to_v.bias": vb,
            d + "attn1.to_out.0.weight": need("attn.proj.weight", (hidden, hidden)),
            d + "attn1.to_out.0.bias": need("attn.proj.bias", (hidden,)),
            d + "ff.net.0.proj.weight": need("mlp.fc1.weight", (mlp, hidden)),
            d + "ff.net.0.proj.bias": need("mlp.fc1.bias", (mlp,)),
            d + "ff.net.2.weight": need("mlp.fc2.weight", (hidden, mlp)),
            d + "ff.net.2.bias": need("mlp.fc2.bias", (hidden,)),
        })
        for key, shape in (("attn_rate.router.weight", (heads - 1, hidden)), ("attn_rate.router.bias", (heads - 1,)),
                           ("mlp_rate.router.weight", (groups - 1, hidden)), ("mlp_rate.router.bias", (groups - 1,)),
                           ("token_selection.mlp_head.0.weight", (token, hidden)),
                           ("token_selection.mlp_head.0.bias", (token,)),
                           ("token_selection.mlp_head.2.weight", (1, token)),
                           ("token_selection.mlp_head.2.bias", (1,))):
            routers[b + key] = need(key, shape)
        used |= {b + key for key in ("attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias",
                                     "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias",
                                     "adaLN_modulation.1.weight", "adaLN_modulation.1.bias")}
    used |= set(routers)
    unexpected = sorted(set(state) - used)
    if unexpected:
        raise DyDiTFileError(f"{name}: unexpected tensors {unexpected[:4]}{' ...' if len(unexpected) > 4 else ''}; "
                             "this is not the DyDiT layout CacheKit converts (a different model or a newer release).")
    config = {"num_attention_heads": heads, "attention_head_dim": hidden // heads, "in_channels": in_channels,
              "out_channels": out_channels, "num_layers": depth, "sample_size": side * patch, "patch_size": patch,
              "num_embeds_ada_norm": num_classes, "norm_eps": OFFICIAL_EPS, "activation_fn": "gelu-approximate",
              "attention_bias": True, "norm_type": "ada_norm_zero", "norm_elementwise_affine": False}
    shape = RouterShape(depth=depth, heads=heads, mlp_groups=groups, hidden=hidden, token_hidden=token)
    return OfficialDyDiT(config, out, routers, shape, pos_embed, name)


def load_official(path: str | Path) -> OfficialDyDiT:
    path = Path(path)
    return convert(read_checkpoint(path), path.name)
