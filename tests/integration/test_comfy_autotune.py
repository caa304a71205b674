"""Autotune (CacheKit) in real ComfyUI: calibration runs, settings that method nodes apply."""
from __future__ import annotations

import pytest
import torch

from .comfy_graph import RESULTS, Graph
from .test_comfy_methods import DEEPCACHE, FORA

STEPS = 8


def _autotune_graph(family, method, target="psnr", value=20.0, max_trials=3):
    g = Graph(family)
    node = g.add("CacheKitAutotune", model=g.model, positive=[g.loader, 1], negative=[g.loader, 2],
                 latent_image=[g.loader, 3], seed=7, steps=STEPS, cfg=2.0, sampler_name="euler", scheduler="normal",
                 method=method, target=target, target_value=value, max_trials=max_trials)
    return g, node


@pytest.mark.parametrize("family, method, node_type, widgets",
                         [("sd15", "deepcache", "CacheKitDeepCache", DEEPCACHE),
                          ("pixart", "fora", "CacheKitFORA", FORA),
                          ("sd15", "adaptive", "CacheKitAdaptiveSkip", {"delta": 0.01, "max_skip_steps": 4})])
def test_autotune_settings_drive_the_method_node_like_its_own_model_output(comfy, family, method, node_type, widgets):
    g, tune = _autotune_graph(family, method)
    g.add("CKTestCaptureSettings", value=[tune, 1], key=f"tune-{method}-settings")
    g.add("CKTestCaptureString", value=[tune, 2], key=f"tune-{method}-report")
    g.model = [tune, 0]
    g.sample(f"tune-{method}-model", steps=STEPS, cfg=2.0)
    # The same settings through the method node's `settings` input.
    g.model = [g.loader, 0]
    method_node = g.add(node_type, model=g.model, settings=[tune, 1], **widgets)
    g.model = [method_node, 0]
    g.sample(f"tune-{method}-node", steps=STEPS, cfg=2.0)
    comfy.run(g.prompt, comfy.fresh_executor())
    settings, report = RESULTS[f"tune-{method}-settings"], RESULTS[f"tune-{method}-report"]
    tune_result = settings["tune"]
    assert settings["method"] == method
    assert 1 <= len(tune_result["trials"]) <= 3
    assert report.startswith(f"Autotune {method} for PSNR >= 20 dB")
    for trial in tune_result["trials"]:
        assert trial["ideal_speedup"] is not None and trial["ideal_speedup"] >= 1.0
    assert torch.equal(RESULTS[f"tune-{method}-model"], RESULTS[f"tune-{method}-node"])
    if tune_result["chosen"] is not None:
        assert settings["settings"] == tune_result["chosen"]["settings"] and tune_result["chosen"]["psnr"] >= 20


def test_settings_for_another_method_are_refused_with_a_clear_error(comfy):
    g, tune = _autotune_graph("sd15", "adaptive", max_trials=1)
    fora = g.add("CacheKitFORA", model=g.model, settings=[tune, 1], **FORA)
    g.model = [fora, 0]
    g.sample("tune-mismatch", steps=STEPS)
    with pytest.raises(Exception, match="tuned for 'adaptive', not 'fora'"):
        comfy.run(g.prompt, comfy.fresh_executor())


def test_autotune_refuses_an_unsupported_model_before_sampling(comfy, monkeypatch):
    import importlib
    calls = []
    monkeypatch.setattr(importlib.import_module("comfy.sample"), "sample", lambda *a, **k: calls.append(1))
    g, tune = _autotune_graph("flux", "deepcache", max_trials=1)
    g.add("CKTestCaptureString", value=[tune, 2], key="tune-flux-report")
    with pytest.raises(Exception, match="DeepCache"):
        comfy.run(g.prompt, comfy.fresh_executor())
    assert calls == []
