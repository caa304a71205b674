"""DeepCache and FORA in real ComfyUI on tiny models built from ComfyUI's own classes."""
from __future__ import annotations

import pytest
import torch

from .comfy_graph import RESULTS, Graph, tiny

DEEPCACHE = {"cache_interval": 3, "cache_branch": 0, "schedule": "uniform", "center": 15, "power": 1.4,
             "start_percent": 0.0, "end_percent": 1.0}
FORA = {"interval": 3, "start_percent": 0.0, "end_percent": 1.0}
METHODS = {
    "sd15": ("CacheKitDeepCache", DEEPCACHE, "cache_interval"),
    "sdxl": ("CacheKitDeepCache", DEEPCACHE, "cache_interval"),
    "mmdit": ("CacheKitFORA", FORA, "interval"),
    "flux": ("CacheKitFORA", FORA, "interval"),
    "pixart": ("CacheKitFORA", FORA, "interval"),
    "wan": ("CacheKitFORA", FORA, "interval"),
}
STEPS = 6
# Reference decisions at interval 3 over 6 steps.
FULL_STEPS = {"CacheKitDeepCache": {0, 3}, "CacheKitFORA": {0, 2, 5}}


def _sample(comfy, family, key, patch=None, steps=STEPS, **kw):
    """Run loader -> [patch] -> KSampler on a fresh executor (no node outputs cached)."""
    g = Graph(family)
    if patch is not None:
        g.patch(patch[0], **patch[1])
    g.sample(key, steps=steps, **kw)
    comfy.run(g.prompt, comfy.fresh_executor())
    return RESULTS[key]


def _last_run(comfy):
    return comfy.pack("nodes.history").last()


def _unit_classes(comfy, family):
    """The original classes of the modules that carry the units, to count their real calls."""
    units_mod = comfy.pack("nodes.comfy_units")
    proxy = comfy.pack("core.proxy")
    patcher = tiny(family).patcher
    dm = patcher.get_model_object("diffusion_model")
    layout = units_mod.unet_layout(dm) if family in ("sd15", "sdxl") else units_mod.dit_layout(dm)
    classes, instances = {}, []
    for unit, slot in zip(layout.units.units, layout.slots):
        if slot.how == "dit":
            list_attr = unit.name.rsplit(".", 1)[0]
            module = getattr(dm, list_attr)[int(unit.name.rsplit(".", 1)[1])]
        else:
            module = patcher.get_model_object(slot.path)
        classes.setdefault(proxy.original_class(module), 0)
        classes[proxy.original_class(module)] += 1
        instances.append(module)
    return layout, classes, instances


def _count(monkeypatch, classes, instances=None):
    """Count real forward calls per class; with `instances`, only of those modules (a proxy
    shares its original's _modules dict, so both are recognised)."""
    counts = {cls: 0 for cls in classes}
    wanted = None if instances is None else {id(m.__dict__["_modules"]) for m in instances}
    for cls in classes:
        original = cls.forward

        def counted(self, *a, __orig=original, __cls=cls, **k):
            if wanted is None or id(self.__dict__["_modules"]) in wanted:
                counts[__cls] += 1
            return __orig(self, *a, **k)
        monkeypatch.setattr(cls, "forward", counted)
    return counts


@pytest.mark.parametrize("family", list(METHODS))
@pytest.mark.parametrize("cfg", [1.0, 2.5])
def test_interval_1_equals_unpatched_exactly(comfy, family, cfg):
    node, params, interval_key = METHODS[family]
    reference = _sample(comfy, family, f"{family}-ref-{cfg}", cfg=cfg)
    patched = _sample(comfy, family, f"{family}-i1-{cfg}", (node, {**params, interval_key: 1}), cfg=cfg)
    assert torch.equal(reference, patched)
    assert _last_run(comfy).hit_rate == 0.0


@pytest.mark.parametrize("family", list(METHODS))
@pytest.mark.parametrize("cfg", [1.0, 2.5])
def test_interval_3_executes_the_scheduled_units(comfy, family, cfg, monkeypatch):
    node, params, _ = METHODS[family]
    reference = _sample(comfy, family, f"{family}-ref3-{cfg}", cfg=cfg)
    if family in ("sd15", "sdxl"):
        counted_class = __import__("comfy.ldm.modules.diffusionmodules.openaimodel", fromlist=["ResBlock"]).ResBlock
        counts = _count(monkeypatch, [counted_class])
    else:
        layout, classes, instances = _unit_classes(comfy, family)
        counts = _count(monkeypatch, classes, instances)
    out = _sample(comfy, family, f"{family}-i3-{cfg}", (node, params), cfg=cfg)
    run = _last_run(comfy)
    full = FULL_STEPS[node]
    samples_per_step = 1 if cfg == 1.0 else 2
    for step in range(STEPS):
        computed, reused = run.computed[step], run.reused[step]
        if step in full:
            assert sum(reused) == 0 and all(c == samples_per_step for c in computed), (step, run.computed, run.reused)
        else:
            assert sum(reused) > 0, step
    assert run.model_calls == STEPS
    if family in ("sd15", "sdxl"):
        # Every ResBlock runs on full steps; branch 0 keeps exactly one (the last output block's) live.
        per_full = sum(isinstance(m, counted_class) for m in tiny(family).patcher.model.modules())
        assert per_full == 12
        assert counts[counted_class] == len(full) * per_full + (STEPS - len(full)) * 1
        assert all(r == 0 for step in full for r in run.reused[step])
    else:
        # FORA: all units on refresh steps, none in between.
        for cls, n in classes.items():
            assert counts[cls] == n * len(full), cls.__name__
        for step in set(range(STEPS)) - full:
            assert all(c == 0 for c in run.computed[step]), step
    assert not torch.equal(out, reference)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("family", list(METHODS))
def test_joint_and_split_cond_batches_take_the_same_decisions(comfy, family, monkeypatch):
    node, params, _ = METHODS[family]
    joint = _sample(comfy, family, f"{family}-joint", (node, params), cfg=2.5)
    joint_run = _last_run(comfy)
    ref_joint = _sample(comfy, family, f"{family}-joint-ref", cfg=2.5)
    import comfy.model_management as mm
    monkeypatch.setattr(mm, "get_free_memory",   # no room for a joint batch: one call per cond
                        lambda dev=None, torch_free_too=False: (0, 0) if torch_free_too else 0)
    split = _sample(comfy, family, f"{family}-split", (node, params), cfg=2.5)
    split_run = _last_run(comfy)
    ref_split = _sample(comfy, family, f"{family}-split-ref", cfg=2.5)
    assert split_run.model_calls == 2 * STEPS and joint_run.model_calls == STEPS
    assert split_run.computed == joint_run.computed and split_run.reused == joint_run.reused
    # Batching changes float rounding, uncached too: the cached runs may differ by no more than
    # the uncached joint and split runs do (with margin), relative to the output's scale.
    scale = ref_joint.abs().max()
    rounding = (ref_joint - ref_split).abs().max()
    assert (joint - split).abs().max() <= 10 * rounding + 1e-5 * scale, ((joint - split).abs().max(), rounding, scale)


@pytest.mark.parametrize("family", list(METHODS))
def test_heun_counts_one_step_per_sampler_step(comfy, family):
    node, params, _ = METHODS[family]
    _sample(comfy, family, f"{family}-heun", (node, params), cfg=2.5, sampler="heun")
    run = _last_run(comfy)
    # heun: two model calls per step except the last (euler) step.
    assert run.model_calls == 2 * STEPS - 1
    full = FULL_STEPS[node]
    for step in range(STEPS):
        # Step 0 has one call; every later step has heun's corrector from the step before
        # (evaluated at this step's sigma) plus its own call.
        calls = 1 if step == 0 else 2
        if step in full:
            assert sum(run.reused[step]) == 0 and max(run.computed[step]) == 2 * calls, (step, run.computed)
        else:
            assert sum(run.reused[step]) > 0


@pytest.mark.parametrize("family", list(METHODS))
def test_two_samplers_of_different_sizes_on_one_patched_model(comfy, family):
    node, params, _ = METHODS[family]
    small, large = (40, 48) if family == "pixart" else (8, 12)   # ComfyUI's PixArt needs >= 33 px
    # Each alone first.
    g = Graph(family).patch(node, **params)
    g.sample(f"{family}-a-alone", steps=STEPS, size=small)
    comfy.run(g.prompt, comfy.fresh_executor())
    g = Graph(family).patch(node, **params)
    g.sample(f"{family}-b-alone", steps=STEPS, size=large)
    comfy.run(g.prompt, comfy.fresh_executor())
    # Then both in one prompt, on the same patched model.
    g = Graph(family).patch(node, **params)
    g.sample(f"{family}-a", steps=STEPS, size=small)
    g.sample(f"{family}-b", steps=STEPS, size=large)
    comfy.run(g.prompt, comfy.fresh_executor())
    assert torch.equal(RESULTS[f"{family}-a"], RESULTS[f"{family}-a-alone"])
    assert torch.equal(RESULTS[f"{family}-b"], RESULTS[f"{family}-b-alone"])
    assert RESULTS[f"{family}-b"].shape[-1] == large


@pytest.mark.parametrize("family", list(METHODS))
def test_second_prompt_reuses_the_node_output_and_still_caches_correctly(comfy, family):
    node, params, _ = METHODS[family]
    # Reference: the second prompt's sampling on a freshly executed CacheKit node.
    g = Graph(family).patch(node, **params)
    ks = g.sample(f"{family}-p2-fresh", steps=STEPS, seed=8)
    comfy.run(g.prompt, comfy.fresh_executor())
    fresh_run = _last_run(comfy)
    # Two prompts on one executor: the second only changes the KSampler seed, so ComfyUI
    # reuses the CacheKit node's cached output (the patched model) from the first prompt.
    executor = comfy.fresh_executor()
    g.prompt[ks]["inputs"]["seed"] = 7
    g.prompt[str(int(ks) + 1)]["inputs"]["key"] = f"{family}-p1"
    comfy.run(g.prompt, executor)
    first_run, first_owner = _last_run(comfy), comfy.pack("nodes.history").recent()[-1]["owner"]
    g.prompt[ks]["inputs"]["seed"] = 8
    g.prompt[str(int(ks) + 1)]["inputs"]["key"] = f"{family}-p2"
    comfy.run(g.prompt, executor)
    second_run, second_owner = _last_run(comfy), comfy.pack("nodes.history").recent()[-1]["owner"]
    assert second_run is not first_run and first_owner == second_owner   # same cached patched model
    assert torch.equal(RESULTS[f"{family}-p2"], RESULTS[f"{family}-p2-fresh"])
    assert second_run.reused == fresh_run.reused and second_run.hit_rate > 0


@pytest.mark.parametrize("family", list(METHODS))
def test_bypassing_the_node_gives_the_uncached_result(comfy, family):
    node, params, _ = METHODS[family]
    reference = _sample(comfy, family, f"{family}-byp-ref")
    executor = comfy.fresh_executor()
    g = Graph(family).patch(node, **params)
    g.sample(f"{family}-byp-cached", steps=STEPS)
    comfy.run(g.prompt, executor)
    # Bypass as the frontend does it: the node is dropped and its input wired through.
    bypassed = Graph(family)
    bypassed.sample(f"{family}-byp-off", steps=STEPS)
    comfy.run(bypassed.prompt, executor)
    assert not torch.equal(RESULTS[f"{family}-byp-cached"], reference)
    assert torch.equal(RESULTS[f"{family}-byp-off"], reference)


def test_unsupported_model_gets_a_clear_error_when_the_node_runs(comfy):
    g = Graph("pixart").patch("CacheKitDeepCache", **DEEPCACHE)
    g.sample("bad", steps=STEPS)
    with pytest.raises(AssertionError, match="DeepCache needs a U-Net model"):
        comfy.run(g.prompt)
    g = Graph("sd15").patch("CacheKitFORA", **FORA)
    g.sample("bad2", steps=STEPS)
    with pytest.raises(AssertionError, match="FORA does not support UNetModel"):
        comfy.run(g.prompt)
    g = Graph("sd15").patch("CacheKitDeepCache", **{**DEEPCACHE, "cache_branch": 50})
    g.sample("bad3", steps=STEPS)
    with pytest.raises(AssertionError, match="cache_branch 50 is deeper than this U-Net allows"):
        comfy.run(g.prompt)


def test_stacks_with_comfyui_easycache(comfy):
    """CacheKit on top of ComfyUI's own EasyCache: both run, and interval 1 leaves EasyCache's result."""
    easy = {"reuse_threshold": 0.2, "start_percent": 0.15, "end_percent": 0.95, "verbose": False}
    g = Graph("flux").patch("EasyCache", **easy)
    g.sample("easy-only", steps=STEPS)
    comfy.run(g.prompt)
    g = Graph("flux").patch("EasyCache", **easy).patch("CacheKitFORA", **{**FORA, "interval": 1})
    g.sample("easy-ck1", steps=STEPS)
    comfy.run(g.prompt)
    assert torch.equal(RESULTS["easy-only"], RESULTS["easy-ck1"])
    g = Graph("flux").patch("EasyCache", **easy).patch("CacheKitFORA", **FORA)
    g.sample("easy-ck3", steps=STEPS)
    comfy.run(g.prompt)
    run = _last_run(comfy)
    assert run.hit_rate > 0 and torch.isfinite(RESULTS["easy-ck3"]).all()


def test_weight_patches_like_lora_still_apply_through_unit_proxies(comfy):
    """Proxies keep parameter names: a weight patch on a patched clone changes the output
    exactly as it does on the plain model."""
    t = tiny("sd15")
    key = "diffusion_model.input_blocks.1.0.in_layers.2.weight"
    weight = t.patcher.get_model_object(key)
    delta = torch.full_like(weight, 0.05)

    def sample_with(patcher, tag):
        patcher = patcher.clone()
        patcher.add_patches({key: (delta,)}, strength_patch=1.0)
        nodes = comfy.nodes
        return nodes.common_ksampler(patcher, 7, STEPS, 2.0, "euler", "normal", t.positive, t.negative,
                                     t.latent)[0]["samples"]

    plain = sample_with(t.patcher, "plain")
    node = comfy.nodes.NODE_CLASS_MAPPINGS["CacheKitDeepCache"]
    patched_model = node.execute(t.patcher, **{**DEEPCACHE, "cache_interval": 1}).result[0]
    through_proxy = sample_with(patched_model, "proxy")
    assert torch.equal(plain, through_proxy)
    unpatched = comfy.nodes.common_ksampler(t.patcher, 7, STEPS, 2.0, "euler", "normal", t.positive, t.negative,
                                            t.latent)[0]["samples"]
    assert not torch.equal(plain, unpatched)    # the weight patch did something


def test_an_error_during_sampling_closes_the_run_and_leaves_no_state(comfy, monkeypatch):
    from comfy.ldm.modules.diffusionmodules import openaimodel
    reference = _sample(comfy, "sd15", "err-ref", ("CacheKitDeepCache", DEEPCACHE))
    calls = {"n": 0}
    original = openaimodel.ResBlock.forward

    def failing(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 20:      # a full run makes 28 ResBlock calls
            raise RuntimeError("boom in the middle of sampling")
        return original(self, *a, **k)

    monkeypatch.setattr(openaimodel.ResBlock, "forward", failing)
    runs_before = len(comfy.pack("nodes.history").recent())
    with pytest.raises(AssertionError, match="boom in the middle of sampling"):
        _sample(comfy, "sd15", "err", ("CacheKitDeepCache", DEEPCACHE))
    monkeypatch.setattr(openaimodel.ResBlock, "forward", original)
    recent = comfy.pack("nodes.history").recent()
    assert len(recent) == runs_before + 1 or len(recent) == 32     # the failed run was closed
    assert comfy.pack("core.session")._ACTIVE.get() == {}
    assert torch.equal(_sample(comfy, "sd15", "err-after", ("CacheKitDeepCache", DEEPCACHE)), reference)


def test_non_uniform_deepcache_schedule_in_comfyui(comfy):
    params = {**DEEPCACHE, "schedule": "non-uniform", "center": 5, "power": 1.4}
    _sample(comfy, "sd15", "nonuni", ("CacheKitDeepCache", params), steps=20)
    run = _last_run(comfy)
    full = [s for s in range(20) if sum(run.reused[s]) == 0]
    assert full == [0, 3, 5, 6, 9, 12, 16]     # official sample_from_quad_center(20, 7, 5, 1.4)


def test_impossible_non_uniform_schedule_is_refused_before_the_first_step(comfy):
    # The official sample_from_quad_center raises for (10 steps, 5 full steps, center 5).
    params = {**DEEPCACHE, "schedule": "non-uniform", "cache_interval": 2, "center": 5, "power": 1.4}
    calls = []
    from comfy.ldm.modules.diffusionmodules import openaimodel
    original = openaimodel.ResBlock.forward
    openaimodel.ResBlock.forward = lambda self, *a, **k: calls.append(1) or original(self, *a, **k)
    try:
        with pytest.raises(AssertionError, match="non-uniform DeepCache schedule cannot place 5 full steps in 10 steps"):
            _sample(comfy, "sd15", "nonuni-bad", ("CacheKitDeepCache", params), steps=10)
    finally:
        openaimodel.ResBlock.forward = original
    assert calls == []      # refused before any model call


@pytest.mark.parametrize("family", ["sd15", "flux"])
def test_start_and_end_percent_limit_caching_to_a_sigma_window(comfy, family):
    node, params, _ = METHODS[family]
    _sample(comfy, family, f"{family}-window", (node, {**params, "start_percent": 0.2, "end_percent": 0.7}), steps=12)
    run = _last_run(comfy)
    ms = tiny(family).patcher.get_model_object("model_sampling")
    import comfy.samplers
    sigmas = comfy.samplers.calculate_sigmas(ms, "normal", 12).tolist()
    hi, lo = ms.percent_to_sigma(0.2), ms.percent_to_sigma(0.7)
    window = [i for i in range(12) if lo < sigmas[i] <= hi]
    assert window and window[0] > 0 and window[-1] < 11
    reused_steps = [s for s in range(12) if sum(run.reused[s]) > 0]
    assert reused_steps and set(reused_steps) <= set(window)
    assert reused_steps[0] == window[1] if node == "CacheKitDeepCache" else True   # window step 0 is full
