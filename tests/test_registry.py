"""The method registry (core/methods/registry.py): every method's "off" setting is exact, every
consumer lists exactly the registered methods, configs validate, and a method registered from
outside (here, in a test) reaches autotune, the panel, the bench and the diffusers host without
a change to any of them."""
from __future__ import annotations

import dataclasses
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import tiny_diffusers as td
from cachekit.core import autotune as core_autotune
from cachekit.core.methods import registry
from cachekit.core.methods.base import check_int, check_percent_range, full_plan
from cachekit.core.methods.registry import MethodSpec, NodeSpec, Setting
from cachekit.core.routers import Router
from cachekit.diffusers_host import autotune as diffusers_autotune
from cachekit.diffusers_host import registry as host
from cachekit.diffusers_host.units import dit_units
from integration.conftest import comfy  # noqa: F401  (the real-ComfyUI fixture; skips without COMFYUI_DIR)

ROOT = Path(__file__).resolve().parents[1]
STEPS = 8
MODELS = {"unet": td.unet, "dit": td.dit}


def _random_router(model, steps: int) -> Router:
    """A HarmoniCa router that fits the model's DiT sub-layers and the step count."""
    kinds = [u.kind for u in dit_units(model)[0].units]
    layout = tuple(dict.fromkeys(kinds))
    g = torch.Generator().manual_seed(3)
    return Router(torch.randn(steps, len(kinds), generator=g) * 3, "harmonica", "dit", len(kinds) // len(layout),
                  layout)


# What a method needs besides its settings (config fields without a default), per model.
REQUIRED = {"router": lambda model, steps: {"router": _random_router(model, steps)}}


def _required(spec: MethodSpec, model, steps: int = STEPS) -> dict:
    if not spec.required():
        return {}
    assert spec.key in REQUIRED, f"add an example of {spec.required()} for {spec.key!r} to REQUIRED"
    return REQUIRED[spec.key](model, steps)


def _cases():
    return [pytest.param(spec.key, kind, id=f"{spec.key}-{kind}")
            for spec in registry.methods() for kind in MODELS if spec.fits_model(kind)]


def _run(kind, model, steps=STEPS):
    return torch.stack(td.sample(kind, model, td.scheduler(steps)))


# -- off is exact --------------------------------------------------------------------------------
@pytest.mark.parametrize("key, kind", _cases())
def test_every_methods_off_setting_equals_the_unpatched_model_exactly(key, kind):
    spec = registry.get(key)
    model = MODELS[kind]()
    reference = _run(kind, model)
    sched = td.scheduler(STEPS)
    handle = host.apply_off(model, key, scheduler=sched, **_required(spec, model))
    try:
        out = torch.stack(td.sample(kind, model, sched))
        telemetry = handle.finish_run()
    finally:
        handle.remove()
    assert torch.equal(out, reference)
    assert telemetry.hit_rate == 0 and telemetry.method
    assert torch.equal(_run(kind, model), reference)           # removed: the model is as before


@pytest.mark.parametrize("key", [s.key for s in registry.methods() if s.level == "unit"])
def test_unit_methods_at_their_defaults_do_reuse(key):
    """So that the off test above is not vacuous: the same path with the defaults caches."""
    spec = registry.get(key)
    kind = "unet" if spec.fits == "unet" else "dit"
    model = MODELS[kind]()
    sched = td.scheduler(STEPS)
    handle = host.apply(model, key, scheduler=sched, **_required(spec, model))
    try:
        td.sample(kind, model, sched)
        assert handle.finish_run().hit_rate > 0
    finally:
        handle.remove()


# -- every consumer reads the registry ------------------------------------------------------------
def test_autotune_and_the_diffusers_host_list_exactly_the_tunable_methods():
    tunable = [s.key for s in registry.methods() if s.ladder is not None]
    assert list(core_autotune.METHODS) == tunable == registry.tunable_keys()
    assert dict(core_autotune.NO_CACHING) == {k: dict(registry.get(k).off) for k in tunable}
    assert list(diffusers_autotune.APPLY) == tunable
    for key in tunable:
        assert all(ladder for ladder in core_autotune.ladders(key))
    with pytest.raises(ValueError, match="unknown method"):
        core_autotune.ladders("tomesd")
    with pytest.raises(ValueError, match="cannot be tuned"):
        core_autotune.check_method("router")


def test_the_panel_lists_exactly_the_registered_methods_with_their_words():
    from cachekit.panel import engine
    names = {s.name for s in registry.methods()}
    assert {m for ms in engine.METHODS.values() for m in ms} == names
    assert set(engine.SETTINGS) == set(engine.DESCRIPTIONS) == names
    for spec in registry.methods():
        assert engine.DESCRIPTIONS[spec.name] == spec.summary
        for kind in engine.MODELS:
            assert (spec.name in engine.METHODS[kind]) == spec.fits_model(kind)
    # The panel keeps the controls it always had (AdaptiveDiffusion gained max_skip_steps).
    assert dict(engine.SETTINGS) == {"DeepCache": ("interval", "branch", "reuse"),
                                     "FORA": ("interval", "start_percent", "reuse"),
                                     "AdaptiveDiffusion": ("delta", "max_skip_steps", "reuse"),
                                     "ChangeCache": ("threshold", "reuse"),
                                     "Router": ()}
    assert engine.method_settings(engine.Request("unet", "DeepCache", interval=4, branch=1)) == \
        {"cache_interval": 4, "cache_branch": 1, "reuse": "hold"}


def test_the_bench_runs_every_registered_method():
    from cachekit.bench.methods import all_methods, cachekit_router
    rows = [m for m in all_methods() if m.origin == "CacheKit"]
    assert {m.key for m in rows} == {s.key for s in registry.methods() if s.bench}
    for spec in registry.methods():
        # Without rows of its own a method needs a file the harness gets from the command line.
        assert spec.bench or spec.required(), spec.key
        assert [m.setting for m in rows if m.key == spec.key] == [spec.label(b) for b in spec.bench]
    assert [m.setting for m in rows if m.key == "deepcache"][:2] == ["N=2 branch=0", "N=2 branch=1"]
    assert cachekit_router(_random_router(td.dit(), 4)).key == "router"


def test_the_benchmark_script_measures_every_unit_method_with_an_interval():
    spec = importlib.util.spec_from_file_location("cachekit_benchmark_script", ROOT / "scripts" / "benchmark.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    expected = {s.name for s in registry.methods()
                if s.level == "unit" and s.fits in ("unet", "dit") and s.with_role("interval")}
    assert set(script.METHODS) == expected == {"DeepCache", "FORA"}


def test_the_comfyui_nodes_are_generated_from_the_registry(comfy):  # noqa: F811
    import nodes
    reg = comfy.pack("core.methods.registry")        # the pack ComfyUI loaded (its own module copy)
    method_nodes = comfy.pack("nodes.method_nodes")
    generated = {s.key for s in reg.methods() if s.node and s.node.generated}
    assert set(method_nodes.METHOD_NODES) == generated
    for spec in reg.methods():
        assert spec.node is not None and spec.node.node_id in nodes.NODE_CLASS_MAPPINGS, spec.key
        if spec.key not in generated:
            continue
        schema = nodes.NODE_CLASS_MAPPINGS[spec.node.node_id].INPUT_TYPES()
        required, optional = schema["required"], schema.get("optional", {})
        assert list(required) == ["model", *(s.name for s in spec.settings if not s.optional)]
        # settings added after release are optional widgets, after the others (saved widget values line up)
        assert [n for n in optional if n != "settings"] == [s.name for s in spec.settings if s.optional]
        for setting in spec.settings:
            type_, options = (optional if setting.optional else required)[setting.name]
            assert options["default"] == setting.default and options.get("tooltip") == setting.tooltip
    autotune_inputs = nodes.NODE_CLASS_MAPPINGS["CacheKitAutotune"].INPUT_TYPES()["required"]
    assert autotune_inputs["method"][1]["options"] == reg.tunable_keys()


# -- configs validate -----------------------------------------------------------------------------
@pytest.mark.parametrize("key", registry.keys())
def test_configs_validate_their_settings(key):
    spec = registry.get(key)
    model = td.dit()
    extra = _required(spec, model)
    config = spec.make_config({**spec.defaults(), **extra})
    assert all(getattr(config, s.name) == s.default for s in spec.settings)
    spec.make_config({**spec.off, **extra})
    for setting in spec.settings:
        if setting.type in ("int", "float") and setting.min is not None:
            with pytest.raises(ValueError, match=setting.name):
                spec.make_config({setting.name: setting.min - 1, **extra})
        if setting.type == "combo":
            with pytest.raises(ValueError, match=setting.name):
                spec.make_config({setting.name: "no such option", **extra})
    with pytest.raises(ValueError, match="has no setting 'bogus'"):
        spec.make_config({"bogus": 1, **extra})
    if spec.required():
        with pytest.raises(ValueError, match="needs"):
            spec.make_config({})


def test_a_declaration_that_contradicts_its_config_is_refused():
    base = registry.get("fora")
    with pytest.raises(ValueError, match="defaults to 4"):
        dataclasses.replace(base, key="fora2", settings=(Setting("interval", "int", 4, 1, 100),))
    with pytest.raises(ValueError, match="not a field"):
        dataclasses.replace(base, key="fora2", off={"cache_interval": 1})
    with pytest.raises(ValueError, match="level"):
        dataclasses.replace(base, key="fora2", level="block")
    with pytest.raises(ValueError, match="already registered"):
        registry.register(dataclasses.replace(base, key="fora2"))          # same name and node id as fora
    with pytest.raises(ValueError, match="outside"):
        Setting("interval", "int", 0, 1, 100)


# -- a method registered from outside -------------------------------------------------------------
@dataclass(frozen=True)
class EveryOtherConfig:
    interval: int = 2
    start_percent: float = 0.0
    end_percent: float = 1.0

    def __post_init__(self):
        check_int("interval", self.interval, 1, "1 disables caching.")
        check_percent_range(self.start_percent, self.end_percent)


@dataclass(frozen=True)
class EveryOtherPolicy:
    """Reuse every unit on the window's steps that are not a multiple of `interval`."""
    config: EveryOtherConfig
    name: str = "EveryOther"

    def plan(self, units, num_steps, window):
        plan = full_plan(units, num_steps)
        for rel, step in enumerate(window):
            if rel % self.config.interval:
                plan[step] = [True] * len(units)
        return plan


@dataclass(frozen=True)
class SkipOtherPolicy(EveryOtherPolicy):
    """The same rule for the whole model call (a static call-level policy)."""
    name: str = "SkipOther"
    level: str = "call"


def _toy(key, name, policy, level):
    return MethodSpec(
        key=key, name=name, config=EveryOtherConfig, level=level, fits="dit" if level == "unit" else "any",
        policy=policy, summary=f"{name}: a toy method registered by a test.",
        settings=(Setting("interval", "int", 2, 1, 10, role="interval", label="N", tooltip="Compute every N steps."),
                  *registry.percent_settings()),
        main_settings=("interval",), off={"interval": 1},
        ladder=lambda units: [[{"interval": n} for n in (2, 3)]],
        bench=({"interval": 2},),
        node=NodeSpec(f"CKToy{name}", f"{name} (test)", "A toy.", "The model."))


@pytest.fixture
def toys():
    specs = [_toy("every_other", "EveryOther", EveryOtherPolicy, "unit"),
             _toy("skip_other", "SkipOther", SkipOtherPolicy, "call")]
    for spec in specs:
        registry.register(spec)
    try:
        yield specs
    finally:
        for spec in specs:
            registry.unregister(spec.key)
    assert "every_other" not in core_autotune.METHODS


def test_a_registered_method_reaches_autotune_panel_and_bench_without_changes_there(toys):
    from cachekit.bench.methods import all_methods
    from cachekit.panel import engine
    for spec in toys:
        assert spec.key in core_autotune.METHODS and spec.key in diffusers_autotune.APPLY
        assert core_autotune.NO_CACHING[spec.key] == {"interval": 1}
        assert core_autotune.ladders(spec.key) == [[{"interval": 2}, {"interval": 3}]]
        assert engine.SETTINGS[spec.name] == ("interval",) and engine.DESCRIPTIONS[spec.name] == spec.summary
        assert spec.name in engine.METHODS["dit"]
        assert [m.setting for m in all_methods() if m.key == spec.key] == ["N=2"]
    assert "EveryOther" not in engine.METHODS["unet"] and "SkipOther" in engine.METHODS["unet"]
    gr = pytest.importorskip("gradio", reason="gradio is not installed")
    assert gr
    from cachekit.panel import app as panel_app
    info, *updates = panel_app._controls_for("EveryOther")
    assert info == f"**EveryOther**: {toys[0].summary}"
    assert {n for n, u in zip(panel_app.CONTROLS, updates) if u["visible"]} == {"interval"}


@pytest.mark.parametrize("key", ["every_other", "skip_other"])
def test_a_registered_method_runs_on_diffusers_through_the_generic_host(toys, key):
    model = td.dit()
    reference = _run("dit", model)
    outputs, hit_rates = {}, {}
    for settings in ({"interval": 1}, {"interval": 2}):
        sched = td.scheduler(STEPS)
        handle = host.apply(model, key, scheduler=sched, **settings)
        try:
            outputs[settings["interval"]] = torch.stack(td.sample("dit", model, sched))
            hit_rates[settings["interval"]] = handle.finish_run().hit_rate
        finally:
            handle.remove()
    assert torch.equal(outputs[1], reference) and hit_rates[1] == 0
    assert hit_rates[2] == pytest.approx(0.5) and not torch.equal(outputs[2], reference)
    assert "forward" not in model.__dict__ and not hasattr(model, "_cachekit_handle")


def test_a_registered_method_is_tuned_on_diffusers(toys):
    model = td.dit()
    sched = td.scheduler(6)
    result = diffusers_autotune.autotune_diffusers(model, lambda: torch.stack(td.sample("dit", model, sched)),
                                                   method="every_other", target_kind="psnr", value=1.0,
                                                   scheduler=sched, max_trials=2)
    assert [t.settings for t in result.trials] == [{"interval": 2}, {"interval": 3}]
    assert all(t.ideal_speedup > 1 for t in result.trials)
    with pytest.raises(ValueError, match="works on DiT transformers.*U-Net.*Tune"):
        diffusers_autotune.check_fits(td.unet(), "every_other", td.scheduler(4), None)


def test_a_registered_method_runs_in_the_panel_engine(toys):
    from cachekit.panel import engine
    result = engine.run(engine.Request("dit", "EveryOther", interval=2, steps=6, images=1), progress=False)
    assert result.telemetry["method"] == "EveryOther" and result.telemetry["hit_rate"] == pytest.approx(0.5)
