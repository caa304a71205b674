"""Tiny random-weight diffusion models built from ComfyUI's own classes, for sampling tests.

Usage (the caller must already have put ComfyUI on ``sys.path`` and set ``args.cpu = True``)::

    from tests.integration.comfy_models import build
    tiny = build("sdxl", seed=0)
    nodes.common_ksampler(tiny.patcher, 0, 6, 2.0, "euler", "normal",
                          tiny.positive, tiny.negative, tiny.latent)

Nothing from ComfyUI is imported at module level: pytest imports this file even when
ComfyUI is not available. Every model is created by the matching ``comfy.supported_models``
config class with a small hand-written ``unet_config`` and then ``model_config.get_model({})``,
exactly as ComfyUI does when loading a checkpoint (minus the state dict). ComfyUI creates
the layers with ``disable_weight_init`` ops (uninitialised memory), so every parameter is
re-initialised deterministically from ``seed``; nothing is left at zero (zero-initialised
output layers would make the model ignore its inputs).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List

import torch

FAMILIES = ("sd15", "sdxl", "mmdit", "flux", "pixart", "wan")

# Token count and width of the fake text-encoder output used as conditioning.
TOKENS = 4
CONTEXT_DIM = 64
POOLED_DIM = 32  # pooled text embedding width (SDXL / SD3 / Flux)
LATENT_HW = 8    # latent spatial size (8x8 latent == 64x64 pixels)
# PixArtMS derives its sin-cos base size as round(((H + W) // 2) / 64) * 64 // patch: a latent
# under 33 px per side gives base size 0 and a ZeroDivisionError, so PixArt gets 40x40.
PIXART_LATENT_HW = 40


@dataclass
class Tiny:
    patcher: Any                 # comfy.model_patcher.ModelPatcher on CPU
    positive: List[list]         # CONDITIONING, as CLIPTextEncode outputs it
    negative: List[list]
    latent: Dict[str, torch.Tensor]  # {"samples": tensor}, like EmptyLatentImage
    family: str


# --- unet configs -------------------------------------------------------------------

def _unet_sd15() -> dict:
    return {
        "use_checkpoint": False, "image_size": 32, "in_channels": 4, "out_channels": 4,
        "model_channels": 32, "channel_mult": [1, 2], "num_res_blocks": [2, 2],
        "use_spatial_transformer": True, "legacy": False, "adm_in_channels": None,
        "transformer_depth": [1, 1, 1, 1], "transformer_depth_middle": 1,
        "transformer_depth_output": [1, 1, 1, 1, 1, 1],
        "use_linear_in_transformer": False, "context_dim": CONTEXT_DIM,
        "use_temporal_attention": False, "use_temporal_resblock": False,
    }


def _unet_sdxl() -> dict:
    # adm = pooled text embedding + 6 size embeddings of 256 (model_base.SDXL.encode_adm)
    return {
        "use_checkpoint": False, "image_size": 32, "in_channels": 4, "out_channels": 4,
        "model_channels": 32, "channel_mult": [1, 2], "num_res_blocks": [2, 2],
        "use_spatial_transformer": True, "legacy": False, "num_classes": "sequential",
        "adm_in_channels": POOLED_DIM + 6 * 256,
        "transformer_depth": [1, 1, 1, 1], "transformer_depth_middle": 1,
        "transformer_depth_output": [1, 1, 1, 1, 1, 1],
        "use_linear_in_transformer": True, "context_dim": CONTEXT_DIM,
        "use_temporal_attention": False, "use_temporal_resblock": False,
    }


def _unet_mmdit() -> dict:
    # MMDiT fixes hidden_size = 64 * depth and num_heads = depth.
    depth = 2
    return {
        "in_channels": 16, "out_channels": 16, "patch_size": 2, "depth": depth,
        "input_size": None, "adm_in_channels": POOLED_DIM,
        "context_embedder_config": {"target": "torch.nn.Linear",
                                    "params": {"in_features": CONTEXT_DIM, "out_features": 64 * depth}},
        "pos_embed_scaling_factor": None, "x_block_self_attn_layers": [],
    }


def _unet_flux() -> dict:
    return {
        "image_model": "flux", "in_channels": 16, "out_channels": 16, "patch_size": 2,
        "vec_in_dim": POOLED_DIM, "context_in_dim": CONTEXT_DIM, "hidden_size": 64,
        "mlp_ratio": 4.0, "num_heads": 2, "depth": 2, "depth_single_blocks": 1,
        "axes_dim": [8, 12, 12], "theta": 10000, "qkv_bias": True, "guidance_embed": True,
    }


def _unet_pixart() -> dict:
    return {
        "image_model": "pixart_sigma", "patch_size": 2, "in_channels": 4, "hidden_size": 96,
        "num_heads": 2, "depth": 2, "caption_channels": CONTEXT_DIM, "model_max_length": 120,
        "input_size": 32, "pe_interpolation": 0.5, "micro_condition": False,
    }


def _unet_wan() -> dict:
    return {
        "image_model": "wan2.1", "model_type": "t2v", "dim": 64, "ffn_dim": 128,
        "num_heads": 2, "num_layers": 2, "out_dim": 16, "in_dim": 16, "text_dim": CONTEXT_DIM,
        "freq_dim": 256, "patch_size": (1, 2, 2), "window_size": (-1, -1), "qk_norm": True,
        "cross_attn_norm": True, "eps": 1e-6,
    }


# family -> (supported_models class name, unet config factory, extra unet_config overrides
#            applied after the class constructor merged its unet_extra_config)
_SPECS: Dict[str, tuple] = {
    "sd15": ("SD15", _unet_sd15, {}),
    # SDXL's unet_extra_config sets num_head_channels=64, too wide for 32 channels.
    "sdxl": ("SDXL", _unet_sdxl, {"num_heads": -1, "num_head_channels": 16}),
    "mmdit": ("SD3", _unet_mmdit, {}),
    "flux": ("Flux", _unet_flux, {}),
    "pixart": ("PixArtSigma", _unet_pixart, {}),
    "wan": ("WAN21_T2V", _unet_wan, {}),
}


# --- weights ------------------------------------------------------------------------

_NORM_TYPES = (torch.nn.GroupNorm, torch.nn.LayerNorm)


def _is_norm(module: torch.nn.Module) -> bool:
    if isinstance(module, _NORM_TYPES):
        return True
    rms = getattr(torch.nn, "RMSNorm", None)
    if rms is not None and isinstance(module, rms):
        return True
    return "norm" in type(module).__name__.lower()


@torch.no_grad()
def _init_weights(model: torch.nn.Module, gen: torch.Generator) -> None:
    """Give every parameter a small deterministic random value.

    Matrices/kernels: N(0, 1/fan_in) so activations stay O(1) through the tiny net;
    norm scales: 1 + N(0, 0.02); everything else (biases, embeddings, modulations): N(0, 0.02).
    """
    for module in model.modules():
        norm = _is_norm(module)
        for name, p in module.named_parameters(recurse=False):
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if norm and p.dim() == 1 and name in ("weight", "scale", "gamma"):
                value = 1.0 + 0.02 * noise
            elif p.dim() >= 2 and not norm:
                fan_in = p[0].numel()
                value = noise / math.sqrt(max(fan_in, 1))
            else:
                value = 0.02 * noise
            p.copy_(value.to(p.dtype))


# --- conditioning -------------------------------------------------------------------

def _conditioning(family: str, gen: torch.Generator, scale: float) -> list:
    cond = torch.randn((1, TOKENS, CONTEXT_DIM), generator=gen) * scale
    extra: Dict[str, Any] = {}
    if family in ("sd15", "sdxl", "mmdit", "flux"):
        # Every CLIPTextEncode output carries pooled_output; SDXL/SD3/Flux need it (adm/y/vec).
        extra["pooled_output"] = torch.randn((1, POOLED_DIM), generator=gen) * scale
    return [[cond, extra]]


def _latent(family: str) -> Dict[str, torch.Tensor]:
    if family == "wan":
        shape = (1, 16, 1, LATENT_HW, LATENT_HW)
    elif family in ("mmdit", "flux"):
        shape = (1, 16, LATENT_HW, LATENT_HW)
    elif family == "pixart":
        shape = (1, 4, PIXART_LATENT_HW, PIXART_LATENT_HW)
    else:
        shape = (1, 4, LATENT_HW, LATENT_HW)
    return {"samples": torch.zeros(shape)}


# --- public -------------------------------------------------------------------------

def instantiate(model_config, seed: int, state_dict: dict | None = None) -> tuple[Any, torch.Generator]:
    """The model of a ComfyUI model config in float32 on the CPU, with seeded random weights (from
    state_dict where given): (its ModelPatcher, the generator, for drawing the conditioning next)."""
    import comfy.model_patcher

    model_config.set_inference_dtype(torch.float32, None)
    cpu = torch.device("cpu")
    model = model_config.get_model(state_dict or {}, device=cpu)
    gen = torch.Generator().manual_seed(int(seed))
    _init_weights(model.diffusion_model, gen)
    model.eval()
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu), gen


def build(family: str, seed: int = 0) -> Tiny:
    """Build a tiny random-weight ComfyUI model of ``family`` on CPU (deterministic in ``seed``)."""
    from . import comfy_dit_models
    if family in comfy_dit_models.SPECS:       # more DiT families (Qwen-Image, HunyuanVideo, ...)
        return comfy_dit_models.build(family, seed, Tiny)
    if family not in _SPECS:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    import comfy.supported_models

    class_name, unet_factory, overrides = _SPECS[family]
    model_config = getattr(comfy.supported_models, class_name)(unet_factory())
    model_config.unet_config.update(overrides)
    patcher, gen = instantiate(model_config, seed)
    positive = _conditioning(family, gen, 1.0)
    negative = _conditioning(family, gen, 1.0)
    return Tiny(patcher=patcher, positive=positive, negative=negative, latent=_latent(family), family=family)


class Elsewhere(torch.nn.Module):
    """A diffusion model of no family CacheKit knows."""


class UnknownModelPatcher:
    """A stand-in ModelPatcher whose diffusion model is an `Elsewhere`."""

    def get_model_object(self, name):
        return Elsewhere()
