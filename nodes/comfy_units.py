"""Unit maps of ComfyUI's model classes, as data.

Each family says which units it has and how CacheKit reaches them:

* "gate":  U-Net blocks (input_blocks, middle_block, output_blocks). ComfyUI runs them with
           forward_timestep_embed, which iterates the block instead of calling it; the block is
           swapped (object patch) for a proxy that yields one gate, handled by a
           forward_timestep_embed_patch.
* "proxy": a submodule called as a module (attention, cross-attention, MLP of PixArt, Wan,
           Qwen-Image, Lumina 2, HiDream, LTX-Video, HunyuanDiT, Cosmos 1 / Predict2, Mochi,
           AuraFlow, OmniGen2, Stable Audio, Hunyuan3D 2.1; their blocks apply the gates outside
           them); swapped (object patch) for a proxy of itself.
* "dit":   a whole block reached through ComfyUI's patches_replace["dit"] (Flux, Chroma, SD3
           MMDiT, HunyuanVideo / HunyuanImage 2.1, Hunyuan3D 2.0). Their attention is computed
           inline in the block (no attention module to cache), so the unit is the block and FORA
           stores its residual.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core.units import StoreMode, UNetGeometry, Unit, UnitMap, chain_readers


@dataclass(frozen=True)
class Slot:
    how: str                  # "gate" | "proxy" | "dit"
    path: str = ""            # object patch path under the BaseModel ("diffusion_model....")
    dit_key: tuple[str, int] | None = None   # ("double_block", i) / ("single_block", i)


@dataclass(frozen=True)
class ComfyLayout:
    units: UnitMap
    slots: tuple[Slot, ...]


def _class_names(model: torch.nn.Module) -> set[str]:
    return {cls.__name__ for cls in type(model).__mro__}


def is_unet_model(model: torch.nn.Module) -> bool:
    """ComfyUI's UNetModel (SD1.x, SD2.x, SDXL and relatives, SVD's video U-Net). Stable Cascade's
    StageB / StageC are U-shaped but not UNetModels (no forward_timestep_embed): not this."""
    return "UNetModel" in _class_names(model) and hasattr(model, "input_blocks")


def unet_layout(model: torch.nn.Module) -> ComfyLayout:
    """DeepCache units of ComfyUI's UNetModel: SD1.x (+ inpaint, InstructPix2Pix, Zero123), SD2.x
    (+ unCLIP, x4 upscaler, Lotus), SDXL (+ refiner, SSD-1B, Vega, KOALA, InstructPix2Pix) and SVD /
    SV3D, whose temporal ResBlocks and transformers sit inside the same blocks and receive the
    video arguments through the gate handler (nodes/comfy_host.py) unchanged."""
    if not is_unet_model(model):
        raise ValueError(
            f"CacheKit DeepCache needs a U-Net model (SD1.x, SD2.x, SDXL, SVD); this model is "
            f"{type(model).__name__}. For DiT models (SD3, Flux, PixArt, Wan) use CacheKit FORA.")
    res_blocks = list(model.num_res_blocks)
    levels = len(res_blocks)
    units: list[Unit] = []
    slots: list[Slot] = []
    positions: list[tuple[int, int]] = []
    producers = [-1]            # hs.append order (-1: input_blocks[0], the input convolution)
    skips: dict[int, int] = {}  # output unit -> the input unit whose output it pops from hs

    def add(name, group, kind, position, path):
        units.append(Unit(name, group, kind))
        slots.append(Slot("gate", path))
        positions.append(position)
        return len(units) - 1

    k = 1   # input_blocks[0] is the input convolution: always computed
    for level in range(levels):
        layers = res_blocks[level] + (1 if level < levels - 1 else 0)
        for layer in range(layers):
            producers.append(add(f"input.{k}", f"in {level}.{layer}", "down", (level, layer),
                                 f"diffusion_model.input_blocks.{k}"))
            k += 1
    if k != len(model.input_blocks):
        raise ValueError(f"Unexpected U-Net layout ({len(model.input_blocks)} input blocks, expected {k}); "
                         "CacheKit DeepCache does not support this model.")
    if model.middle_block is not None:
        add("middle", "mid", "mid", (0, 0), "diffusion_model.middle_block")
    m = 0
    for level in reversed(range(levels)):
        for j in range(res_blocks[level] + 1):
            layer = res_blocks[level] - j
            skips[add(f"output.{m}", f"out {level}.{layer}", "up", (level, layer),
                      f"diffusion_model.output_blocks.{m}")] = producers.pop()
            m += 1
    unit_map = UnitMap("unet", tuple(units), readers=chain_readers(len(units), skips),
                       geometry=UNetGeometry(tuple(positions), max(res_blocks) + 1))
    return ComfyLayout(unit_map, tuple(slots))


# DiT families reached with proxies (their blocks call attention / MLP as modules and apply the
# gates outside them, so the stored outputs are ungated): class name (or module.name where two
# ComfyUI classes share a name) -> (family, ((block list, ((child path under the block, kind),
# ...)), ...)). Children are in the block's call order. A router needs the same kinds in every
# block, so a text-stream MLP that some blocks lack stays computed (HiDream's `ff_t`, Mochi's
# `mlp_y`, AuraFlow's `mlpC`: the text stream is a small part of the tokens).
_PIXART_LIKE = (("attn", "attn"), ("cross_attn", "cross_attn"), ("mlp", "mlp"))
PROXY_FAMILIES = {
    "PixArtMS": ("pixart", (("blocks", _PIXART_LIKE),)),
    # WanModel and its subclasses: Wan 2.1 / 2.2 (14B and 5B), VACE, camera, HuMo, S2V, Animate
    "WanModel": ("wan", (("blocks", (("self_attn", "attn"), ("cross_attn", "cross_attn"), ("ffn", "mlp"))),)),
    # Qwen-Image: joint attention as a module (image and text outputs), then one MLP per stream
    "QwenImageTransformer2DModel": ("qwen_image", (("transformer_blocks", (("attn", "attn"), ("img_mlp", "mlp"),
                                                                           ("txt_mlp", "mlp_txt"))),)),
    # Lumina 2 (NextDiT): the main layers; the small refiner stacks stay computed
    "NextDiT": ("lumina2", (("layers", (("attention", "attn"), ("feed_forward", "mlp"))),)),
    "OmniGen2Transformer2DModel": ("omnigen2", (("layers", (("attn", "attn"), ("feed_forward", "mlp"))),)),
    # Cosmos Predict2 (MiniTrainDIT)
    "MiniTrainDIT": ("cosmos_predict2", (("blocks", (("self_attn", "attn"), ("cross_attn", "cross_attn"),
                                                      ("mlp", "mlp"))),)),
    # Cosmos 1 (GeneralDIT): each block is a ModuleDict entry of FA-CA-MLP building blocks
    "GeneralDIT": ("cosmos", (("blocks", (("blocks.0.block", "attn"), ("blocks.1.block", "cross_attn"),
                                          ("blocks.2.block", "mlp"))),)),
    # Stable Audio Open (its transformer's layers)
    "AudioDiffusionTransformer": ("stable_audio", (("transformer.layers", (("self_attn", "attn"),
                                                                          ("cross_attn", "cross_attn"),
                                                                          ("ff", "mlp"))),)),
    # Hunyuan3D 2.1 shape generation: the last blocks have a mixture-of-experts MLP instead of `mlp`
    "HunYuanDiTPlain": ("hunyuan3d_21", (("blocks", (("attn1", "attn"), ("attn2", "cross_attn"), ("mlp", "mlp"),
                                                     ("moe", "mlp"))),)),
    "HiDreamImageTransformer2DModel": ("hidream", (
        ("double_stream_blocks", (("block.attn1", "attn"), ("block.ff_i", "mlp"))),
        ("single_stream_blocks", (("block.attn1", "attn"), ("block.ff_i", "mlp"))))),
    # LTX-Video: self-attention, cross-attention, MLP (its blocks add them to x in place)
    "LTXVModel": ("ltxv", (("transformer_blocks", (("attn1", "attn"), ("attn2", "cross_attn"), ("ff", "mlp"))),)),
    # HunyuanDiT 1.0 / 1.1 (the long skips into the second half are computed in the block)
    "HunYuanDiT": ("hunyuan_dit", (("blocks", (("attn1", "attn"), ("attn2", "cross_attn"), ("mlp", "mlp"))),)),
    # Mochi: asymmetric joint attention (video and text outputs), the video MLP
    "AsymmDiTJoint": ("mochi", (("blocks", (("attn", "attn"), ("mlp_x", "mlp"))),)),
    # AuraFlow (its class is also called MMDiT: matched by its module)
    "comfy.ldm.aura.mmdit.MMDiT": ("auraflow", (("double_layers", (("attn", "attn"), ("mlpX", "mlp"))),
                                                ("single_layers", (("attn", "attn"), ("mlp", "mlp"))))),
}
# DiT families reached with patches_replace["dit"]: their attention is computed inline in the
# block (Flux-style qkv / attention / projection, SD3's joint block mixing), so the unit is the
# block and FORA stores its residual: class name -> (family, ((list, key name), ...)).
DIT_REPLACE_FAMILIES = {
    "Flux": ("flux", (("double_blocks", "double_block"), ("single_blocks", "single_block"))),
    # Chroma and Chroma Radiance
    "Chroma": ("chroma", (("double_blocks", "double_block"), ("single_blocks", "single_block"))),
    "MMDiT": ("mmdit", (("joint_blocks", "double_block"),)),
    # HunyuanVideo 1.0 (T2V, I2V, SkyReels) and HunyuanImage 2.1 (and its refiner)
    "HunyuanVideo": ("hunyuan_video", (("double_blocks", "double_block"), ("single_blocks", "single_block"))),
    # Hunyuan3D 2.0 and 2mini shape generation (Flux blocks)
    "Hunyuan3Dv2": ("hunyuan3d", (("double_blocks", "double_block"), ("single_blocks", "single_block"))),
}
FORA_FAMILIES_TEXT = ("SD3 / SD3.5 (MMDiT), Flux, Chroma, PixArt α/Σ, Wan 2.1 / 2.2 (incl. 5B, VACE, camera), "
                      "Qwen-Image, HunyuanVideo, HunyuanImage 2.1, HunyuanDiT, Lumina 2, HiDream, LTX-Video, "
                      "Cosmos 1 / Predict2, AuraFlow, Mochi, OmniGen2, Stable Audio Open, Hunyuan3D 2.0 / 2.1")
FORA_SUBLAYER_FAMILIES_TEXT = ("PixArt α/Σ, Wan 2.x, Qwen-Image, Lumina 2, HiDream, LTX-Video, HunyuanDiT, "
                               "Cosmos 1 / Predict2, Mochi, AuraFlow, OmniGen2, Stable Audio Open and Hunyuan3D 2.1")
# The families whose units are whole blocks (patches_replace["dit"], residuals stored).
FORA_BLOCK_FAMILIES_TEXT = "SD3, Flux, Chroma, HunyuanVideo / HunyuanImage 2.1 and Hunyuan3D 2.0"


def _matches(model: torch.nn.Module, key: str) -> bool:
    """`key` is a class name, or module.name, of the model's class or one of its bases."""
    return any(key == (f"{cls.__module__}.{cls.__name__}" if "." in key else cls.__name__)
               for cls in type(model).__mro__)


def _child(block: torch.nn.Module, path: str) -> torch.nn.Module | None:
    for attr in path.split("."):
        block = getattr(block, attr, None)
        if block is None:
            return None
    return block


def dit_layout(model: torch.nn.Module) -> ComfyLayout:
    """FORA units of ComfyUI's DiT classes."""
    for cls_name, (family, lists) in PROXY_FAMILIES.items():
        if _matches(model, cls_name):
            units, slots = [], []
            for list_attr, children in lists:
                group = "block" if len(lists) == 1 else list_attr.split("_")[0]
                # a ModuleList (names "0", "1", ...) or a ModuleDict (Cosmos 1: "block0", ...)
                for i, (name, block) in enumerate(_child(model, list_attr).named_children()):
                    for path, kind in children:
                        if _child(block, path) is None:
                            continue
                        units.append(Unit(f"{list_attr}.{name}.{path}", f"{group} {i}", kind))
                        slots.append(Slot("proxy", f"diffusion_model.{list_attr}.{name}.{path}"))
            return ComfyLayout(UnitMap(family, tuple(units)), tuple(slots))
    for cls_name, (family, lists) in DIT_REPLACE_FAMILIES.items():
        if _matches(model, cls_name):
            units, slots = [], []
            for list_attr, key in lists:
                for i in range(len(getattr(model, list_attr))):
                    short = key.split("_")[0]
                    units.append(Unit(f"{list_attr}.{i}", f"{short} {i}", "block", mode=StoreMode.RESIDUAL))
                    slots.append(Slot("dit", dit_key=(key, i)))
            return ComfyLayout(UnitMap(family, tuple(units)), tuple(slots))
    raise ValueError(
        f"CacheKit FORA does not support {type(model).__name__}. Supported DiT families: "
        f"{FORA_FAMILIES_TEXT}. For SD1.x / SD2.x / SDXL U-Nets use CacheKit DeepCache.")
