"""FORA's forecast reuse (TaylorSeer) in real ComfyUI, on the tiny PixArt built from ComfyUI's classes."""
from __future__ import annotations

import torch

from .comfy_graph import RESULTS, Graph

FORA = {"interval": 3, "start_percent": 0.0, "end_percent": 1.0}


def _sample(comfy, key, patch=None, **kw):
    g = Graph("pixart")
    if patch is not None:
        g.patch("CacheKitFORA", **patch)
    g.sample(key, steps=6, **kw)
    comfy.run(g.prompt, comfy.fresh_executor())
    return RESULTS[key]


def test_fora_forecast1_on_pixart_runs_finite_and_equals_hold_at_interval_1(comfy):
    hold = _sample(comfy, "fc-hold", {**FORA, "reuse": "hold"})
    forecast = _sample(comfy, "fc-f1", {**FORA, "reuse": "forecast1"})
    run = comfy.pack("nodes.history").last()
    assert run.hit_rate > 0
    assert torch.isfinite(forecast).all() and not torch.equal(forecast, hold)
    off_hold = _sample(comfy, "fc-hold-i1", {**FORA, "interval": 1, "reuse": "hold"})
    off_forecast = _sample(comfy, "fc-f1-i1", {**FORA, "interval": 1, "reuse": "forecast1"})
    assert torch.equal(off_hold, off_forecast)
    assert torch.equal(off_forecast, _sample(comfy, "fc-ref"))
