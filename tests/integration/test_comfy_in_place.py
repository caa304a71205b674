"""Stored values are copied exactly on the calls where something edits unit outputs in place.

ComfyUI's FreeU scales the U-Net features it is handed in place (`h[:, :half] = ...`), and
ControlNet adds its residuals in place (`h += ctrl`). CacheKit copies stored values on exactly
those calls (and not on the others, the lean hot path). With DeepCache branch 2 on the tiny
SD1.5 U-Net the value kept for cache steps is a 64-channel feature, which FreeU edits: without
the copy the stored value would be scaled again on every reuse.
"""
from __future__ import annotations

import pytest
import torch

from .comfy_graph import RESULTS, Graph

DEEPCACHE = {"cache_interval": 3, "cache_branch": 2, "schedule": "uniform", "center": 15, "power": 1.4,
             "start_percent": 0.0, "end_percent": 1.0}
FREEU = {"b1": 1.3, "b2": 1.4, "s1": 0.9, "s2": 0.2}


def _sample(comfy, key, *patches):
    g = Graph("sd15")
    for class_type, params in patches:
        g.patch(class_type, **params)
    g.sample(key, steps=6, cfg=2.0)
    comfy.run(g.prompt, comfy.fresh_executor())
    return RESULTS[key]


def test_freeu_after_deepcache_sees_copies_of_stored_features(comfy, monkeypatch):
    host = comfy.pack("nodes.comfy_host")
    plain = _sample(comfy, "ip-plain")
    freeu = _sample(comfy, "ip-freeu", ("FreeU_V2", FREEU))
    assert not torch.equal(plain, freeu)                      # FreeU does something on this model
    off = _sample(comfy, "ip-i1", ("CacheKitDeepCache", {**DEEPCACHE, "cache_interval": 1}), ("FreeU_V2", FREEU))
    assert torch.equal(off, freeu)

    seen = []
    detect = host._edits_in_place
    monkeypatch.setattr(host, "_edits_in_place", lambda *a: seen.append(detect(*a)) or seen[-1])
    cached = _sample(comfy, "ip-cached", ("CacheKitDeepCache", DEEPCACHE), ("FreeU_V2", FREEU))
    assert seen and all(seen)                                 # FreeU's patch was recognised on every call
    monkeypatch.setattr(host, "_edits_in_place", lambda *a: True)
    always = _sample(comfy, "ip-always", ("CacheKitDeepCache", DEEPCACHE), ("FreeU_V2", FREEU))
    assert torch.equal(cached, always)
    # Undetected, FreeU writes into what the cache hands out: the placeholders (one element
    # each, stride 0) refuse the write, and the run stops with a message saying what to do.
    monkeypatch.setattr(host, "_edits_in_place", lambda *a: False)
    with pytest.raises(AssertionError, match="edits cached features in place.*bypass that node"):
        _sample(comfy, "ip-never", ("CacheKitDeepCache", DEEPCACHE), ("FreeU_V2", FREEU))


def test_plain_deepcache_calls_copy_nothing(comfy, monkeypatch):
    host = comfy.pack("nodes.comfy_host")
    seen = []
    detect = host._edits_in_place
    monkeypatch.setattr(host, "_edits_in_place", lambda *a: seen.append(detect(*a)) or seen[-1])
    _sample(comfy, "ip-lean", ("CacheKitDeepCache", DEEPCACHE))
    assert seen and not any(seen)
    # A ControlNet is an in-place editor too (apply_control does `h += ctrl`).
    assert host._edits_in_place((None, None, None, None, {"input": [], "output": []}), {}, {})
    assert host._edits_in_place((None,), {"control": {"middle": []}}, {})
