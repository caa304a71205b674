"""A tiny SD1.5-format checkpoint file that ComfyUI's CheckpointLoaderSimple loads, for the
browser test that runs workflows/deepcache_sd15.json on the real server.

ComfyUI detects SD1.5 from the U-Net's shapes (320 channels, 768-wide context) and builds the
text encoder and VAE from fixed configs, so those two are full-size (random weights); the
U-Net has one level and one res block. About 300 MB in fp16, built in ~20 s, cached by path.
The caller must already have ComfyUI on sys.path (see conftest.py).
"""
from __future__ import annotations

from pathlib import Path

import torch

SD15_CHECKPOINT = "v1-5-pruned-emaonly-fp16.safetensors"     # the name the workflows use


def _init(module: torch.nn.Module, gen: torch.Generator) -> None:
    # ComfyUI creates layers without initialising them: give every tensor a sane value.
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim == 0:
                p.fill_(1.0)           # e.g. CLIP's logit scale
            elif p.ndim == 1 and ("norm" in name or name.endswith("ln_1.weight") or name.endswith("ln_2.weight")):
                p.fill_(1.0 if name.endswith("weight") else 0.0)
            elif p.ndim == 1:
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * (1.0 / max(1.0, p[0].numel()) ** 0.5))


def write_sd15_checkpoint(path: Path, seed: int = 0) -> Path:
    if path.exists():
        return path
    import comfy.ldm.models.autoencoder as autoencoder
    import comfy.sd1_clip
    import comfy.supported_models
    from safetensors.torch import save_file
    gen = torch.Generator().manual_seed(seed)
    config = comfy.supported_models.SD15({
        "use_checkpoint": False, "image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 320,
        "channel_mult": [1], "num_res_blocks": [1], "use_spatial_transformer": True, "legacy": False,
        "adm_in_channels": None, "transformer_depth": [1], "transformer_depth_middle": 1,
        "transformer_depth_output": [1, 1], "use_linear_in_transformer": False, "context_dim": 768,
        "use_temporal_attention": False, "use_temporal_resblock": False, "num_heads": 8, "num_head_channels": -1})
    config.set_inference_dtype(torch.float32, None)
    unet = config.get_model({}, device=torch.device("cpu")).diffusion_model
    clip = comfy.sd1_clip.SDClipModel(device="cpu", dtype=torch.float32)
    vae = autoencoder.AutoencoderKL(ddconfig={"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3,
                                              "out_ch": 3, "ch": 128, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2,
                                              "attn_resolutions": [], "dropout": 0.0}, embed_dim=4)
    state = {}
    for prefix, module in (("model.diffusion_model.", unet), ("cond_stage_model.", clip), ("first_stage_model.", vae)):
        _init(module, gen)
        for key, value in module.state_dict().items():
            if value.is_floating_point():
                state[prefix + key] = value.to(torch.float16).contiguous()
            else:
                state[prefix + key] = value.contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path))
    return path
