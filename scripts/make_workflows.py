"""Write the example workflows in workflows/ (ComfyUI UI format). Run after changing a node's inputs:

    python scripts/make_workflows.py

Each workflow is a short graph description; widget values are listed in the order ComfyUI
shows them. tests/integration/test_workflows.py checks every file against the real node
schemas, and the browser test opens each one in the real frontend.
"""
from __future__ import annotations

import json
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "workflows"

# Output types per node type (what links from its slots carry), for the ones used here.
OUTPUTS = {
    "CheckpointLoaderSimple": ["MODEL", "CLIP", "VAE"], "UNETLoader": ["MODEL"], "CLIPLoader": ["CLIP"],
    "DualCLIPLoader": ["CLIP"], "VAELoader": ["VAE"], "CLIPTextEncode": ["CONDITIONING"],
    "FluxGuidance": ["CONDITIONING"], "ModelSamplingSD3": ["MODEL"], "EmptyLatentImage": ["LATENT"],
    "EmptySD3LatentImage": ["LATENT"], "EmptyHunyuanLatentVideo": ["LATENT"], "KSampler": ["LATENT"],
    "KSamplerAdvanced": ["LATENT"],
    "VAEDecode": ["IMAGE"], "SaveImage": [], "PreviewImage": [], "SaveAnimatedWEBP": [], "PreviewAny": [],
    "CacheKitDeepCache": ["MODEL"], "CacheKitFORA": ["MODEL"], "CacheKitAdaptiveSkip": ["MODEL"],
    "CacheKitAutotune": ["MODEL", "CACHEKIT_SETTINGS", "STRING"], "CacheKitStats": ["IMAGE", "STRING"],
    "CacheKitRouter": ["MODEL"], "CacheKitChangeCache": ["MODEL"], "CacheKitDyFLUX": ["MODEL"],
    "Note": [],
    "ImageOnlyCheckpointLoader": ["MODEL", "CLIP_VISION", "VAE"], "LoadImage": ["IMAGE", "MASK"],
    "SVD_img2vid_Conditioning": ["CONDITIONING", "CONDITIONING", "LATENT"], "VideoLinearCFGGuidance": ["MODEL"],
}
OUTPUT_NAMES = {"CacheKitAutotune": ["MODEL", "settings", "report"], "CacheKitStats": ["heatmap", "summary"],
                "CheckpointLoaderSimple": ["MODEL", "CLIP", "VAE"],
                "SVD_img2vid_Conditioning": ["positive", "negative", "latent"]}

DEEPCACHE = [3, 0, "uniform", 15, 1.4, 0.0, 1.0, "hold"]  # interval, branch, schedule, center, power, start, end, reuse
FORA = [3, 0.0, 1.0, "hold"]                              # interval, start, end, reuse
FORA_LATE = [3, 0.1, 1.0, "hold"]                         # FORA from 10 % of the schedule
ADAPTIVE = [0.01, 4, "hold", 4]                           # delta, max_skip_steps, reuse, warmup_steps
CHANGE = [0.05, 2, 3, 0, 0.0, 1.0, "hold"]  # threshold, warmup_steps, max_reuse, cache_branch, start, end, reuse


class Workflow:
    def __init__(self):
        self.nodes, self.links = [], []

    def node(self, type_, widgets=(), pos=(0, 0), title=None, size=None, **inputs) -> int:
        """inputs: name=(node id, output slot, type)."""
        node_id = len(self.nodes) + 1
        node = {"id": node_id, "type": type_, "pos": list(pos), "size": list(size or (320, 120)), "flags": {},
                "order": node_id - 1, "mode": 0, "inputs": [], "outputs": [],
                "properties": {"Node name for S&R": type_}, "widgets_values": list(widgets)}
        if title:
            node["title"] = title
        for name, (src, slot, type_name) in inputs.items():
            link_id = len(self.links) + 1
            self.links.append([link_id, src, slot, node_id, len(node["inputs"]), type_name])
            node["inputs"].append({"name": name, "type": type_name, "link": link_id})
            self.nodes[src - 1]["outputs"][slot]["links"].append(link_id)
        names = OUTPUT_NAMES.get(type_, OUTPUTS[type_])
        node["outputs"] = [{"name": n, "type": t, "links": [], "slot_index": i}
                           for i, (n, t) in enumerate(zip(names, OUTPUTS[type_]))]
        self.nodes.append(node)
        return node_id

    def note(self, text: str, pos) -> int:
        return self.node("Note", [text], pos=pos, size=(420, 220), title="About this workflow")

    def save(self, name: str) -> None:
        data = {"last_node_id": len(self.nodes), "last_link_id": len(self.links), "nodes": self.nodes,
                "links": self.links, "groups": [], "config": {}, "extra": {"ds": {"scale": 0.8, "offset": [0, 0]}},
                "version": 0.4}
        (OUT / f"{name}.json").write_text(json.dumps(data, indent=1) + "\n")


def _sample_and_save(w, model, pos, neg, latent, vae, sampler=(20, 7.0, "euler", "normal"), video=False, x=1000):
    steps, cfg, sampler_name, scheduler = sampler
    ks = w.node("KSampler", [0, "fixed", steps, cfg, sampler_name, scheduler, 1.0], pos=(x, 100), size=(320, 260),
                model=(model, 0, "MODEL"), positive=(pos, 0, "CONDITIONING"), negative=(neg, 0, "CONDITIONING"),
                latent_image=(latent, 0, "LATENT"))
    _decode_and_save(w, ks, vae, x + 360, video=video)
    return ks


def _decode_and_save(w, samples, vae, x, video=False, fps=16.0, quality=90):
    """VAEDecode the samples and save the images (an animated WEBP for video), at column x."""
    decode = w.node("VAEDecode", pos=(x, 100), samples=(samples, 0, "LATENT"), vae=vae)
    if video:
        w.node("SaveAnimatedWEBP", ["CacheKit", fps, False, quality, "default"], pos=(x, 220),
               images=(decode, 0, "IMAGE"))
    else:
        w.node("SaveImage", ["CacheKit"], pos=(x, 220), size=(320, 320), images=(decode, 0, "IMAGE"))


def _stats(w, model, ks, x=1000):
    stats = w.node("CacheKitStats", pos=(x, 420), model=(model, 0, "MODEL"), samples=(ks, 0, "LATENT"))
    w.node("PreviewImage", pos=(x + 360, 560), images=(stats, 0, "IMAGE"))
    w.node("PreviewAny", pos=(x, 560), source=(stats, 1, "STRING"))


def _checkpoint(w, ckpt, prompt, negative, size, latent_type="EmptyLatentImage"):
    ckpt_node = w.node("CheckpointLoaderSimple", [ckpt], pos=(0, 100))
    pos = w.node("CLIPTextEncode", [prompt], pos=(380, 0), clip=(ckpt_node, 1, "CLIP"))
    neg = w.node("CLIPTextEncode", [negative], pos=(380, 200), clip=(ckpt_node, 1, "CLIP"))
    latent = w.node(latent_type, [size, size, 1], pos=(380, 400))
    return ckpt_node, pos, neg, latent


PROMPT = "a lighthouse on a cliff at sunset, dramatic sky, detailed"
NEG = "blurry, low quality"
VIDEO_PROMPT = "a red fox running through fresh snow, cinematic"


def sd_deepcache(name, ckpt, size, note):
    w = Workflow()
    ckpt_node, pos, neg, latent = _checkpoint(w, ckpt, PROMPT, NEG, size)
    dc = w.node("CacheKitDeepCache", DEEPCACHE, pos=(700, 100), size=(320, 260), model=(ckpt_node, 0, "MODEL"))
    ks = _sample_and_save(w, dc, pos, neg, latent, (ckpt_node, 2, "VAE"))
    _stats(w, dc, ks)
    w.note(note, pos=(0, 420))
    w.save(name)


def adaptive(name):
    w = Workflow()
    ckpt_node, pos, neg, latent = _checkpoint(w, "v1-5-pruned-emaonly-fp16.safetensors", PROMPT, NEG, 512)
    ad = w.node("CacheKitAdaptiveSkip", ADAPTIVE, pos=(700, 100), model=(ckpt_node, 0, "MODEL"))
    ks = _sample_and_save(w, ad, pos, neg, latent, (ckpt_node, 2, "VAE"), sampler=(50, 7.0, "euler", "normal"))
    _stats(w, ad, ks)
    w.note("AdaptiveDiffusion step skipping works on any model. A step reuses the previous noise prediction when "
           "the latents change smoothly; a skipped step runs nothing at all (no CFG branch, no ControlNet).\n\n"
           "delta 0.01 is the official default: raise it to skip more, 0 never skips. max_skip_steps caps "
           "skips in a row. The first 4 steps always run. It pays off most with many steps (here 50).\n\n"
           "For accuracy at up to 1.8x: max_skip_steps 1, reuse forecast2, delta 1.0 (every other step skips and "
           "its prediction is extrapolated from the computed ones; on the bundled tiny DiT 39 dB at 1.7x).\n\n"
           "Cache Stats shows which steps were skipped (orange in the sidebar tab).", pos=(0, 420))
    w.save(name)


def stack(name):
    w = Workflow()
    ckpt_node, pos, neg, latent = _checkpoint(w, "v1-5-pruned-emaonly-fp16.safetensors", PROMPT, NEG, 512)
    dc = w.node("CacheKitDeepCache", DEEPCACHE, pos=(700, 0), size=(320, 260), model=(ckpt_node, 0, "MODEL"))
    ad = w.node("CacheKitAdaptiveSkip", [0.02, 2, "hold", 4], pos=(700, 300), model=(dc, 0, "MODEL"))
    ks = _sample_and_save(w, ad, pos, neg, latent, (ckpt_node, 2, "VAE"), sampler=(40, 7.0, "euler", "normal"))
    _stats(w, ad, ks)
    w.note("A stack: DeepCache reuses the deep U-Net features between full steps, and adaptive step skipping "
           "skips whole steps where the latents change smoothly. Put the step skipper last: a skipped step then "
           "runs no DeepCache unit either, and the skipped steps show in both methods' statistics.", pos=(0, 420))
    w.save(name)


def autotune(name):
    w = Workflow()
    ckpt_node, pos, neg, latent = _checkpoint(w, "v1-5-pruned-emaonly-fp16.safetensors", PROMPT, NEG, 512)
    calib = w.node("EmptyLatentImage", [512, 512, 1], pos=(380, 560), title="Calibration latent")
    tune = w.node("CacheKitAutotune", [0, "fixed", 20, 7.0, "euler", "normal", "deepcache", "psnr", 30.0, 8],
                  pos=(700, 300), size=(320, 380), model=(ckpt_node, 0, "MODEL"), positive=(pos, 0, "CONDITIONING"),
                  negative=(neg, 0, "CONDITIONING"), latent_image=(calib, 0, "LATENT"), vae=(ckpt_node, 2, "VAE"))
    w.node("PreviewAny", pos=(700, 720), source=(tune, 2, "STRING"))
    dc = w.node("CacheKitDeepCache", DEEPCACHE, pos=(700, 0), size=(320, 260), model=(ckpt_node, 0, "MODEL"),
                settings=(tune, 1, "CACHEKIT_SETTINGS"))
    ks = _sample_and_save(w, dc, pos, neg, latent, (ckpt_node, 2, "VAE"), x=1100)
    _stats(w, dc, ks, x=1100)
    w.note("Autotune runs a few calibration samplings with this prompt and sampler, and picks DeepCache's settings: "
           "the fastest that keeps PSNR vs. uncached at or above 30 dB (on decoded images, since a VAE is "
           "connected). Its settings output drives the DeepCache node, whose own widgets are then ignored; the "
           "report lists the speed/quality frontier. Tuning costs 3 + max_trials samplings: run it once, then keep "
           "the settings (or copy them into the widgets and remove Autotune).", pos=(0, 620))
    w.save(name)


def fora_sd3(name):
    w = Workflow()
    ckpt_node, pos, neg, latent = _checkpoint(w, "sd3.5_medium_incl_clips_t5xxlfp8scaled.safetensors", PROMPT, NEG,
                                              1024, latent_type="EmptySD3LatentImage")
    fora = w.node("CacheKitFORA", FORA, pos=(700, 100), model=(ckpt_node, 0, "MODEL"))
    ks = _sample_and_save(w, fora, pos, neg, latent, (ckpt_node, 2, "VAE"), sampler=(28, 4.5, "euler", "sgm_uniform"))
    _stats(w, fora, ks)
    w.note("FORA on SD3 / SD3.5 (MMDiT). Every `interval` steps everything is computed; in between each block "
           "reuses its cached residual (MMDiT's joint text+image attention is computed inline in the block, so "
           "the unit is the block). The first and last steps are always computed. interval 2-3 keeps quality "
           "close to uncached; start_percent 0.2 protects the composition-forming early steps.", pos=(0, 620))
    w.save(name)


def _split_schedule(w, models, conds, latent, sampler, split, labels, y):
    """One schedule on two models: steps 0..split-1 on models[0], the rest on models[1] (two KSamplerAdvanced,
    the second at height y). conds: (positive, negative) per model. Returns both samplers."""
    steps, cfg, sampler_name, scheduler = sampler
    first = w.node("KSamplerAdvanced", ["enable", 0, "fixed", steps, cfg, sampler_name, scheduler, 0, split, "enable"],
                   pos=(1060, 100), size=(320, 330), title=f"KSampler ({labels[0]}: steps 0-{split - 1})",
                   model=(models[0], 0, "MODEL"), positive=(conds[0][0], 0, "CONDITIONING"),
                   negative=(conds[0][1], 0, "CONDITIONING"), latent_image=(latent, 0, "LATENT"))
    second = w.node("KSamplerAdvanced",
                    ["disable", 0, "fixed", steps, cfg, sampler_name, scheduler, split, 10000, "disable"],
                    pos=(1060, y), size=(320, 330), title=f"KSampler ({labels[1]}: steps {split}-{steps - 1})",
                    model=(models[1], 0, "MODEL"), positive=(conds[1][0], 0, "CONDITIONING"),
                    negative=(conds[1][1], 0, "CONDITIONING"), latent_image=(first, 0, "LATENT"))
    return first, second


def _unet_clip_vae(w, unet, clip, clip_type, vae, dual=None):
    model = w.node("UNETLoader", [unet, "default"], pos=(0, 0))
    if dual:
        clip_node = w.node("DualCLIPLoader", [dual[0], dual[1], clip_type, "default"], pos=(0, 160))
    else:
        clip_node = w.node("CLIPLoader", [clip, clip_type, "default"], pos=(0, 160))
    vae_node = w.node("VAELoader", [vae], pos=(0, 320))
    return model, clip_node, vae_node


def change_sd15(name):
    w = Workflow()
    ckpt_node, pos, neg, latent = _checkpoint(w, "v1-5-pruned-emaonly-fp16.safetensors", PROMPT, NEG, 512)
    ch = w.node("CacheKitChangeCache", CHANGE, pos=(700, 100), size=(320, 230), model=(ckpt_node, 0, "MODEL"))
    ks = _sample_and_save(w, ch, pos, neg, latent, (ckpt_node, 2, "VAE"), sampler=(30, 7.0, "euler", "normal"))
    _stats(w, ch, ks)
    w.note("ChangeCache decides every step from the data (the First Block Cache / TeaCache family): the first "
           "input block always runs; when its output changed less than `threshold` since the last full step, the "
           "deep part of the U-Net (below cache_branch, as DeepCache) reuses its stored features.\n\n"
           "The CacheKit sidebar tab shows each step's change value: set threshold between the values of steps you "
           "want reused and those you want computed. 0 never reuses. warmup_steps always compute; max_reuse caps "
           "reused steps in a row.", pos=(0, 420))
    w.save(name)


def _dit(name, loaders, prompt, negative, latent, patch, sampler, note, shift=None, guidance=None, video=False,
         size=None, latent_takes_vae=False):
    """Text-to-image or -video on a UNETLoader model with one CacheKit node on it. loaders: _unet_clip_vae's
    arguments; latent, patch: (node type, widgets); shift: (model sampling node type, shift) on the model;
    guidance: a FluxGuidance value on the positive prompt (guidance-distilled models)."""
    w = Workflow()
    model, clip, vae = _unet_clip_vae(w, *loaders)
    if shift:
        model = w.node(shift[0], [shift[1]], pos=(380, 560), model=(model, 0, "MODEL"))
    pos = w.node("CLIPTextEncode", [prompt], pos=(380, 0), clip=(clip, 0, "CLIP"))
    neg_y, latent_y = 200, 400
    if guidance is not None:
        pos = w.node("FluxGuidance", [guidance], pos=(380, 160), conditioning=(pos, 0, "CONDITIONING"))
        neg_y, latent_y = 280, 440
    neg = w.node("CLIPTextEncode", [negative], pos=(380, neg_y), clip=(clip, 0, "CLIP"))
    vae_input = {"vae": (vae, 0, "VAE")} if latent_takes_vae else {}
    latent = w.node(latent[0], latent[1], pos=(380, latent_y), **vae_input)
    patched = w.node(patch[0], patch[1], pos=(700, 100), size=size, model=(model, 0, "MODEL"))
    ks = _sample_and_save(w, patched, pos, neg, latent, (vae, 0, "VAE"), sampler=sampler, video=video)
    _stats(w, patched, ks)
    w.note(note, pos=(0, 620))
    w.save(name)


def _flux(name, patch_type, widgets, steps, note, size=None, unet="flux1-dev.safetensors"):
    """Flux dev text-to-image with one CacheKit node on the model."""
    _dit(name, (unet, None, "flux", "ae.safetensors", ("clip_l.safetensors", "t5xxl_fp16.safetensors")), PROMPT, "",
         ("EmptySD3LatentImage", [1024, 1024, 1]), (patch_type, widgets), (steps, 1.0, "euler", "simple"), note,
         guidance=3.5, size=size)


def change_flux(name):
    _flux(name, "CacheKitChangeCache", [0.12, 2, 3, 0, 0.0, 1.0, "hold"], 28,
          "ChangeCache on Flux (also Chroma, SD3, PixArt, Wan): the first double block always runs; while its "
          "residual changed less than `threshold` since the last full step, every other block reuses its residual "
          "(First Block Cache's rule; 0.12 is the usual Flux setting). The sidebar shows each step's change value. "
          "reuse forecast1 extrapolates the residuals instead of holding them.", size=(320, 230))


def fora_flux(name):
    _flux(name, "CacheKitFORA", FORA, 20,
          "FORA on Flux (also Chroma). Flux's blocks compute joint attention inline, so each block is a unit and "
          "FORA reuses its residual between refreshes. Flux dev is guidance-distilled: cfg 1, guidance from "
          "FluxGuidance. interval 2 is a safe start at 20 steps; 3 is faster.")


def _pixart(name, patch_type, widgets, note):
    """PixArt Sigma text-to-image with one CacheKit node (FORA or a router) on the model."""
    _dit(name, ("PixArt-Sigma-XL-2-1024-MS.pth", "t5xxl_fp16.safetensors", "pixart", "sdxl_vae.safetensors"),
         PROMPT, NEG, ("EmptyLatentImage", [1024, 1024, 1]), (patch_type, widgets), (20, 4.5, "euler", "normal"),
         note)


def fora_pixart(name):
    _pixart(name, "CacheKitFORA", FORA,
            "FORA on PixArt α/Σ with the official semantics: each block's self-attention, cross-attention and MLP "
            "outputs are cached before their adaLN gates, so every step still applies its own gates.")


def router_pixart(name):
    _pixart(name, "CacheKitRouter", ["pixart_sigma_20steps_harmonica.safetensors", 0.0, "as trained"],
            "A learned router (Learning-to-Cache or HarmoniCa) decides per step and sub-layer whether to recompute "
            "or reuse. Put router files in models/cachekit_routers/: CacheKit's .safetensors routers, or official "
            "L2C .pt files. A router only fits the model and step count it was trained for (here PixArt Σ at 20 "
            "steps; the node says what does not fit). threshold 0 uses the router's own; higher reuses more.")


def _wan(name, unet, vae, latent, sampler, note, latent_takes_vae=False):
    """Wan text-to-video with FORA from 10 % (ComfyUI's template settings: shift 8)."""
    _dit(name, (unet, "umt5_xxl_fp8_e4m3fn_scaled.safetensors", "wan", vae), VIDEO_PROMPT, NEG, latent,
         ("CacheKitFORA", FORA_LATE), sampler, note, shift=("ModelSamplingSD3", 8.0), video=True,
         latent_takes_vae=latent_takes_vae)


def fora_wan(name):
    _wan(name, "wan2.1_t2v_1.3B_fp16.safetensors", "wan_2.1_vae.safetensors",
         ("EmptyHunyuanLatentVideo", [832, 480, 33, 1]), (30, 6.0, "uni_pc", "simple"),
         "FORA on Wan 2.x video. Self-attention, cross-attention and MLP outputs are reused between refreshes "
         "with the current step's gates. start_percent 0.1 computes the first tenth fully, where motion is "
         "laid out. Video models repeat a lot between steps: interval 3 is usually safe.")


def fora_wan22_two_experts(name):
    """Wan 2.2 14B: the high-noise expert samples steps 0-9, the low-noise expert 10-19 of one
    20-step schedule (two KSamplerAdvanced), each expert patched by its own FORA node."""
    w = Workflow()
    clip = w.node("CLIPLoader", ["umt5_xxl_fp8_e4m3fn_scaled.safetensors", "wan", "default"], pos=(0, 320))
    vae = w.node("VAELoader", ["wan_2.1_vae.safetensors"], pos=(0, 480))
    pos = w.node("CLIPTextEncode", [VIDEO_PROMPT], pos=(380, 0),
                 clip=(clip, 0, "CLIP"))
    neg = w.node("CLIPTextEncode", [NEG], pos=(380, 200), clip=(clip, 0, "CLIP"))
    latent = w.node("EmptyHunyuanLatentVideo", [832, 480, 81, 1], pos=(380, 400))
    experts = []
    for row, (unet, title, fora) in enumerate((
            ("wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors", "FORA: high-noise expert", [2, 0.1, 1.0, "hold"]),
            ("wan2.2_t2v_low_noise_14B_fp8_scaled.safetensors", "FORA: low-noise expert", [3, 0.0, 1.0, "hold"]))):
        y = row * 420
        model = w.node("UNETLoader", [unet, "default"], pos=(0, y if row == 0 else 160))
        shifted = w.node("ModelSamplingSD3", [8.0], pos=(380, 560 + y // 3), model=(model, 0, "MODEL"))
        experts.append(w.node("CacheKitFORA", fora, pos=(700, 100 + y), title=title, model=(shifted, 0, "MODEL")))
    _, low = _split_schedule(w, experts, ((pos, neg), (pos, neg)), latent, (20, 3.5, "euler", "simple"), 10,
                             ("high noise", "low noise"), 480)
    _decode_and_save(w, low, (vae, 0, "VAE"), 1420, video=True)
    _stats(w, experts[1], low, x=1420)
    w.note("Wan 2.2 14B runs one 20-step schedule on two experts: the high-noise model samples steps 0-9, the "
           "low-noise model steps 10-19 (two KSamplerAdvanced with the same steps, split at 10). Each expert has "
           "its own FORA node and settings; their caches are never shared.\n\n"
           "CacheKit counts steps in the whole schedule (found from the sigmas each sampler gets), so the low-noise "
           "run's steps are 10-19, start/end_percent mean the same share of the schedule on both nodes, and FORA's "
           "refresh countdown runs across the split. The low expert's first step always computes: nothing before it "
           "is its own to reuse. The CacheKit sidebar shows both runs as 'steps 0-9 of 20' and 'steps 10-19 of 20'.\n\n"
           "The high-noise expert lays out composition and motion: interval 2 from 10 %. The low-noise expert refines "
           "detail and repeats more: interval 3. With a 4-step distilled LoRA (lightx2v: 2 + 2 steps) caching starts "
           "at the middle of the schedule at the earliest and the run notes say so; there is little left to reuse.",
           pos=(0, 760))
    w.save(name)


def deepcache_sd21(name):
    """SD2.1 768-v: the same U-Net units as SD1.5 (linear transformer projections, 1024-wide context)."""
    sd_deepcache(name, "v2-1_768-ema-pruned.safetensors", 768,
                 "DeepCache on SD2.1 (768-v, v-prediction; 512-base works the same). Its U-Net has SD1.5's layout, "
                 "so the same settings apply: interval 3, branch 0 to start; raise cache_branch (up to 10) when fine "
                 "detail suffers. Prediction type (eps or v) does not matter to DeepCache: it reuses features inside "
                 "the U-Net, not the prediction.")


def deepcache_sdxl_refiner(name):
    """SDXL base (steps 0-19) then the refiner (steps 20-24) of one 25-step schedule, each with DeepCache."""
    w = Workflow()
    nodes_ = {}
    for row, (ckpt, title, settings) in enumerate((
            ("sd_xl_base_1.0.safetensors", "DeepCache: SDXL base", DEEPCACHE),
            ("sd_xl_refiner_1.0.safetensors", "DeepCache: SDXL refiner", [2] + DEEPCACHE[1:]))):
        y = row * 460
        ckpt_node = w.node("CheckpointLoaderSimple", [ckpt], pos=(0, 100 + y))
        pos = w.node("CLIPTextEncode", [PROMPT], pos=(380, y), clip=(ckpt_node, 1, "CLIP"))
        neg = w.node("CLIPTextEncode", [NEG], pos=(380, 200 + y), clip=(ckpt_node, 1, "CLIP"))
        dc = w.node("CacheKitDeepCache", settings, pos=(700, 100 + y), size=(320, 260), title=title,
                    model=(ckpt_node, 0, "MODEL"))
        nodes_[row] = (ckpt_node, pos, neg, dc)
    latent = w.node("EmptyLatentImage", [1024, 1024, 1], pos=(380, 920))
    (_, pos_b, neg_b, dc_b), (ckpt_r, pos_r, neg_r, dc_r) = nodes_[0], nodes_[1]
    base, refine = _split_schedule(w, (dc_b, dc_r), ((pos_b, neg_b), (pos_r, neg_r)), latent,
                                   (25, 7.0, "euler", "normal"), 20, ("base", "refiner"), 560)
    _decode_and_save(w, refine, (ckpt_r, 2, "VAE"), 1420)
    _stats(w, dc_b, base, x=1420)
    w.note("SDXL base + refiner, one 25-step schedule: the base samples steps 0-19, the refiner 20-24. Each model "
           "has its own DeepCache node; their caches are never shared (different U-Nets: the refiner has 4 levels, "
           "384 channels and its own conditioning).\n\nCacheKit counts steps in the whole schedule, so the "
           "refiner's run is 'steps 20-24 of 25' in the sidebar. Its first step always computes (nothing before it "
           "is its own to reuse); with only 5 steps it uses interval 2. Branch 0 to start on both; the refiner "
           "allows branches 0-10, the base 0-7.", pos=(0, 1000))
    w.save(name)


def deepcache_svd(name):
    """SVD img2vid: DeepCache on the video U-Net (frames are the batch; temporal layers included)."""
    w = Workflow()
    ckpt = w.node("ImageOnlyCheckpointLoader", ["svd_xt.safetensors"], pos=(0, 100))
    image = w.node("LoadImage", ["example.png"], pos=(0, 260), size=(320, 320))
    cond = w.node("SVD_img2vid_Conditioning", [1024, 576, 25, 127, 6, 0.0], pos=(380, 100), size=(320, 260),
                  clip_vision=(ckpt, 1, "CLIP_VISION"), init_image=(image, 0, "IMAGE"), vae=(ckpt, 2, "VAE"))
    guided = w.node("VideoLinearCFGGuidance", [1.0], pos=(380, 420), model=(ckpt, 0, "MODEL"))
    dc = w.node("CacheKitDeepCache", DEEPCACHE, pos=(700, 100), size=(320, 260), model=(guided, 0, "MODEL"))
    ks = w.node("KSampler", [0, "fixed", 20, 2.5, "euler", "karras", 1.0], pos=(1060, 100), size=(320, 260),
                model=(dc, 0, "MODEL"), positive=(cond, 0, "CONDITIONING"), negative=(cond, 1, "CONDITIONING"),
                latent_image=(cond, 2, "LATENT"))
    _decode_and_save(w, ks, (ckpt, 2, "VAE"), 1420, video=True, fps=10.0, quality=85)
    _stats(w, dc, ks, x=1420)
    w.note("DeepCache on Stable Video Diffusion (img2vid, SVD-XT: 25 frames). SVD's U-Net is SD2's with temporal "
           "ResBlocks and temporal attention; DeepCache reuses its deep part, temporal layers included, and runs "
           "only the shallow branch on cache steps. All frames of a video are one batch: the cache is kept per "
           "cond/uncond stream and per frame count and size, so another video size or length never reuses it.\n\n"
           "interval 3, branch 0 to start; raise cache_branch (up to 10) if motion gets smeared. The sidebar card "
           "shows the cache's memory: one feature map per frame and stream.", pos=(0, 620))
    w.save(name)


def dyflux_flux(name):
    """FLUX.1-lite 8B (the model the official DyFLUX router was trained on) with DyFLUX token routing."""
    _flux(name, "CacheKitDyFLUX", ["dyflux_lite_8b.safetensors", 0.0], 28,
          "DyFLUX token routing (DyDiT on FLUX): in every block a trained router picks the image tokens that need "
          "it; the others skip the double blocks' image feed-forward and pass through the single blocks unchanged. "
          "The official router is trained for Freepik's FLUX.1-lite 8B (8 double + 38 single blocks), not FLUX.1 "
          "dev: download transformer_230000.pt from huggingface.co/heisejiasuo/DyFLUX, convert it with\n"
          "python scripts/convert_dyflux.py transformer_230000.pt dyflux_lite_8b.safetensors\n"
          "and put the .safetensors in models/cachekit_routers/. threshold 0 = the router's own (0.5); higher "
          "skips more tokens. Cache Stats shows the share of image tokens each block skipped per step.",
          unet="flux.1-lite-8B.safetensors")


# Node types of the DiT family workflows below (added here, next to their use).
OUTPUTS.update({"ModelSamplingAuraFlow": ["MODEL"], "Wan22ImageToVideoLatent": ["LATENT"]})


def fora_qwen_image(name):
    """Qwen-Image text-to-image (ComfyUI's template settings) with FORA."""
    _dit(name, ("qwen_image_fp8_e4m3fn.safetensors", "qwen_2.5_vl_7b_fp8_scaled.safetensors", "qwen_image",
                "qwen_image_vae.safetensors"),
         "a neon sign that reads \"CacheKit\" above a rainy street at night", "",
         ("EmptySD3LatentImage", [1328, 1328, 1]), ("CacheKitFORA", FORA_LATE), (20, 2.5, "euler", "simple"),
         shift=("ModelSamplingAuraFlow", 3.1),
         note="FORA on Qwen-Image. Each block's joint attention (image and text outputs) and its image and text MLPs "
              "are cached before their gates, so every step applies its own modulation. interval 3 with "
              "start_percent 0.1 (the layout-forming first steps computed fully) is a good start at 20 steps; "
              "interval 2 for text-heavy images. The same node works on every DiT family CacheKit lists.")


def fora_hunyuan_video(name):
    """HunyuanVideo text-to-video (ComfyUI's example settings) with FORA."""
    _dit(name, ("hunyuan_video_t2v_720p_bf16.safetensors", None, "hunyuan_video", "hunyuan_video_vae_bf16.safetensors",
                ("clip_l.safetensors", "llava_llama3_fp8_scaled.safetensors")),
         VIDEO_PROMPT, "", ("EmptyHunyuanLatentVideo", [848, 480, 73, 1]), ("CacheKitFORA", FORA_LATE),
         (30, 1.0, "euler", "simple"), guidance=6.0, video=True,
         note="FORA on HunyuanVideo (also HunyuanImage 2.1). Its blocks compute attention inline (Flux-style), so "
              "each double and single block is a unit and FORA reuses its residual between refreshes. HunyuanVideo "
              "is guidance-distilled: cfg 1, guidance from FluxGuidance. Video repeats a lot between steps: interval 3 "
              "with start_percent 0.1 is a good start.")


def fora_wan22_5b(name):
    """Wan 2.2 TI2V 5B text-to-video (ComfyUI's template settings) with FORA."""
    _wan(name, "wan2.2_ti2v_5B_fp16.safetensors", "wan2.2_vae.safetensors",
         ("Wan22ImageToVideoLatent", [1280, 704, 121, 1]), (20, 5.0, "uni_pc", "simple"),
         "FORA on Wan 2.2 TI2V 5B (the same WanModel as Wan 2.1, with the 48-channel Wan 2.2 VAE). "
         "Self-attention, cross-attention and MLP outputs are reused between refreshes with the current step's "
         "gates. Connect a start_image to Wan22ImageToVideoLatent for image-to-video. interval 3 with "
         "start_percent 0.1 is a good start.", latent_takes_vae=True)


def main():
    OUT.mkdir(exist_ok=True)
    sd_deepcache("deepcache_sd15", "v1-5-pruned-emaonly-fp16.safetensors", 512,
                 "DeepCache on SD1.5. On cache steps only the shallow branch of the U-Net runs; the deep features "
                 "come from the last full step.\n\ncache_interval 3: a full step every 3 steps (1 disables caching). "
                 "cache_branch 0 is the fastest; higher keeps more of the U-Net live (better quality, less speed). "
                 "The non-uniform schedule packs full steps around `center`.\n\nCache Stats and the CacheKit sidebar "
                 "tab show what was reused.")
    sd_deepcache("deepcache_sdxl", "sd_xl_base_1.0.safetensors", 1024,
                 "DeepCache on SDXL. Same settings as on SD1.5: interval 3, branch 0 is a good start. SDXL's deeper "
                 "U-Net makes each cache step relatively cheaper.")
    fora_sd3("fora_sd3")
    fora_flux("fora_flux")
    fora_pixart("fora_pixart")
    fora_wan("fora_wan")
    fora_wan22_two_experts("fora_wan22_two_experts")
    router_pixart("router_pixart")
    adaptive("adaptive_skip_sd15")
    stack("stack_deepcache_adaptive_sd15")
    autotune("autotune_deepcache_sd15")
    change_sd15("change_cache_sd15")
    change_flux("change_cache_flux")
    dyflux_flux("dyflux_token_flux")
    deepcache_sd21("deepcache_sd21")
    deepcache_sdxl_refiner("deepcache_sdxl_refiner")
    deepcache_svd("deepcache_svd")
    fora_qwen_image("fora_qwen_image")
    fora_hunyuan_video("fora_hunyuan_video")
    fora_wan22_5b("fora_wan22_5b")
    print("\n".join(sorted(p.name for p in OUT.glob("*.json"))))


if __name__ == "__main__":
    main()
