"""Tiny random-weight DiTs of more families, built from ComfyUI's own classes (see comfy_models.py).

Each family: its ``comfy.supported_models`` config class, a real ``unet_config`` (as
comfy/model_detection.py writes it) shrunk to two or three blocks and a small width, the
conditioning its ``extra_conds`` reads, and a tiny latent (video families: two latent frames).
Nothing from ComfyUI is imported at module level.
"""
from __future__ import annotations

from typing import Any, Callable, Dict

import torch

TOKENS = 4


def _qwen_image() -> dict:
    return {"image_model": "qwen_image", "in_channels": 64, "out_channels": 16, "num_layers": 2,
            "attention_head_dim": 16, "num_attention_heads": 2, "joint_attention_dim": 48,
            "axes_dims_rope": (4, 6, 6)}


def _hunyuan_video() -> dict:
    return {"image_model": "hunyuan_video", "in_channels": 16, "out_channels": 16, "patch_size": [1, 2, 2],
            "vec_in_dim": 32, "context_in_dim": 48, "hidden_size": 64, "mlp_ratio": 4.0, "num_heads": 2,
            "depth": 2, "depth_single_blocks": 2, "axes_dim": [8, 12, 12], "theta": 256, "qkv_bias": True,
            "guidance_embed": True, "byt5": False, "meanflow": False}


def _ltxv() -> dict:
    return {"image_model": "ltxv", "in_channels": 128, "cross_attention_dim": 64, "attention_head_dim": 32,
            "num_attention_heads": 2, "caption_channels": 48, "num_layers": 2}


def _hunyuan_dit() -> dict:
    # depth 4: the last block takes a U-Net-like skip from the first
    return {"image_model": "hydit", "input_size": 32, "patch_size": 2, "in_channels": 4, "hidden_size": 64,
            "depth": 4, "num_heads": 2, "mlp_ratio": 2.0, "text_states_dim": 48, "text_states_dim_t5": 40,
            "text_len": TOKENS, "text_len_t5": TOKENS, "size_cond": False, "use_style_cond": False,
            "learn_sigma": True}


def _mochi() -> dict:
    return {"image_model": "mochi_preview", "depth": 2, "patch_size": 2, "num_heads": 2, "hidden_size_x": 64,
            "hidden_size_y": 32, "mlp_ratio_x": 192.0,  # Mochi asserts an MLP width of 12288
            "mlp_ratio_y": 2.0, "learn_sigma": False, "in_channels": 12,
            "qk_norm": True, "qkv_bias": False, "out_bias": True, "attn_drop": 0.0, "patch_embed_bias": True,
            "posenc_preserve_area": True, "timestep_mlp_bias": True, "attend_to_padding": False,
            "timestep_scale": 1000.0, "use_t5": True, "t5_feat_dim": 48, "t5_token_length": TOKENS,
            "rope_theta": 10000.0}


def _auraflow() -> dict:
    return {"in_channels": 4, "out_channels": 4, "patch_size": 2, "dim": 64, "n_layers": 3, "n_double_layers": 1,
            "n_heads": 2, "global_conddim": 64, "cond_seq_dim": 48, "max_seq": 64}


def _lumina2() -> dict:
    return {"image_model": "lumina2", "patch_size": 2, "in_channels": 16, "dim": 64, "cap_feat_dim": 48,
            "n_layers": 2, "n_refiner_layers": 1, "n_heads": 2, "n_kv_heads": 1, "qk_norm": True,
            "axes_dims": [8, 12, 12], "axes_lens": [300, 512, 512]}


def _hidream() -> dict:
    return {"image_model": "hidream", "attention_head_dim": 32, "axes_dims_rope": [16, 8, 8],
            "caption_channels": [48, 40], "max_resolution": [128, 128], "in_channels": 16,
            "llama_layers": [0, 1, 1, 1], "num_attention_heads": 2, "num_routed_experts": 4,
            "num_activated_experts": 2, "num_layers": 2, "num_single_layers": 2, "out_channels": 16,
            "patch_size": 2, "text_emb_dim": 32}


def _cosmos_predict2() -> dict:
    return {"image_model": "cosmos_predict2", "max_img_h": 240, "max_img_w": 240, "max_frames": 128,
            "in_channels": 16, "out_channels": 16, "patch_spatial": 2, "patch_temporal": 1, "model_channels": 64,
            "concat_padding_mask": True, "crossattn_emb_channels": 48, "pos_emb_cls": "rope3d",
            "pos_emb_learnable": True, "pos_emb_interpolation": "crop", "min_fps": 1, "max_fps": 30,
            "use_adaln_lora": True, "adaln_lora_dim": 16, "num_blocks": 2, "num_heads": 2,
            "extra_per_block_abs_pos_emb": False, "rope_h_extrapolation_ratio": 4.0,
            "rope_w_extrapolation_ratio": 4.0, "rope_t_extrapolation_ratio": 1.0}


def _omnigen2() -> dict:
    return {"image_model": "omnigen2", "axes_dim_rope": [8, 12, 12], "axes_lens": [1024, 1664, 1664],
            "ffn_dim_multiplier": None, "hidden_size": 64, "in_channels": 16, "multiple_of": 16, "norm_eps": 1e-05,
            "num_attention_heads": 2, "num_kv_heads": 1, "num_layers": 2, "num_refiner_layers": 1,
            "out_channels": None, "patch_size": 2, "text_feat_dim": 48, "timestep_scale": 1000.0}


def _wan22_5b() -> dict:
    # Wan 2.2 TI2V 5B: WanModel with the 48-channel latent of the Wan 2.2 VAE
    return {"image_model": "wan2.1", "model_type": "t2v", "dim": 64, "ffn_dim": 128, "num_heads": 2, "num_layers": 2,
            "out_dim": 48, "in_dim": 48, "text_dim": 48, "freq_dim": 256, "patch_size": (1, 2, 2),
            "window_size": (-1, -1), "qk_norm": True, "cross_attn_norm": True, "eps": 1e-6}


def _hunyuan_image21() -> dict:
    # HunyuanImage 2.1: the HunyuanVideo class with 2D patches, no pooled vector, 64 latent channels
    return {**_hunyuan_video(), "in_channels": 64, "out_channels": 64, "patch_size": [1, 1], "vec_in_dim": None,
            "axes_dim": [16, 16], "guidance_embed": False}


def _cosmos1() -> dict:
    return {"image_model": "cosmos", "max_img_h": 240, "max_img_w": 240, "max_frames": 128, "in_channels": 16,
            "out_channels": 16, "patch_spatial": 2, "patch_temporal": 1, "model_channels": 64,
            "block_config": "FA-CA-MLP", "concat_padding_mask": True, "pos_emb_cls": "rope3d",
            "pos_emb_learnable": False, "pos_emb_interpolation": "crop", "block_x_format": "THWBD",
            "affline_emb_norm": True, "use_adaln_lora": True, "adaln_lora_dim": 16, "num_blocks": 2, "num_heads": 2,
            "extra_per_block_abs_pos_emb": True, "rope_h_extrapolation_ratio": 1.0,
            "rope_w_extrapolation_ratio": 1.0, "rope_t_extrapolation_ratio": 2.0,
            "extra_per_block_abs_pos_emb_type": "learnable", "crossattn_emb_channels": 48}


def _stable_audio() -> dict:
    # cond_token_dim and global_cond_dim are fixed by the 768-wide seconds conditioners of StableAudio1
    return {"audio_model": "dit1.0", "io_channels": 64, "embed_dim": 64, "depth": 2, "num_heads": 2,
            "cond_token_dim": 768, "global_cond_dim": 1536}


def _stable_audio_state_dict() -> dict:
    """The seconds_start / seconds_total conditioners StableAudio1 loads from the checkpoint."""
    from comfy.ldm.audio.embedders import NumberConditioner
    gen = torch.Generator().manual_seed(0)
    shapes = {k: v.shape for k, v in NumberConditioner(768, min_val=0, max_val=512).state_dict().items()}
    return {f"conditioner.conditioners.{name}.{k}": torch.randn(shape, generator=gen) * 0.1
            for name in ("seconds_start", "seconds_total") for k, shape in shapes.items()}


def _hunyuan3d() -> dict:
    return {"image_model": "hunyuan3d2", "in_channels": 64, "context_in_dim": 48, "hidden_size": 64,
            "mlp_ratio": 4.0, "num_heads": 2, "depth": 2, "depth_single_blocks": 2, "qkv_bias": True,
            "guidance_embed": False}


def _hunyuan3d_21() -> dict:
    # 4 blocks: the last one takes a long skip and has the mixture-of-experts MLP
    return {"image_model": "hunyuan3d2_1", "in_channels": 64, "context_dim": 48, "hidden_size": 64, "mlp_ratio": 4.0,
            "num_heads": 2, "depth": 4, "qkv_bias": False, "guidance_cond_proj_dim": None, "num_moe_layers": 1,
            "num_experts": 4, "moe_top_k": 2}


def _wan_camera() -> dict:
    return {**_wan22_5b(), "model_type": "camera", "in_dim": 32, "out_dim": 16}


def _wan_vace() -> dict:
    return {**_wan22_5b(), "in_dim": 16, "out_dim": 16, "vace_layers": 1, "vace_in_dim": 96}


# family -> (supported_models class, unet config, extra conditioning(gen, context) -> dict,
#            latent shape, context width)
def _pooled(width: int) -> Callable:
    return lambda gen: {"pooled_output": torch.randn((1, width), generator=gen)}


def _mask(gen) -> dict:
    return {"attention_mask": torch.ones((1, TOKENS), dtype=torch.long)}


def _hydit_extra(gen) -> dict:
    return {"attention_mask": torch.ones((1, TOKENS), dtype=torch.long),
            "conditioning_mt5xl": torch.randn((1, TOKENS, 40), generator=gen),
            "attention_mask_mt5xl": torch.ones((1, TOKENS), dtype=torch.long)}


def _hidream_extra(gen) -> dict:
    return {"pooled_output": torch.randn((1, 32), generator=gen),
            "conditioning_llama3": torch.randn((1, 2, TOKENS, 40), generator=gen)}


SPECS: Dict[str, tuple] = {
    "qwen_image": ("QwenImage", _qwen_image, None, (1, 16, 8, 8), 48),
    "hunyuan_video": ("HunyuanVideo", _hunyuan_video, _pooled(32), (1, 16, 2, 8, 8), 48),
    "ltxv": ("LTXV", _ltxv, _mask, (1, 128, 2, 4, 4), 48),
    "hunyuan_dit": ("HunyuanDiT1", _hunyuan_dit, _hydit_extra, (1, 4, 8, 8), 48),
    "mochi": ("GenmoMochi", _mochi, _mask, (1, 12, 2, 8, 8), 48),
    "auraflow": ("AuraFlow", _auraflow, None, (1, 4, 8, 8), 48),
    "lumina2": ("Lumina2", _lumina2, _mask, (1, 16, 8, 8), 48),
    "hidream": ("HiDream", _hidream, _hidream_extra, (1, 16, 8, 8), 48),
    "cosmos_predict2": ("CosmosT2IPredict2", _cosmos_predict2, None, (1, 16, 1, 8, 8), 48),
    "omnigen2": ("Omnigen2", _omnigen2, _mask, (1, 16, 8, 8), 48),
    "wan22_5b": ("WAN22_T2V", _wan22_5b, None, (1, 48, 2, 8, 8), 48),
    "wan_vace": ("WAN21_Vace", _wan_vace, None, (1, 16, 2, 8, 8), 48),
    "wan_camera": ("WAN21_Camera", _wan_camera, None, (1, 16, 2, 8, 8), 48),
    "hunyuan_image21": ("HunyuanImage21", _hunyuan_image21, None, (1, 64, 8, 8), 48),
    "cosmos1": ("CosmosT2V", _cosmos1, None, (1, 16, 1, 8, 8), 48),
    "stable_audio": ("StableAudio", _stable_audio, None, (1, 64, 16), 768),
    "hunyuan3d": ("Hunyuan3Dv2", _hunyuan3d, None, (1, 64, 32), 48),
    "hunyuan3d_21": ("Hunyuan3Dv2_1", _hunyuan3d_21, None, (1, 64, 32), 48),
}
FAMILIES = tuple(SPECS)
STATE_DICTS: Dict[str, Callable[[], dict]] = {"stable_audio": _stable_audio_state_dict}


def _fill_rotary_frequencies(model: torch.nn.Module) -> None:
    """Stable Audio's RotaryEmbedding allocates `inv_freq` with torch.empty and expects it from the
    checkpoint; a tiny model has none, so the buffer held whatever memory it got (sometimes NaN).
    Fill it with the formula the checkpoint holds (ComfyUI's comment: 1 / base^(2i / dim))."""
    for module in model.modules():
        if type(module).__name__ == "RotaryEmbedding" and isinstance(getattr(module, "inv_freq", None), torch.Tensor):
            half = module.inv_freq.shape[0]
            module.inv_freq.copy_(1.0 / (10000 ** (torch.arange(0, 2 * half, 2).float() / (2 * half))))


def build(family: str, seed: int, tiny_cls: type) -> Any:
    import comfy.supported_models

    from .comfy_models import instantiate

    class_name, unet_factory, extra, shape, width = SPECS[family]
    model_config = getattr(comfy.supported_models, class_name)(unet_factory())
    patcher, gen = instantiate(model_config, seed, STATE_DICTS[family]() if family in STATE_DICTS else None)
    if family == "stable_audio":
        _fill_rotary_frequencies(patcher.model.diffusion_model)

    def conditioning():
        cond = torch.randn((1, TOKENS, width), generator=gen)
        return [[cond, extra(gen) if extra is not None else {}]]
    positive, negative = conditioning(), conditioning()
    return tiny_cls(patcher=patcher, positive=positive, negative=negative, latent={"samples": torch.zeros(shape)},
                    family=family)
