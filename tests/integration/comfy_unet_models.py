"""Tiny random-weight U-Nets of every UNetModel family ComfyUI ships, for the DeepCache tests.

Each family is built as ComfyUI builds it from a checkpoint: its ``comfy.supported_models``
config class with the ``unet_config`` that ``comfy.model_detection`` detects for the real
checkpoint, shrunk (model_channels 32, channel multipliers <= 2, transformer depths <= 2, a
64-wide context) while keeping what makes the family differ: the number of levels and res
blocks per level, where transformers sit, the middle block (with attention, a lone ResBlock
(SSD-1B, Vega) or none (KOALA)), linear or conv transformer projections, the input channels
(inpaint 9, InstructPix2Pix and SVD 8), the adm vector the model class builds, the model
type (SD2.x v-prediction, SVD v-prediction EDM) and SVD's temporal layers. Nothing from ComfyUI
is imported at module level.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .comfy_models import CONTEXT_DIM, LATENT_HW, POOLED_DIM, TOKENS, instantiate

_BASE = {"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
         "legacy": False, "model_channels": 32, "context_dim": CONTEXT_DIM,
         "use_temporal_attention": False, "use_temporal_resblock": False}
_HEADS16 = {"num_heads": -1, "num_head_channels": 16}
_SD_4_LEVELS = {"num_res_blocks": [2, 2, 2, 2], "channel_mult": [1, 1, 2, 2],
                "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "transformer_depth_middle": 1,
                "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0]}
_SDXL_3_LEVELS = {"num_classes": "sequential", "adm_in_channels": POOLED_DIM + 6 * 256,
                  "num_res_blocks": [2, 2, 2], "channel_mult": [1, 2, 2], "use_linear_in_transformer": True}

# family -> (supported_models class, unet_config, overrides after the class's unet_extra_config,
#            model type forced as a checkpoint's keys would select it, or None)
SPECS: dict[str, tuple] = {
    "sd15": ("SD15", {**_SD_4_LEVELS, "in_channels": 4, "adm_in_channels": None,
                      "use_linear_in_transformer": False}, {}, None),
    "sd15_inpaint": ("SD15", {**_SD_4_LEVELS, "in_channels": 9, "adm_in_channels": None,
                              "use_linear_in_transformer": False}, {}, None),
    "sd15_ip2p": ("SD15_instructpix2pix", {**_SD_4_LEVELS, "in_channels": 8, "adm_in_channels": None,
                                           "use_linear_in_transformer": False}, {}, None),
    # SD2.x (768-v): linear transformer projections, a 1024-wide context (shrunk), v-prediction.
    "sd21_v": ("SD20", {**_SD_4_LEVELS, "in_channels": 4, "adm_in_channels": None,
                        "use_linear_in_transformer": True}, _HEADS16, "V_PREDICTION"),
    "sdxl": ("SDXL", {**_SDXL_3_LEVELS, "in_channels": 4, "transformer_depth": [0, 0, 1, 1, 2, 2],
                      "transformer_depth_middle": 2, "transformer_depth_output": [0, 0, 0, 1, 1, 1, 2, 2, 2]},
             _HEADS16, None),
    # SDXL refiner: 4 levels, model_channels 384 in the real one, adm = pooled + 5 size/score embeddings.
    "sdxl_refiner": ("SDXLRefiner", {"num_classes": "sequential", "adm_in_channels": POOLED_DIM + 5 * 256,
                                     "in_channels": 4, "num_res_blocks": [2, 2, 2, 2], "channel_mult": [1, 1, 2, 2],
                                     "use_linear_in_transformer": True, "transformer_depth": [0, 0, 1, 1, 1, 1, 0, 0],
                                     "transformer_depth_middle": 1,
                                     "transformer_depth_output": [0, 0, 0, 1, 1, 1, 1, 1, 1, 0, 0, 0]},
                     _HEADS16, None),
    # SSD-1B / Segmind Vega: the middle block is a lone ResBlock (transformer_depth_middle -1).
    "ssd1b": ("SSD1B", {**_SDXL_3_LEVELS, "in_channels": 4, "transformer_depth": [0, 0, 1, 1, 2, 2],
                        "transformer_depth_middle": -1, "transformer_depth_output": [0, 0, 0, 1, 1, 2, 2, 1, 1]},
              _HEADS16, None),
    # KOALA-700M: one res block per level and no middle block at all (-2).
    "koala": ("KOALA_700M", {**_SDXL_3_LEVELS, "num_res_blocks": [1, 1, 1], "in_channels": 4,
                             "transformer_depth": [0, 1, 2], "transformer_depth_middle": -2,
                             "transformer_depth_output": [0, 0, 1, 1, 2, 2]}, _HEADS16, None),
    # SVD img2vid: VideoResBlocks and SpatialVideoTransformers, frames as the batch, 8 input
    # channels (latent + the conditioning image's latent), adm = fps, motion bucket, augmentation.
    "svd": ("SVD_img2vid", {**_SD_4_LEVELS, "in_channels": 8, "num_classes": "sequential", "adm_in_channels": 768,
                            "use_linear_in_transformer": True, "extra_ff_mix_layer": True,
                            "use_spatial_context": True, "merge_strategy": "learned_with_images",
                            "merge_factor": 0.0, "video_kernel_size": [3, 1, 1], "use_temporal_resblock": True,
                            "use_temporal_attention": True, "disable_temporal_crossattention": False},
            _HEADS16, None),
}
FAMILIES = tuple(SPECS)
SVD_FRAMES = 3


@dataclass
class TinyUNet:
    patcher: Any
    positive: list
    negative: list
    latent: dict
    family: str


def _conditioning(family: str, gen: torch.Generator) -> tuple[list, list]:
    if family == "svd":
        # As SVD_img2vid_Conditioning makes it: the CLIP-vision embedding as a 1-token context,
        # the init image's latent to concatenate, zeros for the negative.
        pooled = torch.randn((1, 1, CONTEXT_DIM), generator=gen)
        image = torch.randn((1, 4, LATENT_HW, LATENT_HW), generator=gen)
        extra = {"motion_bucket_id": 127, "fps": 6, "augmentation_level": 0.0}
        return ([[pooled, {**extra, "concat_latent_image": image}]],
                [[torch.zeros_like(pooled), {**extra, "concat_latent_image": torch.zeros_like(image)}]])
    conds = []
    for _ in range(2):
        extra = {"pooled_output": torch.randn((1, POOLED_DIM), generator=gen)}
        if family == "sd15_ip2p":
            extra["concat_latent_image"] = torch.randn((1, 4, LATENT_HW, LATENT_HW), generator=gen)
        conds.append([[torch.randn((1, TOKENS, CONTEXT_DIM), generator=gen), extra]])
    return conds[0], conds[1]


def build(family: str, seed: int = 0, frames: int = SVD_FRAMES) -> TinyUNet:
    import comfy.model_base
    import comfy.supported_models

    class_name, unet_config, overrides, model_type = SPECS[family]
    model_config = getattr(comfy.supported_models, class_name)({**_BASE, **unet_config})
    model_config.unet_config.update(overrides)
    if model_type is not None:
        forced = getattr(comfy.model_base.ModelType, model_type)
        model_config.model_type = lambda state_dict, prefix="": forced
    patcher, gen = instantiate(model_config, seed)
    positive, negative = _conditioning(family, gen)
    batch = frames if family == "svd" else 1
    latent = {"samples": torch.zeros((batch, 4, LATENT_HW, LATENT_HW))}
    return TinyUNet(patcher, positive, negative, latent, family)
