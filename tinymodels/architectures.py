"""The bundled tiny models: a class-conditional DiT and a cross-attention U-Net (diffusers classes).

Both predict the noise (DDPM epsilon) of 32x32 RGB images in [-1, 1]. Class `NUM_CLASSES` is
the empty label used for classifier-free guidance.
"""
from __future__ import annotations

import torch
from diffusers import DiTTransformer2DModel, UNet2DConditionModel

from .shapes import NUM_CLASSES, SIZE

NULL_CLASS = NUM_CLASSES
CONTEXT_TOKENS, CONTEXT_DIM = 4, 64

# Patch 4 (64 tokens), hidden 192: on one CPU core this trains 2.5x more steps per minute than
# patch 2 / hidden 128, which after 80 minutes had only learnt 38 % of the classes.
DIT_CONFIG = dict(num_attention_heads=6, attention_head_dim=32, in_channels=3, out_channels=3, num_layers=6,
                  sample_size=SIZE, patch_size=4, num_embeds_ada_norm=NUM_CLASSES, norm_type="ada_norm_zero")
UNET_CONFIG = dict(sample_size=SIZE, in_channels=3, out_channels=3, layers_per_block=2,
                   block_out_channels=(32, 64, 64),
                   # Attention at 16x16 and 8x8 only: 32x32 self-attention costs most of a CPU step.
                   down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                   up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                   cross_attention_dim=CONTEXT_DIM, attention_head_dim=8, norm_num_groups=8)


class ClassContext(torch.nn.Module):
    """Class label -> a few cross-attention tokens: the U-Net's stand-in for a text encoder."""

    def __init__(self):
        super().__init__()
        self.embedding = torch.nn.Embedding(NUM_CLASSES + 1, CONTEXT_TOKENS * CONTEXT_DIM)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.embedding(labels).view(-1, CONTEXT_TOKENS, CONTEXT_DIM)


def build_dit() -> DiTTransformer2DModel:
    model = DiTTransformer2DModel(**DIT_CONFIG)
    # Every block has its own label embedder that would drop labels independently in train
    # mode; CFG dropout is done once, by the trainer, with the null class instead.
    for module in model.modules():
        if hasattr(module, "dropout_prob") and hasattr(module, "embedding_table"):
            module.dropout_prob = 0.0
    # adaLN-Zero as in the original DiT: blocks start as identity, which trains much faster.
    for block in model.transformer_blocks:
        torch.nn.init.zeros_(block.norm1.linear.weight)
        torch.nn.init.zeros_(block.norm1.linear.bias)
    torch.nn.init.zeros_(model.proj_out_2.weight)
    torch.nn.init.zeros_(model.proj_out_2.bias)
    return model


class TinyUNet(torch.nn.Module):
    """U-Net plus its class context, saved and loaded together."""

    def __init__(self):
        super().__init__()
        self.unet = UNet2DConditionModel(**UNET_CONFIG)
        self.context = ClassContext()


def build_unet() -> TinyUNet:
    return TinyUNet()


class Denoiser:
    """Uniform call for both models: eps = denoiser(x, t, labels)."""

    def __init__(self, kind: str, model: torch.nn.Module):
        self.kind, self.model = kind, model

    @property
    def network(self) -> torch.nn.Module:
        """The module CacheKit patches (the U-Net itself, or the DiT)."""
        return self.model.unet if self.kind == "unet" else self.model

    def __call__(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.kind == "unet":
            return self.model.unet(x, t, encoder_hidden_states=self.model.context(labels), return_dict=False)[0]
        return self.model(x, timestep=t, class_labels=labels, return_dict=False)[0]


BUILDERS = {"dit": build_dit, "unet": build_unet}
