"""DeepCache on every UNetModel family ComfyUI ships, in real ComfyUI, on tiny models built
from ComfyUI's own classes with each family's detected config shrunk (comfy_unet_models.py):
SD1.5 (+ inpaint, InstructPix2Pix), SD2.x v-prediction, SDXL, the SDXL refiner, SSD-1B / Vega
(lone-ResBlock middle), KOALA (no middle block, one res block per level) and SVD img2vid
(temporal ResBlocks and transformers, frames as the batch); every U-Net config ComfyUI's model
detection knows, at full size on the meta device (layouts and branch ranges); video latents (SVD's
frames-as-batch, Wan's [B, C, T, H, W]) keyed per stream and frame count; the cache's memory in
the run record against the tensor DeepCache stores.
"""
from __future__ import annotations

import pytest
import torch

from .comfy_unet_models import FAMILIES, build

DEEPCACHE = {"cache_interval": 3, "cache_branch": 0, "schedule": "uniform", "center": 15, "power": 1.4,
             "start_percent": 0.0, "end_percent": 1.0}
STEPS = 6
FULL_STEPS = {0, 3}          # interval 3 over 6 steps
# The deepest branch each family's depth allows: (levels - 1) * layers per level + res blocks of
# the deepest level - 1, counted as the official DeepCache numbers U-Net layers.
MAX_BRANCH = {"sd15": 10, "sd15_inpaint": 10, "sd15_ip2p": 10, "sd21_v": 10, "sdxl": 7, "sdxl_refiner": 10,
              "ssd1b": 7, "koala": 4, "svd": 10}
LAYERS_PER_LEVEL = {family: 2 if family == "koala" else 3 for family in FAMILIES}
_MODELS: dict = {}


def _tiny(family):
    if family not in _MODELS:
        _MODELS[family] = build(family)
    return _MODELS[family]


def _deepcache(comfy, patcher, **settings):
    return comfy.pack("nodes.method_nodes").apply_method("deepcache", patcher, {**DEEPCACHE, **settings})


def _sample(comfy, tiny, model=None, cfg=2.0, steps=STEPS, latent=None):
    (out,) = comfy.nodes.common_ksampler(model or tiny.patcher, 7, steps, cfg, "euler", "normal",
                                         tiny.positive, tiny.negative, latent or tiny.latent)
    return out["samples"]


def _last_run(comfy):
    return comfy.pack("nodes.history").last()


def _resblock():
    from comfy.ldm.modules.diffusionmodules.openaimodel import ResBlock
    return ResBlock


def _count_resblocks(monkeypatch):
    """Real ResBlock forward calls (a VideoResBlock runs its own and its time_stack's)."""
    cls = _resblock()
    counts = {"n": 0}
    original = cls.forward

    def counted(self, *a, **k):
        counts["n"] += 1
        return original(self, *a, **k)
    monkeypatch.setattr(cls, "forward", counted)
    return counts


def _layout(comfy, tiny):
    return comfy.pack("nodes.comfy_units").unet_layout(tiny.patcher.get_model_object("diffusion_model"))


def _resblocks_per_unit(tiny, layout):
    cls = _resblock()
    return [sum(isinstance(m, cls) for m in tiny.patcher.get_model_object(slot.path).modules())
            for slot in layout.slots]


@pytest.mark.parametrize("family", FAMILIES)
def test_layout_and_branches_follow_the_familys_depth(comfy, family):
    deepcache = comfy.pack("core.methods.deepcache")
    tiny = _tiny(family)
    dm = tiny.patcher.get_model_object("diffusion_model")
    layout = _layout(comfy, tiny)
    units = layout.units
    has_middle = dm.middle_block is not None
    assert len(units) == len(dm.input_blocks) - 1 + has_middle + len(dm.output_blocks)
    assert [u.kind for u in units.units].count("mid") == has_middle
    assert units.geometry.layers_per_block == LAYERS_PER_LEVEL[family]
    # Every gate slot reaches the block it names; no ResBlock of the U-Net is outside a unit.
    assert sum(_resblocks_per_unit(tiny, layout)) == sum(isinstance(m, _resblock()) for m in dm.modules())
    top = deepcache.max_branch(units)
    assert top == MAX_BRANCH[family]
    lpb = units.geometry.layers_per_block
    reused_before = len(units) + 1
    for branch in range(top + 1):
        deep = deepcache.deep_row(units, branch)
        for unit, position, reused in zip(units.units, units.geometry.positions, deep):
            index = position[0] * lpb + position[1]
            live = {"down": index < branch, "up": index <= branch, "mid": False}[unit.kind]
            assert reused == (not live), (branch, unit.name)
        assert not deep[-1]                         # the shallowest up layer always runs
        assert sum(deep) < reused_before            # deeper branch, less reused
        reused_before = sum(deep)
    with pytest.raises(ValueError, match="deeper than this U-Net allows"):
        deepcache.check_branch(units, top + 1)


@pytest.mark.parametrize("family", FAMILIES)
def test_interval_1_equals_unpatched_exactly(comfy, family):
    tiny = _tiny(family)
    reference = _sample(comfy, tiny)
    patched = _sample(comfy, tiny, _deepcache(comfy, tiny.patcher, cache_interval=1))
    assert torch.equal(reference, patched)
    assert _last_run(comfy).hit_rate == 0.0


@pytest.mark.parametrize("family", FAMILIES)
def test_interval_3_runs_only_the_shallow_branch_on_cache_steps(comfy, family, monkeypatch):
    tiny = _tiny(family)
    reference = _sample(comfy, tiny)
    layout = _layout(comfy, tiny)
    per_unit = _resblocks_per_unit(tiny, layout)
    deep = comfy.pack("core.methods.deepcache").deep_row(layout.units, 0)
    counts = _count_resblocks(monkeypatch)
    out = _sample(comfy, tiny, _deepcache(comfy, tiny.patcher))
    run = _last_run(comfy)
    assert run.model_calls == STEPS                 # cond and uncond in one call per step
    samples = tiny.latent["samples"].shape[0] * 2
    for step in range(STEPS):
        if step in FULL_STEPS:
            assert sum(run.reused[step]) == 0 and all(c == samples for c in run.computed[step])
        else:
            assert run.reused[step] == [samples if d else 0 for d in deep]
    live = sum(n for n, d in zip(per_unit, deep) if not d)
    assert counts["n"] == len(FULL_STEPS) * sum(per_unit) + (STEPS - len(FULL_STEPS)) * live
    assert live < sum(per_unit) / 4
    assert torch.isfinite(out).all() and not torch.equal(out, reference)
    # Memory: branch 0 stores one tensor, the input of the last output block (level 0: 32
    # channels at the latent's size, float32), for the whole joint batch; nothing after the run.
    hw = tiny.latent["samples"].shape[-1]
    assert run.cache_bytes == run.cache_bytes_end == samples * 32 * hw * hw * 4
    # The deep units' placeholders hold one element each (stride-0 views), not feature maps.
    assert 0 < run.placeholder_bytes <= 8 * len(layout.units)
    as_dict = run.as_dict(resolve=False)
    assert as_dict["cache_bytes"] == run.cache_bytes and as_dict["cache_bytes_end"] == run.cache_bytes_end


@pytest.mark.parametrize("family", FAMILIES)
def test_deepest_branch_runs_and_stays_finite(comfy, family, monkeypatch):
    tiny = _tiny(family)
    counts = _count_resblocks(monkeypatch)
    out = _sample(comfy, tiny, _deepcache(comfy, tiny.patcher, cache_branch=MAX_BRANCH[family]))
    run = _last_run(comfy)
    assert torch.isfinite(out).all()
    assert 0 < run.hit_rate < 0.5
    full = len(FULL_STEPS) * sum(_resblocks_per_unit(tiny, _layout(comfy, tiny)))
    assert full < counts["n"] < STEPS / len(FULL_STEPS) * full


def _record_cache_keys(comfy, monkeypatch):
    """Record (cond streams, batch, per-stream shape) of every StreamStore.put: returns the set and a
    function that stops recording."""
    store = comfy.pack("core.streams").StreamStore
    puts = set()
    original = store.put

    def put(self, layout, signature, value):
        puts.add((tuple(sorted(c for c, _ in layout.streams)), signature[0], signature[1]))
        return original(self, layout, signature, value)
    monkeypatch.setattr(store, "put", put)
    return puts, lambda: monkeypatch.setattr(store, "put", original)


def test_svd_keys_its_cache_per_stream_and_frame_count(comfy, monkeypatch):
    puts, stop_recording = _record_cache_keys(comfy, monkeypatch)
    tiny = _tiny("svd")
    latents = {frames: {"samples": torch.zeros((frames, 4, 8, 8))} for frames in (3, 2)}
    # Two videos of different lengths on one patched model (one node output, two samplers).
    shared = _deepcache(comfy, tiny.patcher)
    outs = {frames: _sample(comfy, tiny, shared, latent=latents[frames]) for frames in (3, 2)}
    for frames, out in outs.items():
        assert out.shape[0] == frames and torch.isfinite(out).all()
    # One joint cond + uncond call per step, keyed per stream with each stream's frames (the key
    # is the sampled latent's per-stream shape, before ComfyUI concatenates the image latent).
    assert puts == {((0, 1), 3, (4, 8, 8)), ((0, 1), 2, (4, 8, 8))}
    # Each equals the same video sampled first, on its own patch: nothing of the other is reused.
    stop_recording()
    for frames in (2, 3):
        alone = _sample(comfy, tiny, _deepcache(comfy, tiny.patcher), latent=latents[frames])
        assert torch.equal(alone, outs[frames])


def test_a_5d_video_latent_is_keyed_per_stream_and_frame_count(comfy, monkeypatch):
    """Wan's [B, C, T, H, W] latent (FORA): the key is each stream's [C, T, H, W]."""
    from .comfy_graph import tiny as dit_tiny
    puts, stop_recording = _record_cache_keys(comfy, monkeypatch)
    wan = dit_tiny("wan")
    fora = comfy.pack("nodes.method_nodes").apply_method(
        "fora", wan.patcher, {"interval": 3, "start_percent": 0.0, "end_percent": 1.0})
    latents = {frames: {"samples": torch.zeros((1, 16, frames, 8, 8))} for frames in (1, 3)}
    outs = {frames: _sample(comfy, wan, fora, latent=latents[frames]) for frames in (1, 3)}
    assert puts == {((0, 1), 1, (16, 1, 8, 8)), ((0, 1), 1, (16, 3, 8, 8))}
    stop_recording()
    for frames in (3, 1):
        fresh = comfy.pack("nodes.method_nodes").apply_method(
            "fora", wan.patcher, {"interval": 3, "start_percent": 0.0, "end_percent": 1.0})
        assert torch.equal(_sample(comfy, wan, fresh, latent=latents[frames]), outs[frames])


def test_svd_joint_and_split_cond_calls_take_the_same_decisions(comfy, monkeypatch):
    tiny = _tiny("svd")
    deepcache = _deepcache(comfy, tiny.patcher)
    joint = _sample(comfy, tiny, deepcache)
    joint_run = _last_run(comfy)
    ref_joint = _sample(comfy, tiny)
    import comfy.model_management as mm
    monkeypatch.setattr(mm, "get_free_memory",   # no room for a joint batch: one call per cond
                        lambda dev=None, torch_free_too=False: (0, 0) if torch_free_too else 0)
    split = _sample(comfy, tiny, deepcache)
    split_run = _last_run(comfy)
    ref_split = _sample(comfy, tiny)
    assert split_run.model_calls == 2 * STEPS and joint_run.model_calls == STEPS
    assert split_run.computed == joint_run.computed and split_run.reused == joint_run.reused
    # Split calls store each stream's frames separately: the same bytes as the joint batch.
    assert split_run.cache_bytes == joint_run.cache_bytes
    scale = ref_joint.abs().max()
    rounding = (ref_joint - ref_split).abs().max()
    assert (joint - split).abs().max() <= 10 * rounding + 1e-5 * scale


def test_svd_with_video_linear_cfg_guidance_as_in_the_workflow(comfy):
    from comfy_extras.nodes_video_model import VideoLinearCFGGuidance
    tiny = _tiny("svd")
    (guided,) = VideoLinearCFGGuidance().patch(tiny.patcher, 1.0)
    reference = _sample(comfy, tiny, guided, cfg=2.5)
    assert torch.equal(_sample(comfy, tiny, _deepcache(comfy, guided, cache_interval=1), cfg=2.5), reference)
    cached = _sample(comfy, tiny, _deepcache(comfy, guided), cfg=2.5)
    assert torch.isfinite(cached).all() and _last_run(comfy).hit_rate > 0.5


def test_stable_cascade_is_not_a_unet_and_gets_a_clear_error(comfy):
    units = comfy.pack("nodes.comfy_units")
    from comfy.ldm.cascade.stage_b import StageB
    from comfy.ldm.cascade.stage_c import StageC
    for cls in (StageB, StageC):
        model = cls.__new__(cls)            # the class is what matters; no weights needed
        torch.nn.Module.__init__(model)
        assert not units.is_unet_model(model)
        with pytest.raises(ValueError, match="needs a U-Net model"):
            units.unet_layout(model)


# -- every UNetModel config ComfyUI detects, at full size on the meta device ------------------
def _detected_unet_configs() -> dict[str, dict]:
    """The full-size unet configs ComfyUI's model detection matches checkpoints against
    (comfy.model_detection.unet_config_from_diffusers_unet), read from its source so they
    follow the installed ComfyUI; plus SVD / SV3D (SD2.1's U-Net with temporal layers, as
    detect_unet_config sets it up for video checkpoints)."""
    import ast
    import inspect

    import comfy.model_detection
    tree = ast.parse(inspect.getsource(comfy.model_detection.unet_config_from_diffusers_unet))
    configs = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict) and isinstance(node.targets[0], ast.Name):
            config = {}
            for key, value in zip(node.value.keys, node.value.values):
                try:
                    config[ast.literal_eval(key)] = ast.literal_eval(value)
                except ValueError:      # 'dtype': dtype
                    pass
            if "num_res_blocks" in config:
                configs[node.targets[0].id] = config
    video = {"extra_ff_mix_layer": True, "use_spatial_context": True, "merge_strategy": "learned_with_images",
             "merge_factor": 0.0, "video_kernel_size": [3, 1, 1], "use_temporal_resblock": True,
             "use_temporal_attention": True, "disable_temporal_crossattention": False, "in_channels": 8,
             "num_classes": "sequential"}
    for name, adm in (("SVD_img2vid", 768), ("SV3D_u", 256), ("SV3D_p", 1280)):
        configs[name] = {**configs["SD21"], **video, "adm_in_channels": adm}
    return configs


# detected config -> (the supported_models class ComfyUI picks, deepest DeepCache branch)
FULL_SIZE = {"SD15": ("SD15", 10), "SD15_diffusers_inpaint": ("SD15", 10), "SD21": ("SD20", 10),
             "SD21_uncliph": ("SD21UnclipH", 10), "SD21_unclipl": ("SD21UnclipL", 10), "LotusD": ("LotusD", 10),
             "SDXL": ("SDXL", 7), "SDXL_diffusers_inpaint": ("SDXL", 7),
             "SDXL_diffusers_ip2p": ("SDXL_instructpix2pix", 7),
             "SDXL_refiner": ("SDXLRefiner", 10), "SSD_1B": ("SSD1B", 7), "Segmind_Vega": ("Segmind_Vega", 7),
             "KOALA_700M": ("KOALA_700M", 4), "KOALA_1B": ("KOALA_1B", 4), "SD09_XS": ("SD20", 4),
             "SD_XS": ("SD15", 4), "SVD_img2vid": ("SVD_img2vid", 10), "SV3D_u": ("SV3D_u", 10),
             "SV3D_p": ("SV3D_p", 10)}


@pytest.mark.parametrize("name", sorted(FULL_SIZE))
def test_full_size_layouts_of_every_detected_unet(comfy, name):
    from comfy import model_detection
    deepcache = comfy.pack("core.methods.deepcache")
    config = _detected_unet_configs()[name]
    model_config = model_detection.model_config_from_unet_config(dict(config))
    expected_class, top = FULL_SIZE[name]
    assert type(model_config).__name__ == expected_class
    model_config.set_inference_dtype(torch.float16, None)
    dm = model_config.get_model({}, device=torch.device("meta")).diffusion_model
    layout = comfy.pack("nodes.comfy_units").unet_layout(dm)
    units = layout.units
    assert len(units) == len(dm.input_blocks) - 1 + (dm.middle_block is not None) + len(dm.output_blocks)
    assert deepcache.max_branch(units) == top
    # Every slot names one of the U-Net's blocks.
    for slot in layout.slots:
        module = dm
        for part in slot.path.split(".")[1:]:
            module = module[int(part)] if part.isdigit() else getattr(module, part)
        assert type(module).__name__ == "TimestepEmbedSequential"
