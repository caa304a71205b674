"""Tiny random diffusers models and a sampling loop driver for the tests."""
from __future__ import annotations

import torch
from diffusers import DDIMScheduler


def unet():
    from diffusers import UNet2DConditionModel
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, norm_num_groups=8, attention_head_dim=4).eval()


def dit():
    from diffusers import DiTTransformer2DModel
    return DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, num_layers=3,
                                 sample_size=8, patch_size=2, num_embeds_ada_norm=10).eval()


def pixart():
    from diffusers import PixArtTransformer2DModel
    return PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8,
                                    num_layers=2, sample_size=8, patch_size=2, cross_attention_dim=32,
                                    caption_channels=24).eval()


def sd3():
    from diffusers import SD3Transformer2DModel
    return SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=16,
                                 num_attention_heads=2, joint_attention_dim=24, caption_projection_dim=32,
                                 pooled_projection_dim=12, out_channels=4, pos_embed_max_size=16).eval()


def flux():
    from diffusers import FluxTransformer2DModel
    return FluxTransformer2DModel(patch_size=1, in_channels=8, num_layers=1, num_single_layers=2, attention_head_dim=16,
                                  num_attention_heads=2, joint_attention_dim=24, pooled_projection_dim=12,
                                  axes_dims_rope=(4, 6, 6)).eval()


def inputs(kind: str, model, batch: int = 2) -> dict:
    g = torch.Generator().manual_seed(1)
    r = lambda *s: torch.randn(*s, generator=g)
    if kind == "unet":
        return {"sample": r(batch, 4, 16, 16), "encoder_hidden_states": r(batch, 5, 32)}
    if kind == "dit":
        return {"hidden_states": r(batch, 4, 8, 8), "class_labels": torch.arange(batch) % 10}
    if kind == "pixart":
        return {"hidden_states": r(batch, 4, 8, 8), "encoder_hidden_states": r(batch, 6, 24),
                "added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}
    if kind == "sd3":
        return {"hidden_states": r(batch, 4, 8, 8), "encoder_hidden_states": r(batch, 6, 24), "pooled_projections": r(batch, 12)}
    if kind == "flux":
        return {"hidden_states": r(batch, 16, 8), "encoder_hidden_states": r(batch, 6, 24), "pooled_projections": r(batch, 12),
                "img_ids": torch.zeros(16, 3), "txt_ids": torch.zeros(6, 3)}
    raise KeyError(kind)


BUILDERS = {"unet": unet, "dit": dit, "pixart": pixart, "sd3": sd3, "flux": flux}


def scheduler(steps: int) -> DDIMScheduler:
    s = DDIMScheduler()
    s.set_timesteps(steps)
    return s


def sample(kind: str, model, sched, feed_back: bool = True) -> list[torch.Tensor]:
    """A DDIM-like loop: one model call per timestep; returns every model output."""
    kwargs = inputs(kind, model)
    key = "sample" if kind == "unet" else "hidden_states"
    outs = []
    with torch.no_grad():
        for t in sched.timesteps:
            timestep = t / 1000 if kind == "flux" else t
            out = model(**kwargs, timestep=timestep.expand(kwargs[key].shape[0]), return_dict=False)[0]
            outs.append(out)
            if feed_back and out.shape == kwargs[key].shape:
                kwargs[key] = kwargs[key] - 0.05 * out
            elif feed_back:
                kwargs[key] = kwargs[key] - 0.05 * out[:, : kwargs[key].shape[1]]
    return outs
